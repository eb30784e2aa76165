"""The paper's self-correction metrics over one set of evaluation problems.

For rewards r_t in {0, 1} of attempts t = 1, 2 on N problems:
  acc_t1, acc_t2      Accuracy@t1, Accuracy@t2
  delta               Acc@t2 - Acc@t1 (= delta_i2c - delta_c2i)
  delta_i2c           fraction of problems wrong at t1 and right at t2
  delta_c2i           fraction of problems right at t1 and wrong at t2
  delta_ci95          95% confidence interval of delta (paired normal approximation)
  edit_ratio_*        edit distance between the attempts' texts over their combined length
With K > 2 attempts (eval_config.num_attempts), for each later turn k = 3..K:
  acc_t{k}; delta_t{k-1}_t{k} = Acc@tk - Acc@t(k-1); delta_i2c_t{k-1}_t{k}, delta_c2i_t{k-1}_t{k}
  (the flips between turns k-1 and k; for turns 1 and 2 these are delta, delta_i2c, delta_c2i).
All fractions are in [0, 1]. Edit distances (Levenshtein: insertions, deletions, substitutions
of characters) are computed in C by rapidfuzz. `write_results` also draws the histogram of the
edit-distance ratios (the paper's picture of how much attempt 2 rewrites attempt 1).
"""

import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

from etils import epath
import numpy as np
from rapidfuzz import process as rf_process
from rapidfuzz.distance import Levenshtein

from score_jax.eval import plots

HISTOGRAM = "edit_ratio_hist.png"  # Next to results.json.


def edit_ratio(a: str, b: str) -> float:
  """Edit distance over the two lengths combined: 0 for identical texts, at most 1."""
  return Levenshtein.distance(a, b) / max(1, len(a) + len(b))


def edit_ratios(texts: Sequence[Sequence[str]]) -> np.ndarray:
  """[N] `edit_ratio` of attempts 1 and 2 of texts [N][K>=2], in one call into C."""
  first, second = [t[0] for t in texts], [t[1] for t in texts]
  dist = rf_process.cpdist(first, second, scorer=Levenshtein.distance)
  lengths = np.array([len(a) + len(b) for a, b in zip(first, second)], np.float64)
  return dist / np.maximum(lengths, 1.0)


def self_correction_metrics(rewards: np.ndarray,
                            texts: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
  """Metrics of rewards [N, K] (K >= 2; attempts 1 and 2 compared) and optional texts [N][K]."""
  r = np.asarray(rewards, np.float64) >= 0.5
  if r.ndim != 2 or r.shape[1] < 2 or r.shape[0] == 0:
    raise ValueError(f"need rewards of shape [N, K>=2], got {r.shape}")
  n = r.shape[0]
  diff = r[:, 1].astype(np.float64) - r[:, 0]
  half = 1.96 * diff.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
  out = {"n": n, "acc_t1": r[:, 0].mean(), "acc_t2": r[:, 1].mean(), "delta": diff.mean(),
         "delta_i2c": (~r[:, 0] & r[:, 1]).mean(), "delta_c2i": (r[:, 0] & ~r[:, 1]).mean(),
         "delta_ci95": [diff.mean() - half, diff.mean() + half]}
  for k in range(2, r.shape[1]):
    turns = f"t{k}_t{k + 1}"
    out[f"acc_t{k + 1}"] = r[:, k].mean()
    out[f"delta_{turns}"] = r[:, k].mean() - r[:, k - 1].mean()
    out[f"delta_i2c_{turns}"] = (~r[:, k - 1] & r[:, k]).mean()
    out[f"delta_c2i_{turns}"] = (r[:, k - 1] & ~r[:, k]).mean()
  if texts is not None:
    ratios = edit_ratios(texts)
    out.update(edit_ratio_mean=ratios.mean(), edit_ratio_median=float(np.median(ratios)),
               edit_ratio_zero_fraction=(ratios == 0).mean())
  return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in out.items()}


def markdown_table(rows: Mapping[str, Mapping[str, float]]) -> str:
  """The paper's Table 2 shape: rows of methods, columns in percent."""
  cols = [("Acc@t1", "acc_t1"), ("Acc@t2", "acc_t2"), ("Delta(t1,t2)", "delta"),
          ("Delta i->c", "delta_i2c"), ("Delta c->i", "delta_c2i")]
  lines = ["| method | " + " | ".join(c for c, _ in cols) + " | 95% CI of Delta | n |",
           "|---" * (len(cols) + 3) + "|"]
  for name, m in rows.items():
    lo, hi = m["delta_ci95"]
    cells = [f"{100 * m[key]:.1f}" for _, key in cols]
    lines.append(f"| {name} | " + " | ".join(cells) +
                 f" | [{100 * lo:+.1f}, {100 * hi:+.1f}] | {m['n']} |")
  return "\n".join(lines)


def turn_table(metrics: Mapping[str, float]) -> str:
  """Per turn k: Acc@tk and the change from turn k-1 (Delta, i->c, c->i), in percent."""
  lines = ["| turn | Acc | Delta(t(k-1),tk) | i->c | c->i |", "|---|---|---|---|---|",
           f"| 1 | {100 * metrics['acc_t1']:.1f} | | | |"]
  k = 2
  while f"acc_t{k}" in metrics:
    suffix = "" if k == 2 else f"_t{k - 1}_t{k}"
    cells = [metrics[f"acc_t{k}"], metrics["delta" + suffix], metrics["delta_i2c" + suffix],
             metrics["delta_c2i" + suffix]]
    lines.append(f"| {k} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + " |")
    k += 1
  return "\n".join(lines)


def write_results(directory: str, metrics: Mapping[str, float], samples: Sequence[dict]) -> None:
  """results.json, results.md, samples.jsonl (every problem's attempts and rewards) and the
  edit-distance-ratio histogram of attempts 1 and 2 (HISTOGRAM)."""
  out = epath.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(dict(metrics), indent=2))
  tables = markdown_table({"model": metrics}) + "\n"
  if "acc_t3" in metrics:
    tables += "\n" + turn_table(metrics) + "\n"
  (out / "results.md").write_text(tables)
  (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
  plots.edit_ratio_histogram(
      os.path.join(directory, HISTOGRAM),
      {os.path.basename(os.path.abspath(directory)): edit_ratios([s["attempts"] for s in samples])})


def host_share(examples: Sequence[Any], process_index: int, process_count: int
               ) -> tuple[list[Any], int]:
  """The contiguous block of `examples` one host evaluates, padded to the same length on
  every host (with copies of the last example) so that all hosts make the same sampler calls.
  Returns (block, number of real examples in it)."""
  per = -(-len(examples) // process_count)
  block = list(examples[process_index * per:(process_index + 1) * per])
  real = len(block)
  return block + [examples[-1]] * (per - real), real


def gather_samples(samples: list[dict]) -> list[dict]:
  """Every host's samples (JSON-serializable dicts), in process order, on every host: one
  all-gather of their JSON bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return samples
  data = np.frombuffer(json.dumps(samples).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  every = np.asarray(multihost_utils.process_allgather(padded))
  return [s for p, size in enumerate(sizes) for s in json.loads(every[p, :size].tobytes())]


def evaluate(conv, sampler, params, task, examples, pool, *, batch_size: int, rng=None,
             method=None, progress: bool = True) -> tuple[dict[str, float], list[dict]]:
  """Greedy (by default) multi-attempt rollouts on `examples`; the paper's metrics.

  Returns (metrics, samples) where samples hold each problem's attempts and rewards, in the
  order of `examples`. The host checks the rewards of one chunk while the device generates
  the next. In a multi-host run each process evaluates its own block of the problems
  (`host_share`), `batch_size` problems per sampler call across all hosts; the samples are
  gathered once at the end, and every process returns the same metrics and samples.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from score_jax import metric_writers  # pylint: disable=g-import-not-at-top
  from score_jax.rl import rollout as rollout_lib  # pylint: disable=g-import-not-at-top
  from score_jax.decoding import sampling  # pylint: disable=g-import-not-at-top
  method = sampling.Greedy() if method is None else method
  rng = jax.random.PRNGKey(0) if rng is None else rng
  hosts = jax.process_count()
  mine, real = host_share(examples, jax.process_index(), hosts)
  per_call = max(1, batch_size // hosts)
  samples = []
  t0 = time.time()
  pending = None
  for call, start in enumerate(range(0, len(mine), per_call)):
    ro = rollout_lib.generate(conv, sampler, params, mine[start:start + per_call],
                              jax.random.fold_in(rng, call), method)
    future = rollout_lib.score(pool, task, ro)
    if pending is not None:  # Rewards of the previous chunk were checked meanwhile.
      samples += _samples(*pending)
    pending = (ro, future)
    if progress:
      done = min(len(examples), (start + len(ro.examples)) * hosts)
      print(metric_writers.progress_line(done, len(examples), time.time() - t0,
                                         unit="problem", head="eval "),
            file=sys.stderr, flush=True)
  samples = gather_samples((samples + _samples(*pending))[:real])
  metrics = self_correction_metrics(np.array([s["rewards"] for s in samples]),
                                    [s["attempts"] for s in samples])
  return metrics, samples


def _samples(ro, future) -> list[dict]:
  """A chunk's problems with their attempts and rewards (waits for the rewards)."""
  rewards = future.result()
  return [{"id": ex.id, "prompt": ex.prompt, "reference": ex.reference, "attempts": t,
           "rewards": r.tolist()} for ex, t, r in zip(ro.examples, ro.texts, rewards)]
