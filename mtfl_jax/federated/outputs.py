"""What a federated run leaves in its workdir besides checkpoints: ``history.json`` and figures.

``python -m mtfl_jax federate`` writes, in its workdir,

* ``config.json``: the run's settings (written by :func:`~mtfl_jax.federated.run_federated`),
* ``checkpoints/``: one per round, to resume from (orbax),
* ``history.json``: :func:`history_doc`, one row per round and a summary,
* ``accuracy.png``: test accuracy (mIoU for segmentation) against virtual time, per task,
* ``idle.png``: per round, the clients' mean busy and idle (waiting) virtual time.

Example::

    res = run_federated(cfg, workdir="runs/a")
    write_outputs(res, "runs/a")
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mtfl_jax.files import write_json


def history_doc(res) -> dict:
  """A run's history as JSON: config, per-round rows, and the summary numbers (each one
  recomputable from the rows)."""
  import jax
  return {"config": res.cfg.to_json(), "devices": [str(d) for d in jax.devices()],
          "processes": jax.process_count(), "wall_s": res.wall_s,
          "summary": {"rounds": len(res.history), "virtual_time_s": res.virtual_time_s,
                      "work_s": res.work_s, "fl_throughput": res.fl_throughput,
                      "final_accuracy": res.final_accuracy(),
                      "mean_idle_fraction": mean_idle_fraction(res.history)},
          "history": res.history}


def mean_idle_fraction(history) -> float:
  """Mean over rounds of (sum of live clients' idle time) / (live clients x round time)."""
  fr = [sum(h["idle_s"].values()) / (len(h["idle_s"]) * h["round_time_s"])
        for h in history if h["idle_s"] and h["round_time_s"] > 0]
  return float(np.mean(fr)) if fr else 0.0


def idle_per_round(history, title: str = "Clients' busy and idle time per round"):
  """Per round, the live clients' mean busy time and mean idle time (waiting for the slowest)."""
  import matplotlib.pyplot as plt
  rounds = [h["round"] for h in history]
  idle = [np.mean(list(h["idle_s"].values())) if h["idle_s"] else 0.0 for h in history]
  busy = [np.mean([h["client_time_s"][c] for c in h["idle_s"]]) if h["idle_s"] else 0.0 for h in history]
  fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(rounds) + 2), 3.2))
  ax.bar(rounds, busy, color="#0072b2", label="busy (mean over clients)")
  ax.bar(rounds, idle, bottom=busy, color="#dddddd", label="idle, waiting for the slowest")
  ax.set_xlabel("round")
  ax.set_ylabel("virtual seconds")
  ax.legend(fontsize=7)
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return fig


def write_outputs(res, workdir) -> dict:
  """Writes ``history.json``, ``accuracy.png`` and ``idle.png`` into ``workdir``; returns their
  paths by name."""
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  from mtfl_jax.plotting import accuracy_vs_time
  workdir = Path(workdir)
  out = {"history": workdir / "history.json", "accuracy": workdir / "accuracy.png", "idle": workdir / "idle.png"}
  write_json(out["history"], history_doc(res))
  for name, fig in (("accuracy", accuracy_vs_time({res.cfg.policy: res.history}, res.cfg.time_budget_s)),
                    ("idle", idle_per_round(res.history))):
    fig.savefig(out[name], dpi=110)
    plt.close(fig)
  return out
