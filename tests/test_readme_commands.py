"""Every `python -m score_jax.main` command of README.md, and `make quickstart`, runs as written.

The commands are read from README.md's code blocks (and the quickstart target's recipe from the
Makefile), so the test follows the documentation. They run in order in one scratch directory
(so relative work dirs such as 'workdirs/stage1' chain the stages as in the README), each with
size overrides only: one step, 2 prompts x 1 sample, 8 new tokens, 2 evaluation problems.
Like every test, they share the session's compilation cache (conftest.py), so a program
compiled for one is reused by the next.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = "python -m score_jax.main"
TINY = [  # Sizes only; every mode's scope, as gin files may set scoped values.
    *(f"--gin.{scope}RunConfig.steps=1" for scope in ("", "sft/", "stage1/", "stage2/")),
    "--gin.RunConfig.batch_prompts=2", "--gin.RunConfig.samples_per_prompt=1",
    "--gin.RunConfig.max_new_tokens=8", "--gin.RunConfig.reward_workers=1",
    "--gin.eval_config.num_problems=2", "--gin.eval_config.batch_size=2",
]


def readme_commands(text: str) -> list[list[str]]:
  """The `python -m score_jax.main` commands in the markdown's code blocks, as argv lists."""
  commands = []
  for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  #")[0].strip()
      if line.startswith(COMMAND):
        commands.append(shlex.split(line))
  return commands


def make_recipe(makefile: str, target: str) -> list[str]:
  """The one-line recipe of `target` with $(PY) as python, as an argv list."""
  match = re.search(rf"^{target}:.*\n\t(.+)$", makefile, re.MULTILINE)
  assert match, f"no target {target} in the Makefile"
  return shlex.split(match.group(1).replace("$(PY)", "python"))


def test_readme_commands_are_found():
  text = "```\npython -m score_jax.main --gin_file=a.gin \\\n    --gin.X=\"'y'\"  # note\n```\n"
  assert readme_commands(text) == [["python", "-m", "score_jax.main", "--gin_file=a.gin",
                                    "--gin.X='y'"]]
  assert make_recipe("quickstart: $(STAMP)\n\t$(PY) -m m --gin_file=q.gin\n", "quickstart") == [
      "python", "-m", "m", "--gin_file=q.gin"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
  """Runs every command in order in one scratch directory: [(argv, stderr)]."""
  with open(os.path.join(ROOT, "README.md")) as f:
    commands = readme_commands(f.read())
  with open(os.path.join(ROOT, "Makefile")) as f:
    quickstart = make_recipe(f.read(), "quickstart")
  assert commands, "README.md has no python -m score_jax.main command"
  if quickstart not in commands:
    commands.append(quickstart)
  cwd = tmp_path_factory.mktemp("readme")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  results = []
  for argv in commands:
    proc = subprocess.run([sys.executable, *argv[1:], *TINY], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stderr[-3000:]}"
    results.append((argv, proc.stderr))
  return cwd, results


def _workdir(argv: list[str], default: str) -> str:
  for arg in argv:
    if arg.startswith("--gin.WORKDIR="):
      return shlex.split(arg.split("=", 1)[1])[0]
  return default


def test_every_command_ran_and_wrote_its_outputs(ran):
  cwd, results = ran
  modes = set()
  for argv, stderr in results:
    gin_files = [a.split("=", 1)[1] for a in argv if a.startswith("--gin_file=")]
    workdir = cwd / _workdir(argv, "workdirs/quickstart")
    if "stage1.gin" in gin_files or "stage2.gin" in gin_files:
      modes.add(gin_files[0])
      metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
      assert [m["step"] for m in metrics] == [1]
      assert 0.0 <= metrics[0]["reward_t2"] <= 1.0
      selection = json.loads((workdir / "export" / "selection.json").read_text())
      assert selection["step"] == 1
      if "stage1.gin" in gin_files:
        assert metrics[0]["kl_t1"] < 1e-4  # The policy is the reference at the first step.
    elif "eval.gin" in gin_files:
      modes.add("eval.gin")
      assert json.loads((workdir / "results.json").read_text())["n"] == 2
    elif "quickstart.gin" in gin_files:
      modes.add("quickstart.gin")
      table = (workdir / "table.md").read_text()
      for row in ("base model", "Stage I only", "SCoRe"):
        assert row in table
      for sub in ("eval_base", "eval_stage1", "eval_stage2"):
        assert json.loads((workdir / sub / "results.json").read_text())["n"] == 2
  assert {"stage1.gin", "stage2.gin", "eval.gin", "quickstart.gin"} <= modes, modes
