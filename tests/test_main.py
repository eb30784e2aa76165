"""End to end through `python -m score_jax.main`: the pipeline and every mode for a few steps."""

import json

import pytest

from cli import TINY, read_jsonl, run_main  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  """The demo pipeline, tiny: sft -> eval -> stage1 -> stage2 -> evals, from another cwd."""
  work = tmp_path_factory.mktemp("demo")
  run_main("--gin_file=demo.gin", f"--gin.WORKDIR='{work}'", *TINY, cwd=str(work))
  return work


def test_pipeline_runs_every_stage_and_writes_the_table(pipeline_dir):
  table = (pipeline_dir / "table.md").read_text()
  for row in ("base model", "Stage I only", "SCoRe"):
    assert row in table
  for stage in ("base", "stage1", "stage2"):
    assert (pipeline_dir / stage / "export" / "model_config.json").exists()
    steps = [m["step"] for m in read_jsonl(pipeline_dir / stage / "metrics.jsonl")]
    assert steps[-1] >= 2
    assert list((pipeline_dir / stage / "tensorboard").iterdir())
  results = json.loads((pipeline_dir / "eval_stage2" / "results.json").read_text())
  assert results["n"] == 16
  for key in ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i"):
    assert 0.0 <= abs(results[key]) <= 1.0
  assert abs(results["delta"] - (results["delta_i2c"] - results["delta_c2i"])) < 1e-9
  rl = read_jsonl(pipeline_dir / "stage2" / "metrics.jsonl")[-1]
  for key in ("reward_t1", "reward_t2", "kl_t1", "kl_t2", "entropy", "edit_ratio",
              "step_time_s", "reward_wait_s"):
    assert key in rl
  assert "experiment.mode = 'pipeline'" in (pipeline_dir / "config.gin").read_text()


@pytest.mark.parametrize("mode", ["stage1", "stage2", "stage2_without_stage1", "multi_turn",
                                  "single_turn", "eval"])
def test_each_mode_from_its_gin_file(pipeline_dir, tmp_path, mode):
  gin_file = {"multi_turn": "stage2.gin", "single_turn": "stage1.gin",
              "stage2_without_stage1": "stage2.gin"}.get(mode, mode + ".gin")
  if mode == "stage2_without_stage1":  # The paper's ablation: Stage II from the base model.
    mode = "stage2"
    extra = ["--gin.WITHOUT_STAGE1=True"]
  else:
    extra = []
  args = [f"--gin_file={gin_file}", "--gin_file=tasks/toy.gin", f"--gin.WORKDIR='{tmp_path}'",
          f"--gin.BASE_WORKDIR='{pipeline_dir / 'base'}'", *TINY,
          f"--gin.{mode}/RunConfig.steps=2", *extra]
  if mode in ("stage2", "multi_turn") and not extra:
    args.append(f"--gin.STAGE1_WORKDIR='{pipeline_dir / 'stage1'}'")
  if mode in ("multi_turn", "single_turn"):
    args.append(f"--gin.experiment.mode='{mode}'")
  if mode == "eval":
    args.append(f"--gin.MODEL_WORKDIR='{pipeline_dir / 'stage2'}'")
  proc = run_main(*args, "--gin.eval_config.num_problems=8")
  if mode == "eval":
    assert json.loads((tmp_path / "results.json").read_text())["n"] == 8
    assert "Acc@t1" in proc.stdout
  else:
    assert (tmp_path / "export" / "model_config.json").exists()
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert metrics[-1]["step"] == 2
    if extra:  # Started from the base model, which is also the KL reference.
      assert metrics[0]["kl_t1"] < 1e-6 and metrics[0]["kl_t2"] < 1e-6


def test_workdir_with_checkpoint_of_another_model_shape(pipeline_dir, tmp_path):
  sft = ["--gin_file=sft.gin", "--gin_file=tasks/toy.gin", f"--gin.WORKDIR='{tmp_path}'",
         *TINY]
  run_main(*sft)
  proc = run_main(*sft, "--gin.sft/RunConfig.steps=6", "--gin.toy.model_config.embed_dim=64",
                  check=False)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert "shape" in proc.stderr
