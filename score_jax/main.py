r"""Command line: `python -m score_jax.main --gin_file=stage1.gin --gin_file=tasks/gsm8k.gin \
    --gin_file=models/smollm2_135m.gin --gin.WORKDIR="'workdirs/stage1'"`.

A run is one mode file (stage1.gin, stage2.gin, eval.gin, sft.gin, or the whole pipeline:
demo.gin, quickstart.gin), a task file (tasks/*.gin) and a model file (models/*.gin), plus the
macros they name. gin files are found by name on the search path (the repository's gin/
directory and its sub-directories), so `--gin_file=stage2.gin` works from any directory.
Overrides: `--gin_bindings='A.b = 1'` (repeatable) or `--gin.A.b=1`. The operative config is
written to WORKDIR/config.gin. `--help` lists the modes and every shipped gin file with its
macros.

Bad input ends with one line on stderr and exit status 2, before anything is trained: settings
the config lacks (`experiment.missing_settings` and macros used but never defined, with the gin
files that provide each), a missing gin file, an unknown binding, a task's data file that is
missing or malformed, a prompt longer than `RunConfig.max_prompt_len`, a work dir that is not
writable, a checkpoint or export that cannot be read or belongs to another model.

Compiled programs are cached on disk (`--compilation_cache_dir`), so the stages of a run and
later runs with the same shapes skip XLA compilation.
"""

import logging as logging_std
import os
import pathlib
import re
import sys
import textwrap
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import gin
import jax

from score_jax import checkpoints
from score_jax import experiment
from score_jax import preemption

PREEMPTED_STATUS = 143  # As a process ended by SIGTERM: a scheduler runs it again.
GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin"

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "gin files, by path or by name.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "gin bindings.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Connect the processes of a multi-host run (jax.distributed); on "
    "Cloud TPU the other flags are found automatically.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "score_jax", "xla"),
    "Persistent cache of compiled programs ('' disables it; the environment variable "
    "JAX_COMPILATION_CACHE_DIR takes precedence).")

# The groups of shipped gin files, as --help and error messages list them.
_GROUPS = (("modes", ""), ("tasks", "tasks"), ("models", "models"))
_INCLUDE_RE = re.compile(r"^include\s+['\"]([^'\"]+)['\"]", re.MULTILINE)
_MACRO_DEF_RE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(.+?)\s*$", re.MULTILINE)
_MACRO_USE_RE = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)")
_MACRO_DOC_RE = re.compile(r"^#\s+([A-Z][A-Z0-9_]*):\s+(.*?)\s*$", re.MULTILINE)


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


# ------------------------------------------------------------------------------------------
# The shipped gin files: what they are and which macros they take.


def _find_gin(name: str) -> Optional[pathlib.Path]:
  """A gin file by path, or by name under GIN_DIR and its sub-directories."""
  if os.path.isfile(name):
    return pathlib.Path(name)
  for directory in [GIN_DIR, *sorted(p for p in GIN_DIR.rglob("*") if p.is_dir())]:
    if (directory / name).is_file():
      return directory / name
  return None


def _gin_name(path: pathlib.Path) -> str:
  """"tasks/gsm8k.gin" for a shipped file, else the path."""
  try:
    return str(path.resolve().relative_to(GIN_DIR))
  except ValueError:
    return str(path)


def _gin_text(path: pathlib.Path) -> str:
  """The file's text with each include replaced by the included text, recursively."""

  def inline(match: re.Match) -> str:
    included = _find_gin(match.group(1))
    return match.group(0) if included is None else _gin_text(included)

  return _INCLUDE_RE.sub(inline, path.read_text())


def _summary(path: pathlib.Path) -> str:
  """The first sentence of the file's leading comment."""
  words = []
  for line in path.read_text().splitlines():
    if not line.startswith("#"):
      break
    words.append(line[1:].strip())
  return re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(words))[0]


def _code(text: str) -> str:
  """gin text without its comment lines."""
  return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _macro_docs() -> dict[str, tuple[str, str]]:
  """{macro: (shipped file that documents it, description)} from lines "#   NAME: text"."""
  docs = {}
  for path in sorted(GIN_DIR.rglob("*.gin")):
    for name, text in _MACRO_DOC_RE.findall(path.read_text()):
      docs.setdefault(name, (_gin_name(path), text))
  return docs


def _shipped(group: str) -> list[str]:
  """Names of the shipped gin files of one group ("" for the mode files)."""
  return sorted(p.stem for p in (GIN_DIR / group).glob("*.gin"))


def help_text() -> str:
  """--help: this module's docstring, the modes, every shipped gin file with its macros."""
  lines = [__doc__.strip(), "", "Modes (experiment.mode):"]
  lines += [line for line in experiment.__doc__.splitlines() if line.startswith("  ")]
  docs = _macro_docs()
  for title, group in _GROUPS:
    lines += ["", f"Gin files: {title}" + (f" ({group}/NAME.gin)" if group else "")]
    for stem in _shipped(group):
      path = GIN_DIR / group / f"{stem}.gin"
      lines += textwrap.wrap(_summary(path), 100, initial_indent=f"  {_gin_name(path):24s}",
                             subsequent_indent=" " * 26)
      text = _code(_gin_text(path))
      defaults = dict(_MACRO_DEF_RE.findall(text))
      for macro in dict.fromkeys([*defaults, *_MACRO_USE_RE.findall(text)]):
        value = f"= {defaults[macro]}" if macro in defaults else "(no default: set it)"
        lines += textwrap.wrap(f"{macro} {value}: {docs.get(macro, ('', ''))[1]}", 100,
                               initial_indent=" " * 28, subsequent_indent=" " * 32)
  lines += ["", "Flags:", flags.FLAGS.module_help(sys.modules[__name__])]
  return "\n".join(lines)


def _undefined_macros(files: Sequence[str], bindings: Sequence[str]) -> list[str]:
  """Macros that the config uses (%NAME) but nothing defines."""
  text = "\n".join([*(_gin_text(_find_gin(f)) for f in files), *bindings])
  undefined = []
  for name in dict.fromkeys(_MACRO_USE_RE.findall(_code(text))):
    try:
      gin.query_parameter("%" + name)
    except ValueError:
      undefined.append(name)
  return undefined


def missing_message(files: Sequence[str], missing: Sequence[str]) -> str:
  """One line: what the config lacks and the gin files or flags that provide each."""
  docs = _macro_docs()
  parts = []
  for name in missing:
    if name == "mode":
      parts.append("a mode file (--gin_file=NAME.gin, NAME one of "
                   f"{', '.join(_shipped(''))})")
    elif name in ("task", "model"):
      group = name + "s"
      parts.append(f"a {name} file (--gin_file={group}/NAME.gin, NAME one of "
                   f"{', '.join(_shipped(group))})")
    else:
      where, what = docs.get(name, ("", ""))
      hint = f"{where}: {what}; " if where else ""
      parts.append(f"{name} ({hint}--gin.{name}=...)")
  given = " + ".join(os.path.basename(f) for f in files) or "the command"
  return f"{given} lacks: " + "; ".join(parts) + ". See --help."


# Modules that moved into subpackages (models/, decoding/, rl/, data/, eval/, export/): a
# user's gin file that imports one by its old name gets the new one in its error.
MOVED_MODULES = {
    "model": "models.transformer", "configs": "models.configs", "loading": "models.loading",
    "gguf_file": "models.gguf_file", "vocab": "models.vocab", "chat": "models.chat",
    "sampler": "decoding.sampler", "sampling": "decoding.sampling",
    "generate": "decoding.generate", "objectives": "rl.objectives", "logprobs": "rl.logprobs",
    "train_step": "rl.train_step", "modes": "rl.modes", "trainer": "rl.trainer",
    "rollout": "rl.rollout", "tasks": "data.tasks", "seqio_tasks": "data.seqio_tasks",
    "toy": "data.toy", "evaluation": "eval.evaluation", "report": "eval.report",
    "plots": "eval.plots", "ablations": "eval.ablations", "scaling": "eval.scaling",
}  # (data.py and export.py became the packages of those names: their imports still work.)


def _import_error(e: ImportError) -> str:
  """One line for a gin file's failed import, with the new name of a moved module."""
  line = str(e).splitlines()[0]
  missing = getattr(e.__context__, "name", None) or ""
  old = missing.removeprefix("score_jax.")
  if missing.startswith("score_jax.") and old in MOVED_MODULES:
    line += f": it moved to score_jax.{MOVED_MODULES[old]} (import that in your gin file)"
  return f"bad gin config: {line}"


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses the gin files and bindings; UserError for anything missing or malformed."""
  gin.add_config_file_search_path(str(GIN_DIR))
  for sub in sorted(p for p in GIN_DIR.rglob("*") if p.is_dir()):
    gin.add_config_file_search_path(str(sub))
  for f in files:
    if _find_gin(f) is None:
      raise experiment.UserError(f"gin file {f!r} not found (by path, or by name under "
                                 f"{GIN_DIR}); see --help for the shipped ones")
  try:
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
  except (ValueError, KeyError, TypeError, SyntaxError) as e:
    raise experiment.UserError(f"bad gin config: {str(e).splitlines()[0]}") from None
  except ImportError as e:
    raise experiment.UserError(_import_error(e)) from None
  missing = list(dict.fromkeys(experiment.missing_settings() +
                               _undefined_macros(files, bindings)))
  if missing:
    raise experiment.UserError(missing_message(files, missing))
  try:
    gin.finalize()
  except (ValueError, KeyError, TypeError) as e:
    raise experiment.UserError(f"bad gin config: {str(e).splitlines()[0]}") from None


def main(argv: Sequence[str], gin_flag_bindings: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CACHE_DIR.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR.value)
  if _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  parse_gin(_GIN_FILE.value, list(_GIN_BINDINGS.value) + list(gin_flag_bindings))
  experiment.experiment()


def run() -> None:
  argv, gin_flag_bindings = _split_gin_flags(sys.argv)
  if any(a in ("--help", "-h", "--helpfull", "-?") for a in argv[1:]):
    print(help_text())
    return
  logging.set_verbosity(logging.WARNING)
  logging_std.getLogger().addFilter(_NoGinPathNoise())

  def wrapped(args):
    try:
      main(args, gin_flag_bindings)
    except (experiment.UserError, checkpoints.CheckpointMismatchError) as e:
      # gin appends "In call to configurable ..." lines: keep the message itself.
      print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
      sys.exit(2)
    except preemption.Preempted as e:
      print(f"preempted: {str(e).splitlines()[0]}", file=sys.stderr)
      sys.exit(PREEMPTED_STATUS)

  app.run(wrapped, argv=argv)


if __name__ == "__main__":
  run()
