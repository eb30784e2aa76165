"""End to end through `python -m score_jax.main`: every mode for a few steps, bad input, resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from score_jax import data as data_lib
from score_jax import toy
from score_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [  # A few steps of everything, small batches, few eval problems.
    "--gin.toy.model_config.num_layers=1",
    "--gin.sft/RunConfig.steps=4", "--gin.stage1/RunConfig.steps=2",
    "--gin.stage2/RunConfig.steps=2", "--gin.RunConfig.batch_prompts=4",
    "--gin.RunConfig.samples_per_prompt=2", "--gin.RunConfig.log_every=1",
    "--gin.eval_config.num_problems=16", "--gin.eval_config.batch_size=8",
    "--gin.RunConfig.reward_workers=1",
]


ENV = dict(os.environ, JAX_PLATFORMS="cpu",  # This checkout's package, from any cwd.
           PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


def run_main(*args, cwd=None, timeout=600, check=True):
  proc = subprocess.run([sys.executable, "-m", "score_jax.main", *args], cwd=cwd or ROOT,
                        capture_output=True, text=True, timeout=timeout, env=ENV)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
  return proc


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


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


def test_kill_9_then_restart_continues_with_same_data_order(tmp_path):
  args = ["--gin_file=sft.gin", "--gin_file=tasks/toy.gin", f"--gin.WORKDIR='{tmp_path}'",
          "--gin.sft/RunConfig.steps=400", "--gin.RunConfig.checkpoint_every=3",
          "--gin.RunConfig.batch_prompts=8", "--gin.toy.model_config.num_layers=1"]
  proc = subprocess.Popen([sys.executable, "-m", "score_jax.main", *args], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:  # Kill once a few checkpoints exist.
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = read_jsonl(metrics)[-1]["step"]
  assert killed_at < 400
  run_main(*args, "--gin.sft/RunConfig.steps=" + str(killed_at + 4))
  lines = read_jsonl(metrics)
  # Resumed from the last complete checkpoint (a multiple of 3) and went on from there.
  resumed = [m["step"] for m in lines[len(lines) - (killed_at + 4 - (killed_at // 3) * 3):]]
  assert resumed == list(range((killed_at // 3) * 3 + 1, killed_at + 5))
  # Each step saw exactly the batch an uninterrupted run sees at that step.
  task = toy.ToyArithmetic()
  it = data_lib.PromptIterator(task.examples("train"), 8, seed=0)
  expected = [trainer.batch_hash(next(it)) for _ in range(killed_at + 4)]
  for m in lines:
    assert m["batch_hash"] == expected[m["step"] - 1]


def test_sigterm_saves_the_current_step_then_the_rerun_resumes_it_exactly(tmp_path):
  # No periodic checkpoint before step 400: the only one is SIGTERM's.
  args = ["--gin_file=sft.gin", "--gin_file=tasks/toy.gin", f"--gin.WORKDIR='{tmp_path}'",
          "--gin.sft/RunConfig.steps=400", "--gin.RunConfig.checkpoint_every=400",
          "--gin.RunConfig.batch_prompts=8", "--gin.toy.model_config.num_layers=1"]
  proc = subprocess.Popen([sys.executable, "-m", "score_jax.main", *args], cwd=ROOT, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  stderr = proc.communicate(timeout=300)[1]
  assert proc.returncode == 143, stderr
  stopped_at = read_jsonl(metrics)[-1]["step"]
  assert f"preempted: SIGTERM: saved step {stopped_at} of 400" in stderr
  assert "Traceback" not in stderr
  run_main(*args, f"--gin.sft/RunConfig.steps={stopped_at + 2}")
  lines = read_jsonl(metrics)
  assert [m["step"] for m in lines] == list(range(1, stopped_at + 3))  # Nothing redone.
  task = toy.ToyArithmetic()
  it = data_lib.PromptIterator(task.examples("train"), 8, seed=0)
  assert [m["batch_hash"] for m in lines] == [trainer.batch_hash(next(it)) for _ in lines]


def test_non_finite_loss_stops_keeping_the_last_good_checkpoint(tmp_path):
  # Adam moves every weight by ~lr: 1e30 overflows the second step's forward.
  proc = run_main("--gin_file=sft.gin", "--gin_file=tasks/toy.gin", f"--gin.WORKDIR='{tmp_path}'",
                  *TINY, "--gin.RunConfig.learning_rate=1e30",
                  "--gin.RunConfig.checkpoint_every=1", check=False)
  assert proc.returncode == 2, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: step 2: non-finite "), last
  assert "the last good checkpoint is step 1" in last
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [1]
  assert not (tmp_path / "export").exists()


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(*args):
  """The same command in 2 JAX processes connected through a localhost coordinator."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "score_jax.main", "--distributed",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
       *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=ENV) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  return outs


FSDP = ["--gin.partitioning.mesh_shape.data=1", "--gin.partitioning.mesh_shape.fsdp=-1"]


def test_two_processes_train_and_evaluate_as_one(tmp_path):
  """SFT, Stage I on an FSDP mesh and a sharded evaluation in 2 JAX processes (one device
  each): the Stage I losses and the evaluation results are those of 1 process."""
  common = ["--gin_file=tasks/toy.gin", *TINY, *FSDP]
  run_two_processes("--gin_file=sft.gin", f"--gin.WORKDIR='{tmp_path / 'base'}'", *common)
  stage1 = [f"--gin.BASE_WORKDIR='{tmp_path / 'base'}'", *common]
  run_two_processes("--gin_file=stage1.gin", f"--gin.WORKDIR='{tmp_path / 'two'}'", *stage1)
  run_main("--gin_file=stage1.gin", f"--gin.WORKDIR='{tmp_path / 'one'}'", *stage1)
  two, one = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("two", "one"))
  assert [m["step"] for m in two] == [m["step"] for m in one] == [1, 2]
  for a, b in zip(two, one):
    assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
  evaluate = ["--gin_file=eval.gin", f"--gin.MODEL_WORKDIR='{tmp_path / 'two'}'", *common]
  run_two_processes(*evaluate, f"--gin.WORKDIR='{tmp_path / 'eval_two'}'")
  run_main(*evaluate, f"--gin.WORKDIR='{tmp_path / 'eval_one'}'")
  results = [json.loads((tmp_path / d / "results.json").read_text())
             for d in ("eval_two", "eval_one")]
  assert results[0]["n"] == 16
  assert results[0] == results[1]  # The same samples: the same numbers.
  samples = [(tmp_path / d / "samples.jsonl").read_text() for d in ("eval_two", "eval_one")]
  assert samples[0] == samples[1]