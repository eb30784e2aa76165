"""`python -m score_jax.main ARGS` in the test process (no JAX start-up per command)."""

import contextlib
import io
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
