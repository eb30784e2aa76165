"""Every `python -m score_jax.main` command of README.md runs as written.

The commands are read from README.md's code blocks, so the test follows the documentation. They
run in order in one scratch directory (so relative work dirs such as 'workdirs/stage1' chain the
stages as in the README), each with size overrides only (`cli.ONE_STEP`: one step, 2 prompts x
1 sample, 8 new tokens, 2 evaluation problems). `make quickstart` is tests/test_quickstart.py,
which runs the same Stage I -> Stage II -> evaluation chain (SmolLM2, GSM8K) in `make test`; the
commands as the README writes them run in `make test-all` (slow: ~4 minutes of CI's budget).
"""

import json
import re
import shlex
import subprocess
import sys

import pytest

import cli  # pylint: disable=g-bad-import-order

COMMAND = "python -m score_jax.main"


def readme_commands(text: str) -> list[list[str]]:
  """The `python -m score_jax.main` commands in the markdown's code blocks, as argv lists."""
  commands = []
  for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  #")[0].strip()
      if line.startswith(COMMAND):
        commands.append(shlex.split(line))
  return commands


def test_readme_commands_are_found():
  text = "```\npython -m score_jax.main --gin_file=a.gin \\\n    --gin.X=\"'y'\"  # note\n```\n"
  assert readme_commands(text) == [["python", "-m", "score_jax.main", "--gin_file=a.gin",
                                    "--gin.X='y'"]]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
  """Runs every command in order in one scratch directory: [(argv, stderr)]."""
  with open(f"{cli.ROOT}/README.md") as f:
    commands = readme_commands(f.read())
  assert commands, "README.md has no python -m score_jax.main command"
  cwd = tmp_path_factory.mktemp("readme")
  results = []
  for argv in commands:
    proc = subprocess.run([sys.executable, *argv[1:], *cli.ONE_STEP], cwd=cwd, env=cli.ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stderr[-3000:]}"
    results.append((argv, proc.stderr))
  return cwd, results


def _workdir(argv: list[str]) -> str:
  for arg in argv:
    if arg.startswith("--gin.WORKDIR="):
      return shlex.split(arg.split("=", 1)[1])[0]
  raise AssertionError(f"{shlex.join(argv)} sets no WORKDIR")


@pytest.mark.slow  # ~4 min; `make test` runs the same chain on SmolLM2/GSM8K as the quickstart.
def test_every_command_ran_and_wrote_its_outputs(ran):
  cwd, results = ran
  modes = set()
  for argv, _ in results:
    gin_files = [a.split("=", 1)[1] for a in argv if a.startswith("--gin_file=")]
    workdir = cwd / _workdir(argv)
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
  assert {"stage1.gin", "stage2.gin", "eval.gin"} <= modes, modes
