"""The paper's Tables 2 and 4 on one task: every baseline and ablation, over several seeds.

`python -m score_jax.main --gin_file=ablations.gin` (`make ablations`, the toy) runs, for each
seed, the training runs the rows need (runs shared by rows are trained once), evaluates each
row's model greedily on the same problems (eval_config), and writes to the work dir
  ablations.md      the Table 2/4 shaped table: mean ± spread over seeds of every metric;
  ablations.json    the same numbers, and per_seed.jsonl: one line per (row, seed) of metrics;
  base/ (the toy's SFT base), eval_base/, eval_self_refine/, seed{S}/{run}/, seed{S}/eval_{row}/.
A finished run (its export/selection.json) or evaluation (its results.json) is not redone, so an
interrupted command picks up where it stopped.

Rows (ROWS): base model; Self-Refine; STaR; Pair-SFT; single-turn RL; multi-turn RL without
Stage I and without shaping; Stage II without Stage I; without reward shaping (Stage I, then
Stage II with alpha = 0, i.e. the multi_turn objective); Stage I only; STaR in place of
REINFORCE in Stage II; SCoRe.

Equal step budgets: with S = `steps`, a one-run row trains S steps from the base; a two-stage
row trains S/2 steps of Stage I and S/2 of its second stage (Stage I is shared, so "Stage I
only" is that S/2-step run, as in the pipeline); `stage1_share` moves that split.

One learning-rate rule for every run: lr = `learning_rate` / sqrt(w), w the range of the
per-token weight the loss puts on log-probs: 1 for SFT objectives (STaR, Pair-SFT) and for RL
objectives with rewards in [0, 1]; 1 + 2 alpha for Stage II's shaped reward r2 + alpha (r2 - r1)
(in [-alpha, 1 + alpha]). With learning_rate = 1e-4 this gives the demo's hand-tuned values,
1e-4 for Stage I and ~2e-5 for Stage II (alpha = 10).

Seeds: the base model (and so the base and Self-Refine rows) is one, trained once; a seed sets
`RunConfig.seed` (data order, sampling) of every other run. Spread is the standard deviation
over seeds (0 with one seed).
"""

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import gin
import jax
import numpy as np

from score_jax import experiment
from score_jax.data import tasks
from score_jax.rl import objectives

# Stage I, shared by the two-stage rows: the share "stage1" of the step budget
# (`ablations_config.stage1_share`); their second stage has the rest ("stage2").
STAGE1 = ("stage1", "stage1", "base", "stage1")
# name -> (label, runs as (run, mode, start: "base" or a run, share of the step budget),
#          the run evaluated ("base": the base model), evaluation mode).
ROWS = {
    "base": ("base model", (), "base", "eval"),
    "self_refine": ("Self-Refine", (), "base", "self_refine"),
    "star": ("STaR", (("star", "star", "base", 1.0),), "star", "eval"),
    "pair_sft": ("Pair-SFT", (("pair_sft", "pair_sft", "base", 1.0),), "pair_sft", "eval"),
    "single_turn": ("single-turn RL", (("single_turn", "single_turn", "base", 1.0),),
                    "single_turn", "eval"),
    "multi_turn": ("multi-turn RL w/o Stage I, w/o shaping",
                   (("multi_turn", "multi_turn", "base", 1.0),), "multi_turn", "eval"),
    "without_stage1": ("Stage II w/o Stage I", (("stage2_from_base", "stage2", "base", 1.0),),
                       "stage2_from_base", "eval"),
    "without_shaping": ("w/o reward shaping (alpha=0)",
                        (STAGE1, ("stage2_alpha0", "multi_turn", "stage1", "stage2")),
                        "stage2_alpha0", "eval"),
    "stage1_only": ("Stage I only", (STAGE1,), "stage1", "eval"),
    "stage2_star": ("STaR in place of REINFORCE in Stage II",
                    (STAGE1, ("stage2_star", "stage2_star", "stage1", "stage2")), "stage2_star",
                    "eval"),
    "score": ("SCoRe", (STAGE1, ("stage2", "stage2", "stage1", "stage2")), "stage2", "eval"),
}
METRICS = (("Acc@t1", "acc_t1"), ("Acc@t2", "acc_t2"), ("Delta(t1,t2)", "delta"),
           ("Delta i->c", "delta_i2c"), ("Delta c->i", "delta_c2i"))


def rule_learning_rate(base_lr: float, mode: str, alpha: float) -> float:
  """The rule of the module docstring: base_lr / sqrt(range of the per-token loss weight)."""
  return base_lr / math.sqrt(1.0 + 2.0 * alpha if mode == "stage2" else 1.0)


def aggregate(per_seed: Mapping[str, Sequence[Mapping[str, float]]]
              ) -> dict[str, dict[str, tuple[float, float]]]:
  """{row: [metrics of each seed]} -> {row: {metric: (mean, spread)}}, spread the standard
  deviation over seeds (ddof 1; 0 with one seed)."""
  out = {}
  for row, runs in per_seed.items():
    out[row] = {}
    for _, key in METRICS:
      values = np.array([m[key] for m in runs], np.float64)
      spread = values.std(ddof=1) if len(values) > 1 else 0.0
      out[row][key] = (float(values.mean()), float(spread))
  return out


def markdown_table(agg: Mapping[str, Mapping[str, tuple[float, float]]],
                   seeds: int) -> str:
  """Rows of methods, columns of metrics in percent as mean ± spread."""
  lines = [f"| method ({seeds} seed{'s' * (seeds != 1)}) | " +
           " | ".join(c for c, _ in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
  for row, m in agg.items():
    cells = [f"{100 * m[key][0]:.1f} ± {100 * m[key][1]:.1f}" for _, key in METRICS]
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


@gin.configurable
def ablations_config(rows: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0, 1, 2),
                     steps: int = 60, learning_rate: float = 1e-4,
                     stage1_share: float = 0.5) -> dict[str, Any]:
  """rows: keys of ROWS (None: all, in ROWS' order); steps: the training budget S of each row;
  learning_rate: the rule's base (module docstring); stage1_share: the part of S that the
  two-stage rows spend in Stage I (their second stage gets the rest)."""
  unknown = [r for r in rows or () if r not in ROWS]
  if unknown:
    raise experiment.UserError(f"unknown ablation rows {unknown}; use some of {list(ROWS)}")
  if not 0.0 < stage1_share < 1.0:
    raise experiment.UserError(f"ablations_config.stage1_share must be in (0, 1), got "
                               f"{stage1_share}")
  return dict(rows=list(rows or ROWS), seeds=list(seeds), steps=steps,
              learning_rate=learning_rate, stage1_share=stage1_share)


def run_steps(share: Any, steps: int, stage1_share: float) -> int:
  """Steps of a run with `share` of the budget `steps` (a fraction, or "stage1" / "stage2":
  Stage I's rounded share and the rest, so a two-stage row trains exactly `steps`)."""
  stage1 = max(1, round(stage1_share * steps))
  if share == "stage1":
    return stage1
  if share == "stage2":
    return max(1, steps - stage1)
  return max(1, round(share * steps))


def _alpha(mode: str) -> float:
  with gin.config_scope(mode):
    return objectives.objective(kind=mode).alpha if mode in objectives.KINDS else 0.0


def run(workdir: str, task: tasks.Task) -> dict[str, dict[str, tuple[float, float]]]:
  """Trains and evaluates every row for every seed; writes and prints the table."""
  cfg = ablations_config()
  d = lambda *parts: os.path.join(workdir, *parts)
  with gin.config_scope("eval"):
    experiment.eval_problems(task)  # Read before anything is trained.
  base = None  # A pretrained model: the policy source itself.
  if experiment.policy_source()[0] == "toy":
    base = d("base")
    if not os.path.exists(d("base", "export", "selection.json")):
      experiment.run_mode("sft", base, task, None, None)

  def evaluate(out: str, eval_mode: str, src: Optional[str]) -> dict[str, float]:
    if not os.path.exists(os.path.join(out, "results.json")):
      experiment.run_mode(eval_mode, out, task, src, base)
    with open(os.path.join(out, "results.json")) as f:
      return json.load(f)

  per_seed = {ROWS[r][0]: [] for r in cfg["rows"]}
  lines = []
  for seed in cfg["seeds"]:
    for key in cfg["rows"]:
      name, runs, evaluated, eval_mode = ROWS[key]
      for run_name, mode, start, share in runs:
        out = d(f"seed{seed}", run_name)
        if not os.path.exists(os.path.join(out, "export", "selection.json")):
          experiment.run_mode(
              mode, out, task, base if start == "base" else d(f"seed{seed}", start), base,
              steps=run_steps(share, cfg["steps"], cfg["stage1_share"]), seed=seed,
              learning_rate=rule_learning_rate(cfg["learning_rate"], mode, _alpha(mode)))
      if evaluated == "base":
        metrics = evaluate(d(f"eval_{key}"), eval_mode, base)
      else:
        metrics = evaluate(d(f"seed{seed}", f"eval_{key}"), eval_mode,
                           d(f"seed{seed}", evaluated))
      per_seed[name].append(metrics)
      lines.append({"row": name, "key": key, "seed": seed,
                    **{k: metrics[k] for _, k in METRICS}})
  agg = aggregate(per_seed)
  table = markdown_table(agg, len(cfg["seeds"]))
  if jax.process_index() == 0:
    with open(d("ablations.md"), "w") as f:
      f.write(table + "\n")
    with open(d("ablations.json"), "w") as f:
      json.dump({"config": cfg, "rows": agg}, f, indent=2)
    with open(d("per_seed.jsonl"), "w") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines)
  print("\n" + table)
  return agg
