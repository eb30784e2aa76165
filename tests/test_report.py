"""The report command on small synthetic work dirs: curves of the right keys, valid PNGs,
report.md links that resolve, one error line for bad input."""

import json
import os
import re
import subprocess
import sys

from matplotlib import colors
from matplotlib import image
import numpy as np
import pytest

from score_jax.eval import evaluation
from score_jax.eval import plots
from score_jax.eval import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RL_KEYS = ("reward_t1", "reward_t2", "kl_t1", "kl_t2", "delta", "entropy", "edit_ratio", "loss")
# Keys a loose pattern would wrongly take for curves.
DECOYS = ("reward_s", "reward_wait_s", "kl_loss", "tokens_t1", "pg_loss", "step_time_s")


def rl_value(key: str, step: int, offset: float) -> float:
  """A distinct, checkable value for each (key, step, run)."""
  return offset + RL_KEYS.index(key) + step / 100 if key in RL_KEYS else -1.0


def write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def make_rl_run(directory, steps: int, offset: float):
  write_jsonl(os.path.join(directory, "metrics.jsonl"),
              [{"step": s, **{k: rl_value(k, s, offset) for k in RL_KEYS + DECOYS}}
               for s in range(1, steps + 1)])


def make_eval(directory, seed: int, n: int = 30):
  rng = np.random.default_rng(seed)
  texts = [[f"answer {i}", f"answer {i}" if rng.random() < 0.5 else f"new answer {i}!"]
           for i in range(n)]
  rewards = rng.integers(0, 2, (n, 2))
  samples = [{"id": i, "attempts": t, "rewards": r.tolist()}
             for i, (t, r) in enumerate(zip(texts, rewards))]
  evaluation.write_results(str(directory), evaluation.self_correction_metrics(rewards, texts),
                           samples)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  """A pipeline work dir as experiment.pipeline leaves it, with made-up numbers."""
  work = tmp_path_factory.mktemp("pipeline")
  write_jsonl(work / "base" / "metrics.jsonl",
              [{"step": s, "loss": 3.0 - s / 10, "token_accuracy": s / 10} for s in range(1, 9)])
  make_rl_run(work / "stage1", 6, 0.0)
  make_rl_run(work / "stage2", 60, 10.0)  # Long enough for the trailing mean.
  for i, name in enumerate(("base", "stage1", "stage2")):
    make_eval(work / f"eval_{name}", i)
  (work / "table.md").write_text("| method | Acc@t1 |\n|---|---|\n| SCoRe | 50.0 |\n")
  return work


def assert_png(path):
  """A PNG of a readable size on which the first series (colour C0) was drawn."""
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE, path
  pixels = image.imread(path)[..., :3]  # [H, W, 3] in [0, 1]
  assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600
  c0 = np.abs(pixels - colors.to_rgb("C0")).max(-1) < 0.05
  assert c0.sum() >= 30, path  # Axes and labels alone have no such pixels.


def test_read_metrics_keeps_the_last_line_of_a_repeated_step(tmp_path):
  write_jsonl(tmp_path / "metrics.jsonl",
              [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "loss": 3.0},
               {"step": 3, "loss": 2.0}])  # Resumed from step 1: step 2 written twice.
  assert report.read_metrics(str(tmp_path)) == [
      {"step": 1, "loss": 5.0}, {"step": 2, "loss": 3.0}, {"step": 3, "loss": 2.0}]


def test_curves_read_the_right_keys(pipeline):
  runs = {name: report.read_metrics(str(pipeline / name)) for name in ("base", "stage1")}
  series = plots.curve_series(runs)
  assert set(series) == {"reward", "kl", "delta", "entropy", "edit_ratio", "loss",
                         "token_accuracy"}
  assert [s.label for s in series["reward"]] == ["stage1 attempt 1", "stage1 attempt 2"]
  assert [s.label for s in series["kl"]] == ["stage1 attempt 1", "stage1 attempt 2"]
  assert [s.label for s in series["loss"]] == ["base", "stage1"]
  assert [s.label for s in series["token_accuracy"]] == ["base"]
  for group, key, attempt in (("reward", "reward_t1", 1), ("reward", "reward_t2", 2),
                              ("kl", "kl_t1", 1), ("kl", "kl_t2", 2), ("delta", "delta", 0),
                              ("entropy", "entropy", 0), ("edit_ratio", "edit_ratio", 0)):
    (line,) = [s for s in series[group] if s.attempt == attempt and s.run == "stage1"]
    np.testing.assert_array_equal(line.steps, np.arange(1, 7))
    np.testing.assert_allclose(line.values, [rl_value(key, s, 0.0) for s in range(1, 7)])
  (base_loss,) = [s for s in series["loss"] if s.run == "base"]
  np.testing.assert_allclose(base_loss.values, [3.0 - s / 10 for s in range(1, 9)])


def test_curves_of_a_run_without_rl_keys():
  series = plots.curve_series({"sft": [{"step": 1, "loss": 2.0, "reward_s": 1.0}]})
  assert list(series) == ["loss"]


def test_trailing_mean_against_a_loop():
  values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0])
  expected = [np.mean(values[max(0, i - 2):i + 1]) for i in range(len(values))]
  np.testing.assert_allclose(plots.trailing_mean(values, 3), expected)


def test_report_of_a_pipeline(pipeline, tmp_path):
  out = tmp_path / "out"
  path = report.write_report([str(pipeline)], str(out))
  assert path == str(out / "report.md")
  text = (out / "report.md").read_text()
  assert "| SCoRe | 50.0 |" in text  # table.md, verbatim.
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert sorted(links) == sorted(
      f"plots/{name}.png" for name in
      ("edit_ratio_hist", "reward", "kl", "delta", "entropy", "edit_ratio", "loss",
       "token_accuracy"))
  for link in links:
    assert not os.path.isabs(link)
    assert_png(out / link)
  for name in ("base", "stage1", "stage2"):
    assert_png(pipeline / f"eval_{name}" / evaluation.HISTOGRAM)


def test_report_of_runs_and_a_loose_evaluation(tmp_path):
  for name in ("a", "b"):
    write_jsonl(tmp_path / "runs" / name / "metrics.jsonl",
                [{"step": s, "delta": s / 10, "reward_s": 1.0} for s in range(1, 4)])
  make_eval(tmp_path / "ev", 3)
  workdirs = [str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b"), str(tmp_path / "ev")]
  path = report.write_report(workdirs, str(tmp_path / "out"))
  text = open(path).read()
  assert re.search(r"\| ev \| [0-9.]+ \|", text)  # A table of the loose evaluation, by name.
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert links == ["plots/edit_ratio_hist.png", "plots/delta.png"]
  for link in links:
    assert_png(tmp_path / "out" / link)
  runs = {n: report.read_metrics(str(tmp_path / "runs" / n)) for n in ("a", "b")}
  assert [s.label for s in plots.curve_series(runs)["delta"]] == ["a", "b"]


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such directory"),
    (lambda d: os.makedirs(d / "export"), "not a score_jax work dir"),
    (lambda d: write_jsonl(d / "metrics.jsonl", [{"step": 1}, "oops"]),
     "metrics.jsonl:2: not a JSON object"),
    (lambda d: write_jsonl(d / "metrics.jsonl", [{"loss": 1.0}]), "no integer \"step\""),
])
def test_bad_work_dirs_are_one_line_errors(tmp_path, capsys, setup, message):
  work = tmp_path / "work"
  setup(work)
  assert report.main([str(work), f"--out={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_command_line(pipeline, tmp_path):
  run = lambda *args: subprocess.run([sys.executable, "-m", "score_jax.eval.report", *args],
                                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  bad = run(str(tmp_path / "missing"), f"--out={tmp_path}")
  assert bad.returncode == 2 and bad.stderr == f"error: {tmp_path / 'missing'}: no such directory\n"
  good = run(str(pipeline / "base"), f"--out={tmp_path / 'out'}")
  assert good.returncode == 0, good.stderr
  assert good.stdout.strip() == str(tmp_path / "out" / "report.md")
  assert_png(tmp_path / "out" / "plots" / "loss.png")
