"""Tests of score_jax.rewards.pool.RewardPool (standard-library functions stand in for checks:
they pickle by name like the real ones)."""

import math
import operator
import os
import time

import pytest

from score_jax.rewards import code
from score_jax.rewards import math as math_rewards
from score_jax.rewards import pool as pool_lib


@pytest.fixture(scope="module")
def pool():
  with pool_lib.RewardPool(2, timeout_s=20.0) as p:
    yield p


def test_submit_returns_results_in_order(pool):
  future = pool.submit(operator.add, [(i, 10) for i in range(20)])
  assert future.result(timeout=20) == [i + 10 for i in range(20)]
  assert pool.map(operator.mul, [(2, 3), (4, 5)]) == [6, 20]
  assert pool.map([(operator.add, (1, 2)), (abs, (-4,)), (max, (1, 9))]) == [3, 4, 9]
  assert pool.map(operator.add, []) == []


def test_checks_run_in_parallel_while_the_caller_goes_on(pool):
  start = time.monotonic()
  future = pool.submit(time.sleep, [(1.0,), (1.0,)])
  assert time.monotonic() - start < 0.5 and not future.done()
  assert future.result(timeout=20) == [None, None]
  assert time.monotonic() - start < 1.8  # Two workers: not one after the other.


def test_failed_checks_give_the_default(pool):
  assert pool.map(math.sqrt, [(4.0,), (-1.0,), (9.0,)], default=-1.0) == [2.0, -1.0, 3.0]
  # A worker that dies is replaced; its check gets the default.
  assert pool.map([(os._exit, (3,)), (operator.add, (1, 1))], default="dead") == ["dead", 2]
  assert pool.map(operator.add, [(2, 2)]) == [4]


def test_a_hung_check_is_bounded():
  with pool_lib.RewardPool(1, timeout_s=0.5) as pool:
    start = time.monotonic()
    assert pool.map(time.sleep, [(30,), (0,)], default="late") == ["late", None]
    assert time.monotonic() - start < 10.0
    assert pool.map(time.sleep, [(0.6,)], timeout_s=5.0) == [None]


def test_real_checks_through_the_pool(pool):
  answers = pool.map(math_rewards.check, [("\\boxed{\\frac12}", "0.5"), ("\\boxed{3}", "4")])
  assert answers == [True, False]
  results = pool.map(code.check, [("x = 1\n", "assert x == 1\n"), ("x = 1\n", "assert x == 2\n")])
  assert [r.passed for r in results] == [True, False]


def test_bad_submissions_raise(pool):
  with pytest.raises(ValueError, match="cannot send"):
    pool.submit(lambda x: x, [(1,)])
  with pytest.raises(ValueError, match="timeout_s"):
    pool.submit(abs, [(1,)], timeout_s=0)
  with pytest.raises(ValueError, match="num_workers"):
    pool_lib.RewardPool(0)


def test_close_finishes_pending_checks_and_is_idempotent():
  pool = pool_lib.RewardPool(1)
  future = pool.submit(time.sleep, [(0.2,), (0.2,)])
  pool.close()
  assert future.result(timeout=0) == [None, None]
  pool.close()
  with pytest.raises(RuntimeError, match="closed"):
    pool.submit(abs, [(1,)])


def test_a_worker_that_cannot_start_fails_the_futures():
  pool = pool_lib.RewardPool(1, preload=["score_jax.no_such_module"])
  with pytest.raises(RuntimeError):  # From submit or from the future: whichever sees it first.
    pool.submit(abs, [(1,)]).result(timeout=30)
  with pytest.raises(RuntimeError, match="before it was ready"):
    pool.submit(abs, [(1,)])
  pool.close()
