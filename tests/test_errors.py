"""Bad input to `python -m score_jax.main` is one line on stderr and exit status 2.

Each case is a command a user could type: settings the config lacks, data files that are
missing or malformed, a prompt too long for `RunConfig.max_prompt_len`, a work dir that is not
writable, checkpoints and exports that cannot be read. Most run the CLI in this process
(`main.run()`, the same code path as the command, without paying a JAX start-up per case);
the headline command runs as a real subprocess.
"""

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from cli import run_cli
from score_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_TASKS = ("gsm8k", "humaneval", "jsonl", "math", "mbpp", "toy")
SHIPPED_MODELS = ("gemma2_2b", "gemma3_1b", "gemma3_270m", "gemma3_4b", "gemma_2b", "gemma_7b",
                  "smollm2_135m")
REAL = ["--gin_file=tasks/gsm8k.gin", "--gin_file=models/smollm2_135m.gin"]
TOY_SFT = ["--gin_file=sft.gin", "--gin_file=tasks/toy.gin",
           "--gin.toy.model_config.num_layers=1", "--gin.RunConfig.batch_prompts=4",
           "--gin.RunConfig.checkpoint_every=1", "--gin.RunConfig.log_every=1"]


def assert_one_line(code: int, stderr: str, *expected: str) -> str:
  assert code == 2, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  for text in expected:
    assert text in lines[0], lines[0]
  return lines[0]


def test_headline_command_names_what_to_set_and_the_files_that_provide_it():
  proc = subprocess.run([sys.executable, "-m", "score_jax.main", "--gin_file=stage2.gin"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  line = assert_one_line(proc.returncode, proc.stderr, "stage2.gin", "a task file",
                         "a model file", "WORKDIR", "STAGE1_WORKDIR", "--help")
  assert "Traceback" not in proc.stderr
  for name in SHIPPED_TASKS:
    assert f"{name}," in line or f"{name})" in line
  for name in SHIPPED_MODELS:
    assert name in line


def test_help_lists_modes_shipped_gin_files_and_their_macros():
  proc = subprocess.run([sys.executable, "-m", "score_jax.main", "--help"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  for mode in ("sft", "stage1", "stage2", "multi_turn", "single_turn", "eval", "pipeline"):
    assert f" {mode}" in out.split("Gin files")[0], mode
  for name in ("stage1.gin", "stage2.gin", "eval.gin", "sft.gin", "demo.gin", "quickstart.gin",
               *(f"tasks/{t}.gin" for t in SHIPPED_TASKS),
               *(f"models/{m}.gin" for m in SHIPPED_MODELS)):
    assert f"  {name} " in out, name
  for macro in ("WORKDIR = None", "STAGE1_WORKDIR = None", "WITHOUT_STAGE1 = False",
                "BASE_WORKDIR = None", "MODEL_WORKDIR = None", "MBPP_PATH (no default",
                "TRAIN_JSONL (no default", "WEIGHTS (no default",
                "WORKDIR = 'workdirs/quickstart'"):
    assert macro in out, macro


@pytest.mark.parametrize("args, expected", [
    ([], ["the command lacks", "a mode file", "stage1, stage2"]),
    (["--gin_file=eval.gin", "--gin_file=tasks/gsm8k.gin", "--gin.WORKDIR='w'"],
     ["a model file", "smollm2_135m"]),
    (["--gin_file=stage1.gin", "--gin_file=tasks/mbpp.gin", "--gin_file=models/smollm2_135m.gin",
      "--gin.WORKDIR='w'"], ["MBPP_PATH (tasks/mbpp.gin"]),
    (["--gin_file=stage1.gin", "--gin_file=tasks/jsonl.gin", "--gin_file=models/smollm2_135m.gin",
      "--gin.WORKDIR='w'"], ["TRAIN_JSONL", "TEST_JSONL"]),
    (["--gin_file=stage1.gin", "--gin_file=tasks/gsm8k.gin", "--gin_file=models/gemma3_1b.gin",
      "--gin.WORKDIR='w'"], ["WEIGHTS (models/"]),
    (["--gin_file=stage1.gin", "--gin_file=tasks/toy.gin", "--gin.WORKDIR='w'"],
     ["BASE_WORKDIR (stage1.gin"]),
    (["--gin_file=stage2.gin", *REAL, "--gin.WORKDIR='w'"], ["STAGE1_WORKDIR (stage2.gin"]),
    (["--gin_file=stage2.gin", *REAL, "--gin.WORKDIR='w'", "--gin.STAGE1_WORKDIR='s1'",
      "--gin.WITHOUT_STAGE1=True"], ["choose one"]),
    (["--gin_file=no_such_file.gin"], ["no_such_file.gin", "not found"]),
    (["--gin_file=stage1.gin", *REAL, "--gin.WORKDIR='w'", "--gin.RunConfig.no_such_knob=1"],
     ["bad gin config", "no_such_knob"]),
    (["--gin_file=stage1.gin", *REAL, "--gin.WORKDIR='w'", "--gin.experiment.mode='stage3'"],
     ["unknown mode 'stage3'"]),
])
def test_missing_or_bad_settings(tmp_path, args, expected):
  with contextlib.chdir(tmp_path):
    assert_one_line(*run_cli(*args), *expected)
  assert not os.path.exists(tmp_path / "w")  # Refused before anything was written.


def test_gin_file_importing_a_module_by_its_old_name(tmp_path):
  old = tmp_path / "old.gin"
  old.write_text("import score_jax.trainer\n")
  with contextlib.chdir(tmp_path):
    assert_one_line(*run_cli(f"--gin_file={old}"), "bad gin config",
                    "No module named 'score_jax.trainer'", "moved to score_jax.rl.trainer")
    old.write_text("import score_jax.no_such_module\n")
    line = assert_one_line(*run_cli(f"--gin_file={old}"), "bad gin config",
                           "No module named 'score_jax.no_such_module'")
    assert "moved" not in line


def test_moved_modules_name_modules_that_exist_and_old_names_that_do_not():
  for old, new in main_lib.MOVED_MODULES.items():
    assert importlib.util.find_spec(f"score_jax.{new}") is not None, new
    assert importlib.util.find_spec(f"score_jax.{old}") is None, old


def _nothing_but_config(workdir) -> None:
  """After a refused run the work dir holds at most its config.gin: nothing to resume."""
  assert set(os.listdir(workdir)) <= {"config.gin"}, os.listdir(workdir)


def test_stage2_from_a_stage1_work_dir_without_export(tmp_path):
  assert_one_line(*run_cli(
      "--gin_file=stage2.gin", *REAL, f"--gin.WORKDIR='{tmp_path / 'w'}'",
      f"--gin.STAGE1_WORKDIR='{tmp_path / 'stage1'}'"),
      f"no exported model in '{tmp_path / 'stage1'}'", "run the previous stage first")
  _nothing_but_config(tmp_path / "w")


def test_missing_data_file(tmp_path):
  line = assert_one_line(*run_cli(
      "--gin_file=stage1.gin", *REAL, f"--gin.WORKDIR='{tmp_path / 'w'}'",
      "--gin.tasks.make_task.train_path='/nonexistent/train.jsonl'"),
      "/nonexistent/train.jsonl", "'train'", "gsm8k")
  assert "No such file" in line
  _nothing_but_config(tmp_path / "w")


def test_missing_mbpp_file_named_by_its_macro(tmp_path):
  assert_one_line(*run_cli(
      "--gin_file=stage1.gin", "--gin_file=tasks/mbpp.gin", "--gin_file=models/smollm2_135m.gin",
      f"--gin.WORKDIR='{tmp_path / 'w'}'", "--gin.MBPP_PATH='/nonexistent/mbpp.jsonl'"),
      "/nonexistent/mbpp.jsonl", "experiment.task")


def test_task_jsonl_with_a_bad_line(tmp_path):
  good = tmp_path / "test.jsonl"
  good.write_text('{"problem": "1 + 1?", "answer": "2"}\n')
  bad = tmp_path / "train.jsonl"
  bad.write_text('{"problem": "1 + 1?", "answer": "2"}\n\n{"problem": "2 + 2?", "answer": \n')
  assert_one_line(*run_cli(
      "--gin_file=stage1.gin", "--gin_file=tasks/jsonl.gin", "--gin_file=models/smollm2_135m.gin",
      f"--gin.WORKDIR='{tmp_path / 'w'}'", f"--gin.TRAIN_JSONL='{bad}'",
      f"--gin.TEST_JSONL='{good}'"), f"{bad}:3 is not valid JSON")
  _nothing_but_config(tmp_path / "w")


def test_work_dir_that_is_not_writable(tmp_path):
  (tmp_path / "a_file").write_text("")
  workdir = tmp_path / "a_file" / "run"
  assert_one_line(*run_cli("--gin_file=stage1.gin", *REAL, f"--gin.WORKDIR='{workdir}'"),
                  str(workdir), "WORKDIR", "not writable")


def test_prompt_longer_than_max_prompt_len(tmp_path):
  workdir = tmp_path / "w"
  assert_one_line(*run_cli(*TOY_SFT, f"--gin.WORKDIR='{workdir}'",
                           "--gin.RunConfig.max_prompt_len=10"),
                  "RunConfig.max_prompt_len=10", "--gin.RunConfig.max_prompt_len=13 or more",
                  "toy_arithmetic")
  _nothing_but_config(workdir)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  """A finished 2-step toy sft run: checkpoints 1 and 2 and an export."""
  workdir = tmp_path_factory.mktemp("sft")
  code, stderr = run_cli(*TOY_SFT, f"--gin.WORKDIR='{workdir}'", "--gin.sft/RunConfig.steps=2")
  assert code == 0, stderr
  return workdir


def _garble(directory) -> None:
  """Overwrites every file under `directory` with bytes no reader accepts."""
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbled")


@pytest.mark.parametrize("damaged, expected", [
    ("2/state", "cannot read checkpoint 2 in {}"),  # The arrays.
    ("2", "cannot read the checkpoints in {}"),     # Its metadata too: orbax cannot list it.
])
def test_unreadable_checkpoint(sft_dir, tmp_path, damaged, expected):
  workdir = tmp_path / "w"
  shutil.copytree(sft_dir, workdir)
  _garble(workdir / "checkpoints" / damaged)
  assert_one_line(*run_cli(*TOY_SFT, f"--gin.WORKDIR='{workdir}'", "--gin.sft/RunConfig.steps=3"),
                  expected.format(workdir / "checkpoints"), "delete")
  if damaged != "2":
    return
  # As the message says: without the damaged step the run resumes from step 1.
  shutil.rmtree(workdir / "checkpoints" / "2")
  code, stderr = run_cli(*TOY_SFT, f"--gin.WORKDIR='{workdir}'", "--gin.sft/RunConfig.steps=3")
  assert code == 0 and "Resuming sft from step 1" in stderr, stderr


def test_unreadable_export(sft_dir, tmp_path):
  base = tmp_path / "base"
  shutil.copytree(sft_dir, base)
  _garble(base / "export" / "params")
  assert_one_line(*run_cli(
      "--gin_file=stage1.gin", "--gin_file=tasks/toy.gin", f"--gin.WORKDIR='{tmp_path / 'w'}'",
      f"--gin.BASE_WORKDIR='{base}'"), f"cannot read the exported model in {base / 'export'}")


def test_work_dir_of_another_mode(sft_dir, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(sft_dir, workdir)
  assert_one_line(*run_cli(
      "--gin_file=stage1.gin", "--gin_file=tasks/toy.gin", "--gin.toy.model_config.num_layers=1",
      f"--gin.WORKDIR='{workdir}'", f"--gin.BASE_WORKDIR='{sft_dir}'"),
      "checkpoint 2", "is from a sft run, not stage1", "fresh work dir")
