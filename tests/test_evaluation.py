"""The paper's metrics against hand-computed values; edit distances against a slow reference."""

import json

import numpy as np
import pytest

from score_jax.eval import evaluation

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def reference_edit_distance(a: str, b: str) -> int:
  """Levenshtein distance by the textbook dynamic programme, O(len(a) * len(b))."""
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def random_pairs(seed: int, count: int) -> list[list[str]]:
  """Pairs of random texts over a small alphabet (with non-ASCII), the second often an edit
  of the first."""
  rng = np.random.default_rng(seed)
  alphabet = list("ab c1=\né€😀")
  pairs = []
  for _ in range(count):
    a = "".join(rng.choice(alphabet, rng.integers(0, 30)))
    if rng.random() < 0.5:
      b = "".join(rng.choice(alphabet, rng.integers(0, 30)))
    else:
      cut = int(rng.integers(0, len(a) + 1))
      b = a[:cut] + "".join(rng.choice(alphabet, rng.integers(0, 4))) + a[cut + 1:]
    pairs.append([a, b])
  return pairs


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


def test_edit_ratio_matches_the_reference():
  assert reference_edit_distance("kitten", "sitting") == 3
  assert evaluation.edit_ratio("kitten", "sitting") == pytest.approx(3 / 13)
  assert evaluation.edit_ratio("", "abc") == 1.0
  assert evaluation.edit_ratio("", "") == 0.0
  assert evaluation.edit_ratio("same", "same") == 0.0
  pairs = random_pairs(0, 300)
  expected = [reference_edit_distance(a, b) / max(1, len(a) + len(b)) for a, b in pairs]
  assert [evaluation.edit_ratio(a, b) for a, b in pairs] == pytest.approx(expected, abs=1e-12)
  # The batched form, with extra attempts that it ignores.
  ratios = evaluation.edit_ratios([[a, b, "third"] for a, b in pairs])
  assert ratios.shape == (300,)
  assert ratios == pytest.approx(expected, abs=1e-12)


def test_bad_shapes_are_errors():
  with pytest.raises(ValueError):
    evaluation.self_correction_metrics(np.zeros((3, 1)))
  with pytest.raises(ValueError):
    evaluation.self_correction_metrics(np.zeros((0, 2)))


def test_markdown_table_in_percent():
  m = evaluation.self_correction_metrics(np.array([[0, 1], [1, 1]], np.float32))
  table = evaluation.markdown_table({"SCoRe": m})
  assert "| SCoRe | 50.0 | 100.0 | 50.0 | 50.0 | 0.0 |" in table


def test_write_results_draws_the_edit_ratio_histogram(tmp_path):
  texts = random_pairs(1, 40)
  rewards = np.random.default_rng(1).integers(0, 2, (40, 2))
  m = evaluation.self_correction_metrics(rewards, texts)
  samples = [{"id": i, "attempts": t, "rewards": r.tolist()} for i, (t, r) in
             enumerate(zip(texts, rewards))]
  evaluation.write_results(str(tmp_path), m, samples)
  assert json.loads((tmp_path / "results.json").read_text())["n"] == 40
  assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 40
  # Its content is checked in test_report.py.
  assert (tmp_path / evaluation.HISTOGRAM).read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("n, hosts", [(16, 2), (10, 3), (3, 4), (1, 1), (7, 1)])
def test_host_shares_cover_every_problem_once_with_equal_calls(n, hosts):
  examples = list(range(n))
  shares = [evaluation.host_share(examples, p, hosts) for p in range(hosts)]
  assert len({len(block) for block, _ in shares}) == 1  # Same sampler calls on every host.
  assert [x for block, real in shares for x in block[:real]] == examples


def test_per_turn_metrics_of_three_attempts():
  # t1, t2, t3: i->c->c, c->i->c, c->c->i, i->i->c
  rewards = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0], [0, 0, 1]], np.float32)
  m = evaluation.self_correction_metrics(rewards)
  assert [m["acc_t1"], m["acc_t2"], m["acc_t3"]] == pytest.approx([0.5, 0.5, 0.75])
  assert m["delta"] == 0 and m["delta_i2c"] == 0.25 and m["delta_c2i"] == 0.25
  assert m["delta_t2_t3"] == pytest.approx(0.25)
  assert m["delta_i2c_t2_t3"] == pytest.approx(0.5) and m["delta_c2i_t2_t3"] == 0.25
  table = evaluation.turn_table(m)
  assert "| 3 | 75.0 | 25.0 | 50.0 | 25.0 |" in table
