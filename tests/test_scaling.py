"""Self-consistency voting and the inference-compute scaling curves on hand-made cases."""

import numpy as np
import pytest

from score_jax.eval import scaling


@pytest.mark.parametrize("answers, expected", [
    (["1", "2", "2"], 1),             # the majority
    (["1", "2", "2", "1"], 0),        # a tie: the answer reached first
    (["2", "1", "1", "2"], 0),
    ([None, "3", None, "4", "4"], 3),  # missing answers do not vote
    ([None, "3"], 1),
    ([None, None], None),              # nobody answered
    ([], None),
])
def test_majority_vote(answers, expected):
  assert scaling.majority_vote(answers) == expected


def test_voted_accuracy_scores_the_voted_response():
  answers = [["1", "2", "2"], [None, None, None], ["5", "6", "5"]]
  rewards = np.array([[1, 0, 0], [1, 1, 1], [1, 0, 1]], np.float32)
  # Problem 1 votes "2" (wrong), problem 2 has no answer (wrong), problem 3 votes "5" (right).
  assert scaling.voted_accuracy(answers, rewards) == pytest.approx(1 / 3)


def test_scaling_curves_use_prefixes_of_the_samples():
  # One problem, 4 samples of (attempt 1, attempt 2); the right answer is "7".
  answers = [[("1", "7"), ("7", "7"), ("1", "7"), ("7", "7")]]
  rewards = np.array([[[0, 1], [1, 1], [0, 1], [1, 1]]], np.float32)
  curves = scaling.scaling_curves(answers, rewards, [2, 4])
  # Budget 2: parallel votes between "1" and "7" (tie -> "1"); one corrected sample says "7".
  # Budget 4: parallel is 2-2 (tie -> "1"); two corrected samples both say "7".
  assert curves == {"budgets": [2, 4], "parallel": [0.0, 0.0], "self_corrected": [1.0, 1.0]}


@pytest.mark.parametrize("budgets", [[], [3], [0, 2], [2, 5]])
def test_budgets_must_be_even(budgets):
  with pytest.raises(ValueError, match="even"):
    scaling.check_budgets(budgets)
