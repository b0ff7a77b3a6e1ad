"""The experiments: benchmarks, the paper's reproduction and the GPU recording, apart from
the library. They import the library; the library never imports them
(``tests/test_layout.py`` checks).

* :mod:`.scenarios`: the task mixes and federations the experiments run;
* :mod:`.paper`: the paper's reported numbers;
* :mod:`.bench_cosched`, :mod:`.bench_federated`: the two benchmarks
  (``python -m mtfl_jax bench cosched|federated``, ``benchmarks/*.py``);
* :mod:`.reproduce`: the six figures and the report (``python -m mtfl_jax reproduce``);
* :mod:`.gpu_record`: a GPU recording in one call (``python -m mtfl_jax.experiments.gpu_record``).
"""
