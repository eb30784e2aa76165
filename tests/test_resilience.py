"""Long runs that stop and go on: kill -9 and SIGTERM resumes, a non-finite stop, 2 processes."""

import json
import signal
import socket
import subprocess
import sys
import time

from cli import ENV, ROOT, TINY, read_jsonl, run_main  # pylint: disable=g-bad-import-order
from score_jax.data import pipeline as data_lib
from score_jax.data import toy
from score_jax.rl import trainer


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
  """Stage I on an FSDP mesh and a sharded evaluation in 2 JAX processes (one device each):
  the Stage I losses and the evaluation results are those of 1 process."""
  common = ["--gin_file=tasks/toy.gin", *TINY, *FSDP]
  run_main("--gin_file=sft.gin", f"--gin.WORKDIR='{tmp_path / 'base'}'", *common)
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