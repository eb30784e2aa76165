"""The ablations' step budget: each run's share of `steps`."""

import pytest

from score_jax.eval import ablations


@pytest.mark.parametrize("steps, stage1_share, stage1, stage2", [
    (60, 0.5, 30, 30), (60, 0.25, 15, 45), (4, 0.25, 1, 3),
    (5, 0.5, 2, 3),  # Rounded Stage I (2.5 -> 2), the rest to Stage II: 5 in all.
    (7, 0.5, 4, 3), (1, 0.5, 1, 1)])  # Never 0 steps.
def test_two_stage_rows_train_the_whole_budget(steps, stage1_share, stage1, stage2):
  assert ablations.run_steps("stage1", steps, stage1_share) == stage1
  assert ablations.run_steps("stage2", steps, stage1_share) == stage2


def test_one_run_rows_take_their_fraction():
  assert ablations.run_steps(1.0, 60, 0.25) == 60
  assert ablations.run_steps(0.5, 3, 0.25) == 2
