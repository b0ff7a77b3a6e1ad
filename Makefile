# The two commands of the README: `make demo` (reproduce the paper's figures, quick mode)
# and `make test` (unit tests + notebooks). Both create .venv on first use. `make docs`: the
# API reference from the docstrings (pdoc), HTML in docs/api/.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
MODE ?= --quick
OUT ?= results

.PHONY: demo test docs bench install clean gpu-record gpu-record-dry gpu-wheels

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,notebooks,docs]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m mtfl_jax reproduce $(MODE) --out $(OUT)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax notebooks

# Fails when a module does not import (scripts/api_docs.py imports every one first).
docs: $(VENV)/.installed
	$(PY) scripts/api_docs.py --out docs/api

# The two benchmarks side by side (benchmarks/*.py; mtfl_jax/experiments/bench_*.py).
bench: $(VENV)/.installed
	$(PY) benchmarks/cosched.py $(MODE)
	$(PY) benchmarks/federated.py $(MODE)

# The GPU recording (docs/gpu_recording.md; its driver is mtfl_jax/experiments/gpu_record.py):
# `gpu-wheels` here, `gpu-record` on the GPU machine, `gpu-record-dry` its CPU dry run here
# (tarball in /tmp/gpu_record_out).
gpu-wheels:
	bash scripts/gpu_fetch_wheels.sh

gpu-record:
	bash scripts/gpu_record.sh

gpu-record-dry: $(VENV)/.installed
	PY=$(abspath $(PY)) bash scripts/gpu_record.sh --dry-run

clean:
	rm -rf $(VENV) results docs/api
