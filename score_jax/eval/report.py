r"""A page of pictures for work dirs:
`python -m score_jax.eval.report WORKDIR [WORKDIR ...] --out=DIR`.

A WORKDIR is a training run (it holds metrics.jsonl), an evaluation (results.json and
samples.jsonl), or a directory holding such runs one level down, such as a pipeline's
(experiment.pipeline: base/, stage1/, stage2/, eval_base/, eval_stage1/, eval_stage2/ and
table.md). DIR (default: the first WORKDIR) receives
  report.md                   the pipelines' table.md, a table of the other evaluations, and
                              the figures below, linked relatively;
  plots/edit_ratio_hist.png   the edit-distance-ratio histogram of every evaluation;
  plots/{group}.png           one figure per group of training metrics (plots.CURVES: reward
                              and KL per attempt, delta, entropy, edit ratio, loss, ...) with
                              every run's curves.
Runs are named by their path relative to the work dirs' common parent (base, stage1, ... for
one pipeline). A work dir that is none of the above, or holds unreadable files, ends the command
with one error line and exit status 2.
"""

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from score_jax.eval import evaluation
from score_jax.eval import plots

REPORT = "report.md"
PLOTS = "plots"
_METRICS, _RESULTS, _SAMPLES, _TABLE = "metrics.jsonl", "results.json", "samples.jsonl", "table.md"


class ReportError(Exception):
  """A work dir that cannot be reported on (missing or unreadable files): one line."""


@dataclasses.dataclass(frozen=True)
class WorkDir:
  """What a work dir holds: training runs, evaluations, and a pipeline's table.md."""
  path: str
  runs: list[str]
  evals: list[str]
  table: Optional[str]


def find(workdir: str) -> WorkDir:
  """The runs and evaluations in `workdir` itself or else in its sub-directories."""
  if not os.path.isdir(workdir):
    raise ReportError(f"{workdir}: no such directory")
  has = lambda d, name: os.path.isfile(os.path.join(d, name))
  dirs = [workdir]
  if not (has(workdir, _METRICS) or has(workdir, _RESULTS)):
    dirs = [os.path.join(workdir, d) for d in sorted(os.listdir(workdir))
            if os.path.isdir(os.path.join(workdir, d))]
  runs = [d for d in dirs if has(d, _METRICS)]
  evals = [d for d in dirs if has(d, _RESULTS)]
  if not runs and not evals:
    raise ReportError(f"{workdir}: not a score_jax work dir (no {_METRICS} or {_RESULTS} in "
                      "it or in its sub-directories)")
  table = os.path.join(workdir, _TABLE) if has(workdir, _TABLE) else None
  return WorkDir(workdir, runs, evals, table)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    raise ReportError(f"{path}: no such file")
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        row = None
      if not isinstance(row, dict):
        raise ReportError(f"{path}:{n}: not a JSON object")
      rows.append(row)
  return rows


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """A run's metrics.jsonl rows in step order; of repeated steps (a resumed run) the last."""
  path = os.path.join(workdir, _METRICS)
  by_step = {}
  for n, row in enumerate(_read_jsonl(path), 1):
    if not isinstance(row.get("step"), int):
      raise ReportError(f"{path}:{n}: no integer \"step\"")
    by_step[row["step"]] = row
  return [by_step[s] for s in sorted(by_step)]


def read_results(eval_dir: str) -> dict[str, Any]:
  """An evaluation's results.json (evaluation.self_correction_metrics)."""
  path = os.path.join(eval_dir, _RESULTS)
  try:
    with open(path) as f:
      metrics = json.load(f)
    evaluation.markdown_table({"": metrics})  # Has what a table row needs.
  except (json.JSONDecodeError, KeyError, TypeError, ValueError):
    raise ReportError(f"{path}: not an evaluation's results.json") from None
  return metrics


def read_edit_ratios(eval_dir: str) -> np.ndarray:
  """[N] edit-distance ratios of attempts 1 and 2 in an evaluation's samples.jsonl."""
  path = os.path.join(eval_dir, _SAMPLES)
  texts = [row.get("attempts") for row in _read_jsonl(path)]
  if not texts or not all(isinstance(t, list) and len(t) >= 2 for t in texts):
    raise ReportError(f"{path}: expected rows with two or more \"attempts\"")
  return evaluation.edit_ratios(texts)


def _names(paths: Sequence[str]) -> dict[str, str]:
  """Each path's name: relative to the paths' common parent, or the base name if alone."""
  full = [os.path.abspath(p) for p in paths]
  if not full:
    return {}
  common = os.path.commonpath(full)
  return {p: (os.path.relpath(f, common) if f != common else os.path.basename(f))
          for p, f in zip(paths, full)}


def write_report(workdirs: Sequence[str], out: str) -> str:
  """Draws the figures of `workdirs` under out/plots and writes out/report.md; its path."""
  found = [find(w) for w in workdirs]
  runs = [r for f in found for r in f.runs]
  evals = [e for f in found for e in f.evals]
  names = _names(runs + evals)
  os.makedirs(os.path.join(out, PLOTS), exist_ok=True)
  title = ", ".join(os.path.basename(os.path.abspath(f.path)) for f in found)
  lines = [f"# Report: {title}", ""]

  for f in found:
    if f.table is not None:
      with open(f.table) as t:
        lines += [f"## Evaluation: {os.path.basename(os.path.abspath(f.path))}", "",
                  t.read().strip(), ""]
  loose = [e for f in found if f.table is None for e in f.evals]
  if loose:
    rows = {names[e]: read_results(e) for e in loose}
    lines += ["## Evaluation", "", evaluation.markdown_table(rows), ""]

  if evals:
    hist = os.path.join(PLOTS, evaluation.HISTOGRAM)
    plots.edit_ratio_histogram(os.path.join(out, hist),
                               {names[e]: read_edit_ratios(e) for e in evals})
    lines += ["## Edit-distance ratio between attempt 1 and attempt 2", "",
              "How much the second attempt rewrites the first, per problem: edit distance over "
              "the two answers' combined length (0: unchanged).", "",
              f"![Edit-distance ratio histogram]({hist})", ""]

  curves = plots.curve_series({names[r]: read_metrics(r) for r in runs})
  if curves:
    lines += ["## Training curves", ""]
  for group in plots.CURVES:
    if group.name in curves:
      png = os.path.join(PLOTS, f"{group.name}.png")
      plots.draw_curves(os.path.join(out, png), group, curves[group.name])
      lines += [f"### {group.title}", "", f"![{group.title}]({png})", ""]

  path = os.path.join(out, REPORT)
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m score_jax.eval.report",
      description="Training curves, edit-distance-ratio histograms and report.md of work dirs.")
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                      help="a training run, an evaluation, or a pipeline's work dir")
  parser.add_argument("--out", metavar="DIR",
                      help="where report.md and plots/ go (default: the first WORKDIR)")
  args = parser.parse_args(argv)
  try:
    print(write_report(args.workdirs, args.out or args.workdirs[0]))
  except (ReportError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
