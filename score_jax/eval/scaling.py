"""Inference-compute scaling: self-consistency over parallel samples vs self-corrected samples.

For a budget of K attempts per problem (the paper's Figure, budgets 2..32 at temperature 0.7):
  parallel        K independent first attempts, majority vote over their final answers;
  self_corrected  K / 2 first attempts, each corrected once, majority vote over the K / 2
                  second attempts.
Both spend K attempts. One sampling pass serves every budget: M = max(budgets) two-attempt
samples per problem; budget K reads the first attempts of samples 1..K and the second attempts
of samples 1..K/2 (prefixes, so larger budgets extend smaller ones).

A vote compares `task.final_answer` (math: the normalized final answer); responses without an
answer do not vote; ties go to the answer reached first (the lower sample index); a problem
none of whose responses has an answer counts as wrong. The voted response's reward, already
checked, is the problem's score.
"""

import collections
import json
import os
from typing import Mapping, Optional, Sequence

import numpy as np


def majority_vote(answers: Sequence[Optional[str]]) -> Optional[int]:
  """The index of the first response carrying the most common answer; None answers do not
  vote; None when no response has an answer."""
  counts = collections.Counter(a for a in answers if a is not None)
  if not counts:
    return None
  top = max(counts.values())
  return next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)


def voted_accuracy(answers: Sequence[Sequence[Optional[str]]], rewards: np.ndarray) -> float:
  """Fraction of problems whose majority-voted response is correct (answers, rewards [N][M])."""
  scores = []
  for ans, rew in zip(answers, rewards):
    i = majority_vote(ans)
    scores.append(0.0 if i is None else float(rew[i] >= 0.5))
  return float(np.mean(scores))


def scaling_curves(answers: Sequence[Sequence[Sequence[Optional[str]]]], rewards: np.ndarray,
                   budgets: Sequence[int]) -> dict[str, list[float]]:
  """Accuracy per budget of both strategies (module docstring).

  Args:
    answers: [N][M][2] final answers of attempts 1 and 2 of M samples per problem.
    rewards: [N, M, 2].
    budgets: even numbers, each at most M.
  """
  rewards = np.asarray(rewards)
  first = lambda k: ([[a[0] for a in p[:k]] for p in answers], rewards[:, :k, 0])
  second = lambda k: ([[a[1] for a in p[:k]] for p in answers], rewards[:, :k, 1])
  return {"budgets": list(budgets),
          "parallel": [voted_accuracy(*first(k)) for k in budgets],
          "self_corrected": [voted_accuracy(*second(k // 2)) for k in budgets]}


def check_budgets(budgets: Sequence[int]) -> None:
  """ValueError unless every budget is an even number >= 2."""
  bad = [k for k in budgets if k < 2 or k % 2]
  if not budgets or bad:
    raise ValueError(f"budgets must be even numbers >= 2, got {list(budgets)}")


def markdown_table(curves: Mapping[str, list[float]]) -> str:
  """Accuracy (%) per budget of both strategies."""
  lines = ["| budget (attempts) | self-consistency (parallel) | self-corrected |",
           "|---|---|---|"]
  for k, p, s in zip(curves["budgets"], curves["parallel"], curves["self_corrected"]):
    lines.append(f"| {k} | {100 * p:.1f} | {100 * s:.1f} |")
  return "\n".join(lines)


def write(directory: str, curves: Mapping[str, list[float]], extra: Mapping) -> str:
  """results.json (curves and `extra`) and table.md in `directory`; returns the table."""
  table = markdown_table(curves)
  with open(os.path.join(directory, "results.json"), "w") as f:
    json.dump({**curves, **extra}, f, indent=2)
  with open(os.path.join(directory, "table.md"), "w") as f:
    f.write(table + "\n")
  return table
