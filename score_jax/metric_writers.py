"""Where a training run's metrics go: metrics.jsonl, TensorBoard events and a progress line.

Every step's metrics become
  WORKDIR/metrics.jsonl    one JSON object per line, {"step": s, "loss": ..., ...}; a resumed
                           run appends, so the last line of a step is the one that counts
                           (`report.read_metrics`, the benchmarks and the tests read it);
  WORKDIR/tensorboard/     scalar summaries, written by TensorBoard's own writer
                           (`tensorboard.summary.Writer`: numpy only, no TensorFlow);
  stderr                   on the steps asked for, one line with the main metrics, the speed and
                           the time left, formatted by tqdm (`progress_line`).
In a multi-host run only process 0 writes; the other processes' writers do nothing.
"""

import json
import os
import sys
import time
from typing import Any, Optional

import jax
import numpy as np
from tensorboard import summary as tb_summary
import tqdm

# Shown on the console line, in this order, when present.
CONSOLE_KEYS = ("loss", "reward_t1", "reward_t2", "delta", "kl_t1", "kl_t2", "token_accuracy")


def progress_line(done: int, total: int, elapsed_s: float, *, initial: int = 0,
                  unit: str = "step", head: str = "", shown: str = "") -> str:
  """`{head}[done/total] {shown} | rate, ETA`; the rate counts the `done - initial` units
  of the `elapsed_s` seconds (a resumed run starts at `initial`)."""
  middle = " {desc} |" if shown else " |"
  return tqdm.tqdm.format_meter(
      done, total, elapsed_s, prefix=shown, unit=unit, initial=initial,
      bar_format=head + "[{n_fmt}/{total_fmt}]" + middle + " {rate_fmt}, ETA {remaining}")


class MetricsWriter:
  """metrics.jsonl + TensorBoard + the console progress line (process 0 only)."""

  def __init__(self, workdir: str, total_steps: int, start_step: int,
               active: Optional[bool] = None):
    """Appends to `workdir`'s metrics; `active` defaults to being process 0."""
    self._on = jax.process_index() == 0 if active is None else active
    self._total, self._start, self._t0 = total_steps, start_step, time.time()
    if self._on:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = tb_summary.Writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any], console: bool) -> None:
    """Writes the metrics of `step` (scalars, or arrays kept as lists in metrics.jsonl)."""
    if not self._on:
      return
    metrics = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist())
               for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      if isinstance(v, float):
        self._tb.add_scalar(k, v, step)
    if console:
      shown = " ".join(f"{k}={metrics[k]:.4f}" for k in CONSOLE_KEYS if k in metrics)
      print(progress_line(step, self._total, time.time() - self._t0, initial=self._start,
                          shown=shown), file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._on:
      self._jsonl.close()
      self._tb.close()
