"""The paper's metrics against hand-computed values."""

import numpy as np
import pytest

from score_jax import evaluation


def test_metrics_on_a_hand_made_table():
  # t1, t2 per problem: i->c, c->c, c->i, i->i, i->c
  rewards = np.array([[0, 1], [1, 1], [1, 0], [0, 0], [0, 1]], np.float32)
  texts = [["ab", "ab"], ["abc", "abd"], ["", "xy"], ["a", "a"], ["kitten", "sitting"]]
  m = evaluation.self_correction_metrics(rewards, texts)
  assert m["n"] == 5
  assert m["acc_t1"] == pytest.approx(0.4) and m["acc_t2"] == pytest.approx(0.6)
  assert m["delta"] == pytest.approx(0.2)
  assert m["delta_i2c"] == pytest.approx(0.4) and m["delta_c2i"] == pytest.approx(0.2)
  # diff = [1, 0, -1, 0, 1]: mean 0.2, sample std sqrt(0.7)
  half = 1.96 * np.sqrt(0.7) / np.sqrt(5)
  assert m["delta_ci95"] == pytest.approx([0.2 - half, 0.2 + half])
  # edit ratios: 0, 1/6, 2/2, 0, 3/13
  ratios = [0, 1 / 6, 1, 0, 3 / 13]
  assert m["edit_ratio_mean"] == pytest.approx(np.mean(ratios))
  assert m["edit_ratio_zero_fraction"] == pytest.approx(0.4)


def test_edit_distance():
  assert evaluation.edit_distance("kitten", "sitting") == 3
  assert evaluation.edit_distance("", "abc") == 3
  assert evaluation.edit_ratio("same", "same") == 0.0


def test_bad_shapes_are_errors():
  with pytest.raises(ValueError):
    evaluation.self_correction_metrics(np.zeros((3, 1)))
  with pytest.raises(ValueError):
    evaluation.self_correction_metrics(np.zeros((0, 2)))


def test_markdown_table_in_percent():
  m = evaluation.self_correction_metrics(np.array([[0, 1], [1, 1]], np.float32))
  table = evaluation.markdown_table({"SCoRe": m})
  assert "| SCoRe | 50.0 | 100.0 | 50.0 | 50.0 | 0.0 |" in table
