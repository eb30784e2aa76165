"""Figures of a run, drawn headless: training curves and the edit-distance-ratio histogram.

Training curves: the metrics of metrics.jsonl fall into groups (CURVES), one figure each; a key
`name_t{k}` is attempt k's, drawn in the run's colour with attempt k's line style. Groups with no
key in any run are not drawn. Long runs get a trailing mean over the last `w` steps on top of
the faint per-step values. The histogram is the paper's picture of how much the second attempt
rewrites the first: per problem, edit distance(y1, y2) / (|y1| + |y2|), 0 for an unchanged
answer, as a fraction of the problems.

Figures are drawn on matplotlib's Agg canvas without pyplot, so nothing needs a display and
the backend of a process that imports this module is left alone. matplotlib is imported when the
first figure is drawn (it takes a second; training processes import this module but draw nothing).
"""

import dataclasses
import re
from typing import Mapping, Sequence

from etils import epath
import numpy as np


def _save(fig, path: str) -> None:
  """The figure as PNG at `path` (local or, through etils.epath, e.g. gs://)."""
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=110)


@dataclasses.dataclass(frozen=True)
class CurveGroup:
  """One figure: metrics.jsonl keys matching `pattern` (group 1, if any: the attempt)."""
  name: str    # The file is {name}.png.
  pattern: str
  title: str
  ylabel: str


CURVES = (
    CurveGroup("reward", r"reward_t(\d+)", "Training reward per attempt", "mean reward"),
    CurveGroup("kl", r"kl_t(\d+)", "KL to the reference per attempt", "KL per token"),
    CurveGroup("delta", r"delta", "Delta: reward of attempt 2 - attempt 1", "reward t2 - t1"),
    CurveGroup("entropy", r"entropy", "Policy entropy", "nats per token"),
    CurveGroup("edit_ratio", r"edit_ratio", "Edit-distance ratio of attempt 1 vs attempt 2",
               "edit distance / combined length"),
    CurveGroup("loss", r"loss", "Training loss", "loss"),
    CurveGroup("token_accuracy", r"token_accuracy", "SFT token accuracy", "accuracy"),
)
_LINE_STYLES = ("-", "--", ":", "-.")
# Above this many points a series is drawn faint with its trailing mean on top.
_SMOOTH_ABOVE = 50


@dataclasses.dataclass(frozen=True)
class Series:
  """One line of run `run`: `values[i]` at `steps[i]` (both [P])."""
  run: str
  attempt: int  # 0 for metrics that are not per attempt.
  steps: np.ndarray
  values: np.ndarray

  @property
  def label(self) -> str:
    return f"{self.run} attempt {self.attempt}" if self.attempt else self.run


def curve_series(runs: Mapping[str, Sequence[Mapping[str, float]]]
                 ) -> dict[str, list[Series]]:
  """The lines of each CURVES group (by name) from runs' metrics rows ({"step": s, key: v})."""
  out = {}
  for group in CURVES:
    lines = []
    for run, rows in runs.items():
      keys = sorted({k for row in rows for k in row if re.fullmatch(group.pattern, k)},
                    key=lambda k: (len(k), k))
      for key in keys:
        match = re.fullmatch(group.pattern, key)
        attempt = int(match.group(1)) if match.groups() else 0
        points = [(row["step"], row[key]) for row in rows
                  if isinstance(row.get(key), (int, float)) and not isinstance(row[key], bool)]
        if points:
          steps, values = map(np.asarray, zip(*points))
          lines.append(Series(run, attempt, steps, values.astype(np.float64)))
    if lines:
      out[group.name] = lines
  return out


def _axes():
  """A new figure's axes (the figure: `ax.figure`)."""
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(7.5, 4.2))
  fig.subplots_adjust(left=0.11, right=0.97, bottom=0.13, top=0.91)  # Fixed: fast, no layout pass.
  return fig.add_subplot()


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
  """[P] mean of the last `window` values at each point (fewer at the start)."""
  c = np.concatenate([[0.0], np.cumsum(values)])
  i = np.arange(1, len(values) + 1)
  lo = np.maximum(i - window, 0)
  return (c[i] - c[lo]) / (i - lo)


def draw_curves(path: str, group: CurveGroup, lines: Sequence[Series]) -> None:
  """One group's figure as a PNG at `path`: each run a colour, each attempt a line style."""
  ax = _axes()
  colours = {}
  longest = max(len(s.steps) for s in lines)
  window = max(1, longest // 25) if longest > _SMOOTH_ABOVE else 1
  for s in lines:
    colour = colours.setdefault(s.run, f"C{len(colours) % 10}")
    style = _LINE_STYLES[(max(s.attempt, 1) - 1) % len(_LINE_STYLES)]
    if window > 1:
      ax.plot(s.steps, s.values, style, color=colour, alpha=0.25, linewidth=0.8)
      ax.plot(s.steps, trailing_mean(s.values, window), style, color=colour, linewidth=1.8,
              label=s.label)
    else:
      ax.plot(s.steps, s.values, style, color=colour, linewidth=1.5, marker=".",
              label=s.label)
  title = group.title + (f" (bold: mean of the last {window} steps)" if window > 1 else "")
  ax.set(title=title, xlabel="training step", ylabel=group.ylabel)
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")
  _save(ax.figure, path)


def edit_ratio_histogram(path: str, ratios: Mapping[str, np.ndarray], bins: int = 20) -> None:
  """PNG at `path` of the edit-distance ratios [N] of each evaluation (by label; "" for one).

  Bars show the fraction of problems per bin of [0, 1], the evaluations' bars side by side
  in each bin; the legend gives the mean and the fraction of unchanged answers (ratio 0).
  """
  ax = _axes()
  edges = np.linspace(0.0, 1.0, bins + 1)
  width = (edges[1] - edges[0]) / len(ratios)
  for i, (name, r) in enumerate(ratios.items()):
    r = np.asarray(r, np.float64)
    stats = f"mean {r.mean():.2f}, unchanged {np.mean(r == 0):.0%}, n={len(r)}"
    fraction = np.histogram(r, edges)[0] / max(len(r), 1)
    ax.bar(edges[:-1] + i * width, fraction, width=width, align="edge", color=f"C{i % 10}",
           edgecolor="white", linewidth=0.5, label=f"{name}: {stats}" if name else stats)
  ax.set(title="Edit-distance ratio between attempt 1 and attempt 2",
         xlabel="edit distance(y1, y2) / (|y1| + |y2|)   (0: answer unchanged)",
         ylabel="fraction of problems", xlim=(0, 1))
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")
  _save(ax.figure, path)
