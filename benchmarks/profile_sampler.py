"""Where a two-attempt sampler call spends its time, per XLA operation (jax.profiler).

    PYTHONPATH=. .venv/bin/python benchmarks/profile_sampler.py [--model=smollm2_135m]
        [--batch=32] [--prompt_len=64] [--max_new_tokens=64] [--instruction_len=65] [--top=25]

Runs `sampler.sample` (random weights of the named config: an operation's time does not
depend on the weights' values; no stop id, so every attempt runs all N tokens) once to
compile and warm up, once timed, and once under `jax.profiler.trace`. The trace's events
are the compiled program's operations (XLA fusions, dots, copies); each is matched to its
HLO instruction and grouped by (kind, result shape, source op). Printed per decode step
(total / 2N): milliseconds, calls per step and the group, largest first, then the sum of the
operations against the wall time of a step (the profiler's own overhead and what no
operation covers make up the difference). This is how `bench_sampler.py`'s decode step is
taken apart when a target is missed: which dots, which copies, which reductions.
"""

import time

from absl import app
from absl import flags
import jax

from score_jax.models import configs

import op_profile  # benchmarks/op_profile.py, next to this file.

_MODEL = flags.DEFINE_string("model", "smollm2_135m", "A config name of score_jax.models.configs.")
_BATCH = flags.DEFINE_integer("batch", 32, "Rows.", lower_bound=1)
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.", lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "New tokens per attempt.",
                                       lower_bound=1)
_INSTRUCTION_LEN = flags.DEFINE_integer("instruction_len", 65, "Instruction tokens.",
                                        lower_bound=1)
_TOP = flags.DEFINE_integer("top", 25, "Groups printed.", lower_bound=1)


def main(argv):
  del argv
  cfg = configs.get(_MODEL.value)
  start = time.perf_counter()
  compiled, args = op_profile.compiled_sampler(cfg, _BATCH.value, _PROMPT_LEN.value,
                                               _MAX_NEW_TOKENS.value, _INSTRUCTION_LEN.value)
  print(f"{_MODEL.value}, batch {_BATCH.value}, prompt {_PROMPT_LEN.value}, 2 x "
        f"{_MAX_NEW_TOKENS.value} new tokens, instruction {_INSTRUCTION_LEN.value}: "
        f"lowered and compiled in {time.perf_counter() - start:.1f} s")
  jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  wall = time.perf_counter() - start
  steps = 2 * _MAX_NEW_TOKENS.value
  print(f"one call {wall:.2f} s = {_BATCH.value * steps / wall:.1f} tokens/s; per decode step "
        f"(the call's time / {steps}, prefill and instruction included):")
  groups = op_profile.op_profile(compiled, *args)
  for g in groups[:_TOP.value]:
    print(f"  {g.seconds / steps * 1e3:8.2f} ms  x{g.calls / steps:6.1f}  {g.name[:140]}")
  total = sum(g.seconds for g in groups)
  print(f"  sum of all operations {total / steps * 1e3:.1f} ms per step "
        f"(under the profiler); wall {wall / steps * 1e3:.1f} ms per step")


if __name__ == "__main__":
  app.run(main)
