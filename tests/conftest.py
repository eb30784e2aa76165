"""Session set-up shared by all tests: one JAX compilation cache for the whole run.

Many tests compile the same small programs (the toy's sampler and train step, in this
process and in the command-line runs of subprocesses). JAX's persistent compilation cache,
in a directory made for this test session and inherited by every subprocess, compiles each
program once per run. Nothing is shared between runs: a test never sees an executable that
another run of the suite compiled.
"""

import os
import shutil
import tempfile

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"

# Tests compare float32 computations with each other (remat or not, micro-batched or not, the
# sampler's log-probs and the training forward's) at float32 tolerances. A GPU's XLA runs
# float32 matmuls in TF32 by default, which misses them by ~1e-4 relative (seen on an H200);
# CPUs compute float32 dots in full precision either way.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

if _CACHE_ENV not in os.environ:  # Set before any test module imports jax.
  _cache_dir = tempfile.mkdtemp(prefix="score_jax_test_xla_")
  os.environ[_CACHE_ENV] = _cache_dir
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
else:
  _cache_dir = None


def pytest_unconfigure(config):
  del config
  if _cache_dir is not None:
    shutil.rmtree(_cache_dir, ignore_errors=True)


# Files whose tests take minutes, scheduled first (in this order), so that the two pytest-xdist
# workers (`--dist loadfile`) finish together instead of one running them alone at the end.
# xdist keeps this order only with --no-loadscope-reorder (the Makefile's test target); by
# default it runs the files with the most tests first, which puts these last.
_LONG_FIRST = ("test_quickstart.py", "test_resilience.py", "test_main.py", "test_modes.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONG_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: the rest as is.
