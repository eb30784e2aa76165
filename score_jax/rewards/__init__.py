"""Host-side rewards: final-answer checks for math, unit tests for code, and a worker pool.

* `score_jax.rewards.math.check(response, reference) -> bool`
* `score_jax.rewards.code.check(program, tests) -> code.Result`
* `score_jax.rewards.pool.RewardPool`: runs either in worker processes, returning futures.

Submodules are imported by name (math-verify, which `math` needs, is slow to import).
"""
