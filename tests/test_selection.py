"""The export is the checkpoint with the best smoothed training reward (or the last one).

A toy SFT run (training reward: -loss) checkpointed at every step, interrupted and resumed;
the expected smoothed rewards and the best step are recomputed here from metrics.jsonl.
"""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cli import run_cli
from score_jax import checkpoints

WINDOW = 3
SFT = ["--gin_file=sft.gin", "--gin_file=tasks/toy.gin", "--gin.toy.model_config.num_layers=1",
       "--gin.RunConfig.batch_prompts=4", "--gin.RunConfig.checkpoint_every=1",
       "--gin.RunConfig.keep_checkpoints=10", f"--gin.RunConfig.reward_window={WINDOW}",
       "--gin.RunConfig.learning_rate=1e-6"]  # The loss follows the batches, not the steps.


def _raw(path):
  """An orbax tree as saved (numpy arrays), without a target."""
  with ocp.StandardCheckpointer() as c:
    return jax.tree.map(np.asarray, c.restore(path))


def _assert_same(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """4 steps, then resumed to 6: what the export and the checkpoints hold."""
  workdir = tmp_path_factory.mktemp("sel")
  for steps in (4, 6):
    code, stderr = run_cli(*SFT, f"--gin.WORKDIR='{workdir}'", f"--gin.sft/RunConfig.steps={steps}")
    assert code == 0, stderr
  return workdir


def test_smoothed_rewards_continue_across_a_resume(run):
  with open(run / "metrics.jsonl") as f:
    losses = {m["step"]: m["loss"] for m in map(json.loads, f)}
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  rewards = [-losses[k] for k in range(1, 7)]
  with checkpoints.Checkpointer(str(run / "checkpoints"), keep=10) as ckpt:
    for k in range(1, 7):
      expected = np.mean(rewards[max(0, k - WINDOW):k])
      np.testing.assert_allclose(ckpt.reward(k), expected, rtol=1e-6)


def test_export_is_the_best_smoothed_checkpoint(run):
  with checkpoints.Checkpointer(str(run / "checkpoints"), keep=10) as ckpt:
    smoothed = {k: ckpt.reward(k) for k in range(1, 7)}
  best = max(smoothed, key=smoothed.get)
  assert best != 6  # So that the export differs from the last step's weights.
  selection = json.loads((run / "export" / "selection.json").read_text())
  assert selection["step"] == best
  assert selection["rule"] == "best" and selection["last_step"] == 6
  np.testing.assert_allclose(selection["smoothed_reward"], smoothed[best])
  export = _raw(run / "export" / "params")
  _assert_same(export, _raw(run / "checkpoints" / str(best) / "state")["params"])


def test_export_last(run, tmp_path):
  code, stderr = run_cli(*SFT, f"--gin.WORKDIR='{run}'", "--gin.sft/RunConfig.steps=6",
                         "--gin.RunConfig.export='last'")
  assert code == 0, stderr
  selection = json.loads((run / "export" / "selection.json").read_text())
  assert selection["step"] == 6 and selection["rule"] == "last"
  _assert_same(_raw(run / "export" / "params"), _raw(run / "checkpoints" / "6" / "state")["params"])


def test_moving_mean():
  m = checkpoints.MovingMean(2)
  assert [m.add(v) for v in (1.0, 3.0, 5.0)] == [1.0, 2.0, 4.0]
  resumed = checkpoints.MovingMean(2, m.values())
  assert resumed.add(7.0) == 6.0
  with pytest.raises(ValueError, match="window"):
    checkpoints.MovingMean(0)


def test_rl_run_resumes_without_the_reference_in_its_checkpoints(run, tmp_path):
  # Checkpoints leave out the frozen reference; a resumed run takes it from its source again.
  stage1 = ["--gin_file=stage1.gin", "--gin_file=tasks/toy.gin", f"--gin.WORKDIR='{tmp_path}'",
            f"--gin.BASE_WORKDIR='{run}'", "--gin.RunConfig.batch_prompts=4",
            "--gin.RunConfig.samples_per_prompt=2", "--gin.RunConfig.checkpoint_every=1",
            "--gin.RunConfig.learning_rate=1e-6"]
  for steps in (1, 2):
    code, stderr = run_cli(*stage1, f"--gin.stage1/RunConfig.steps={steps}")
    assert code == 0, stderr
  assert "Resuming stage1 from step 1" in stderr
  saved = _raw(tmp_path / "checkpoints" / "2" / "state")
  assert saved.get("ref_params") is None and jax.tree.leaves(saved["params"])
  with open(tmp_path / "metrics.jsonl") as f:
    metrics = [json.loads(line) for line in f]
  assert [m["step"] for m in metrics] == [1, 2]
  # The policy starts at the reference (the sft export) and, with a learning rate this small,
  # stays next to it: after the resume the reference is that export again.
  assert metrics[0]["kl_t1"] < 1e-6 and metrics[1]["kl_t1"] < 1e-4
