"""Where a training run's metrics go: metrics.jsonl, TensorBoard events and a progress line.

Every step's metrics become
  WORKDIR/metrics.jsonl    one JSON object per line, {"step": s, "loss": ..., ...}; a resumed
                           run appends, so the last line of a step is the one that counts
                           (`report.read_metrics`, the benchmarks and the tests read it);
  WORKDIR/tensorboard/     scalar summaries, written by TensorBoard's own writer
                           (`tensorboard.summary.Writer`: numpy only, no TensorFlow);
  stderr                   on the steps asked for, one line with the main metrics, the speed and
                           the time left, formatted by tqdm (`progress_line`).
In a multi-host run only process 0 writes; the other processes' writers do nothing. Work dirs
on object stores (gs://; through etils.epath) cannot be appended to: there metrics.jsonl is
rewritten whole, at most every `REMOTE_FLUSH_S` seconds, at each checkpoint and on close, and
TensorBoard writes through its own file system layer (gs:// needs gcsfs installed).
"""

import json
import os
import sys
import time
from typing import Any, Optional

from etils import epath
import jax
import numpy as np
from tensorboard import summary as tb_summary
import tqdm

# Shown on the console line, in this order, when present.
CONSOLE_KEYS = ("loss", "reward_t1", "reward_t2", "delta", "kl_t1", "kl_t2", "token_accuracy")

REMOTE_FLUSH_S = 30.0  # metrics.jsonl on an object store: rewritten at most this often.


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
      self._jsonl = _JsonLines(epath.Path(workdir) / "metrics.jsonl")
      self._tb = tb_summary.Writer(os.fspath(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any], console: bool) -> None:
    """Writes the metrics of `step` (scalars, or arrays kept as lists in metrics.jsonl)."""
    if not self._on:
      return
    metrics = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist())
               for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    for k, v in metrics.items():
      if isinstance(v, float):
        self._tb.add_scalar(k, v, step)
    if console:
      shown = " ".join(f"{k}={metrics[k]:.4f}" for k in CONSOLE_KEYS if k in metrics)
      print(progress_line(step, self._total, time.time() - self._t0, initial=self._start,
                          shown=shown), file=sys.stderr, flush=True)

  def flush(self) -> None:
    """Writes out what metrics.jsonl holds only in memory (object stores), e.g. with a
    checkpoint, so that a crash loses no step the checkpoint has."""
    if self._on:
      self._jsonl.flush()

  def close(self) -> None:
    if self._on:
      self._jsonl.close()
      self._tb.close()


def appendable(path: epath.Path) -> bool:
  """Whether `path` is on a file system that appends (local disks; not gs:// and the like)."""
  return "://" not in os.fspath(path)


class _JsonLines:
  """metrics.jsonl: appended line by line where the file system can; else kept in memory and
  rewritten whole (after what earlier runs wrote), at most every REMOTE_FLUSH_S seconds."""

  def __init__(self, path: epath.Path):
    self._path = path
    if appendable(path):
      self._file, self._lines = path.open("a"), None
    else:
      self._file = None
      self._lines = path.read_text().splitlines(keepends=True) if path.exists() else []
      self._flushed = time.time()

  def write(self, line: str) -> None:
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
      return
    self._lines.append(line)
    if time.time() - self._flushed >= REMOTE_FLUSH_S:
      self.flush()

  def flush(self) -> None:
    if self._lines is not None:
      self._path.write_text("".join(self._lines))
      self._flushed = time.time()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    else:
      self.flush()
