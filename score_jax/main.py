r"""Command line: `python -m score_jax.main --gin_file=stage2.gin [overrides]`.

gin files are found by name on the search path (the repository's gin/ directory and its
sub-directories), so `--gin_file=stage2.gin` works from any directory. Overrides:
`--gin_bindings='A.b = 1'` (repeatable) or `--gin.A.b=1`. The modes are in experiment.py; the
operative config is written to WORKDIR/config.gin. Bad input (a missing gin file, an unknown
binding, a missing checkpoint, a work dir of another model) ends with one line on stderr and
exit status 2.
"""

import logging as logging_std
import os
import pathlib
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import gin
import jax

from score_jax import checkpoints
from score_jax import experiment

GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin"

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "gin files, by path or by name.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "gin bindings.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Connect the processes of a multi-host run (jax.distributed); on "
    "Cloud TPU the other flags are found automatically.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

def _split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pulls `--gin.NAME=VALUE` out of argv as bindings `NAME = VALUE`."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin."):].split("=", 1)
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  return rest, bindings


class _NoGinPathNoise(logging_std.Filter):
  """gin logs 'Path not found' for every name before it tries the search path: drop that."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return not record.getMessage().startswith("Path not found")


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
  gin.add_config_file_search_path(str(GIN_DIR))
  for sub in sorted(p for p in GIN_DIR.rglob("*") if p.is_dir()):
    gin.add_config_file_search_path(str(sub))
  for f in files:
    if not os.path.exists(f) and not any((p / f).exists() for p in [GIN_DIR, *GIN_DIR.rglob("*")]
                                         if p.is_dir()):
      raise experiment.UserError(f"gin file {f!r} not found (by path, or by name under {GIN_DIR})")
  try:
    gin.parse_config_files_and_bindings(files, bindings)
  except (ValueError, KeyError, TypeError, SyntaxError) as e:
    raise experiment.UserError(f"bad gin config: {str(e).splitlines()[0]}") from None


def main(argv: Sequence[str], gin_flag_bindings: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  parse_gin(_GIN_FILE.value, list(_GIN_BINDINGS.value) + list(gin_flag_bindings))
  experiment.experiment()


def run() -> None:
  argv, gin_flag_bindings = _split_gin_flags(sys.argv)
  logging.set_verbosity(logging.WARNING)
  logging_std.getLogger().addFilter(_NoGinPathNoise())

  def wrapped(args):
    try:
      main(args, gin_flag_bindings)
    except (experiment.UserError, checkpoints.CheckpointMismatchError) as e:
      # gin appends "In call to configurable ..." lines: keep the message itself.
      print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
      sys.exit(2)

  app.run(wrapped, argv=argv)


if __name__ == "__main__":
  run()
