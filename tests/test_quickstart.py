"""`make quickstart` (Stage I -> Stage II -> evaluation on SmolLM2 and GSM8K) runs as the
Makefile writes it, with size overrides only (`cli.ONE_STEP`)."""

import json
import re
import shlex
import subprocess
import sys

import cli  # pylint: disable=g-bad-import-order


def make_recipe(makefile: str, target: str) -> list[str]:
  """The one-line recipe of `target` with $(PY) as python, as an argv list."""
  match = re.search(rf"^{target}:.*\n\t(.+)$", makefile, re.MULTILINE)
  assert match, f"no target {target} in the Makefile"
  return shlex.split(match.group(1).replace("$(PY)", "python"))


def test_make_recipe_is_found():
  assert make_recipe("quickstart: $(STAMP)\n\t$(PY) -m m --gin_file=q.gin\n", "quickstart") == [
      "python", "-m", "m", "--gin_file=q.gin"]


def test_quickstart_writes_the_table_and_every_evaluation(tmp_path):
  with open(f"{cli.ROOT}/Makefile") as f:
    argv = make_recipe(f.read(), "quickstart")
  proc = subprocess.run([sys.executable, *argv[1:], *cli.ONE_STEP], cwd=tmp_path, env=cli.ENV,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stderr[-3000:]}"
  workdir = tmp_path / "workdirs" / "quickstart"
  table = (workdir / "table.md").read_text()
  for row in ("base model", "Stage I only", "SCoRe"):
    assert row in table
  for sub in ("eval_base", "eval_stage1", "eval_stage2"):
    assert json.loads((workdir / sub / "results.json").read_text())["n"] == 2
  for stage in ("stage1", "stage2"):
    metrics = cli.read_jsonl(workdir / stage / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1]
