"""`python -m score_jax.main ARGS` from tests: in the test process (`run_cli`, no JAX start-up
per command) or in a subprocess (`run_main`, any working directory)."""

import contextlib
import io
import json
import os
import subprocess
import sys

from absl import flags
import gin

from score_jax import main


def run_cli(*args: str) -> tuple[int, str]:
  """Runs the command line `main.run()` with `args`: (exit status, stderr)."""
  flags.FLAGS.unparse_flags()
  gin.clear_config()
  argv = sys.argv
  sys.argv = ["score_jax.main", "--compilation_cache_dir=", *args]
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):
      main.run()
    code = 0
  except SystemExit as e:
    code = e.code or 0
  finally:
    sys.argv = argv
    gin.clear_config()
  return code, err.getvalue()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [  # A few steps of everything, small batches, few eval problems.
    "--gin.toy.model_config.num_layers=1",
    "--gin.sft/RunConfig.steps=4", "--gin.stage1/RunConfig.steps=2",
    "--gin.stage2/RunConfig.steps=2", "--gin.RunConfig.batch_prompts=4",
    "--gin.RunConfig.samples_per_prompt=2", "--gin.RunConfig.log_every=1",
    "--gin.eval_config.num_problems=16", "--gin.eval_config.batch_size=8",
    "--gin.RunConfig.reward_workers=1",
    "--gin.ToyArithmetic.num_train=2000",
]

ONE_STEP = [  # Sizes only, for real-model commands; every mode's scope, as gin files scope them.
    *(f"--gin.{scope}RunConfig.steps=1" for scope in ("", "sft/", "stage1/", "stage2/")),
    "--gin.RunConfig.batch_prompts=2", "--gin.RunConfig.samples_per_prompt=1",
    "--gin.RunConfig.max_new_tokens=8", "--gin.RunConfig.reward_workers=1",
    "--gin.eval_config.num_problems=2", "--gin.eval_config.batch_size=2",
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
