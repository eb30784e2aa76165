"""Run test code on several fake CPU devices, in a fresh Python process.

XLA fixes the number of host devices when jax first initialises its backend, and the pytest
process may already have done so with one device. So multi-device checks run in a child
process started with `--xla_force_host_platform_device_count=n`:

    def _check_sharded():  # module level, no arguments; plain asserts
      assert jax.device_count() == 8

    def test_sharded():
      run_with_devices(8, _check_sharded)

The child imports the function's module by name (its directory first on sys.path, the
repository root on PYTHONPATH), so that module must be cheap and safe to import.
"""

import inspect
import os
import subprocess
import sys
import textwrap
from typing import Callable, Union

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _child_env(n: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={n}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
  return env


def _source_for(fn: Callable[[], object]) -> str:
  if "<locals>" in fn.__qualname__ or fn.__module__ == "__main__":
    raise ValueError(f"{fn.__qualname__} must be a module-level function of an importable "
                     "module")
  module_dir = os.path.dirname(os.path.abspath(inspect.getfile(fn)))
  return textwrap.dedent(f"""
      import importlib, sys
      sys.path.insert(0, {module_dir!r})
      getattr(importlib.import_module({fn.__module__!r}), {fn.__qualname__!r})()
  """)


def run_with_devices(n: int, code_or_fn: Union[str, Callable[[], object]],
                     timeout: float = 300.0) -> str:
  """Runs Python source, or a module-level no-argument function, with n CPU devices.

  Returns the child's stdout. Raises AssertionError carrying the child's output when it
  exits non-zero (a failed assert, an exception) or runs past `timeout` seconds.
  """
  if n < 1:
    raise ValueError(f"device count must be >= 1, got {n}")
  source = code_or_fn if isinstance(code_or_fn, str) else _source_for(code_or_fn)
  try:
    result = subprocess.run([sys.executable, "-c", source], env=_child_env(n), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired as e:
    raise AssertionError(f"child process with {n} devices ran past {timeout} s\n"
                         f"stdout:\n{e.stdout}\nstderr:\n{e.stderr}") from e
  if result.returncode != 0:
    raise AssertionError(f"child process with {n} devices failed (exit {result.returncode})\n"
                         f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
  return result.stdout
