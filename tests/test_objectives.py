"""Tests of score_jax.rl.objectives against values worked out by hand on a tiny batch."""

import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax.rl import objectives

LN2 = math.log(2.0)

# The hand batch: B = 4 rows, n = 2 samples per prompt (rows 0-1: prompt 0, rows 2-3: prompt 1),
# T = 6 positions, K = 2 attempts.
ATTEMPT = np.array([[0, 1, 1, 2, 2, 0],
                    [0, 1, 2, 2, 2, 0],
                    [0, 0, 1, 1, 2, 0],
                    [0, 1, 1, 2, 2, 2]], np.int32)
N1, N2 = 7, 9  # attempt-1 / attempt-2 tokens in the batch.
# Context positions hold -9 (policy) and 0 (reference): counted, they would dominate the loss.
LOGP = np.array([[-9, -1, -2, -1, -1, -9],
                 [-9, -1, -1, -2, -1, -9],
                 [-9, -9, -2, -1, -3, -9],
                 [-9, -1, -1, -2, -2, -1]], np.float32)
# Per-row sums of logp over attempt 1 and attempt 2.
S1 = np.array([-3., -1., -3., -2.])
S2 = np.array([-2., -4., -3., -5.])
# Reference equal to the policy except at three attempt tokens (ref - logp = +-ln 2):
#   (0, 1) attempt 1: ref - logp = +ln 2 -> k3 = 2 - 1 - ln 2 = 1 - ln 2
#   (2, 3) attempt 1: ref - logp = -ln 2 -> k3 = 1/2 - 1 + ln 2 = ln 2 - 1/2
#   (3, 4) attempt 2: ref - logp = -ln 2 -> k3 = ln 2 - 1/2
REF = LOGP.copy()
REF[ATTEMPT == 0] = 0.0
REF[0, 1] += LN2
REF[2, 3] -= LN2
REF[3, 4] -= LN2
KL_SUM1 = (1 - LN2) + (LN2 - 0.5)  # = 1/2
KL_SUM2 = LN2 - 0.5
# Rewards (r1, r2): row 0 wrong -> right, row 1 right -> wrong, row 2 right twice, row 3 wrong twice.
REWARDS = np.array([[0., 1.], [1., 0.], [1., 1.], [0., 0.]], np.float32)
# RLOO with n = 2: A_b = r_b - r_(other sample of the same prompt).
A1 = np.array([-1., 1., 1., -1.])
A2 = np.array([1., -1., 1., -1.])
# Shaped r2 + 10 (r2 - r1) = (11, -10, 1, 0) -> RLOO (21, -21, 1, -1).
A2_SHAPED = np.array([21., -21., 1., -1.])
BETA1, BETA2 = 0.01, 0.1


def _cfg(kind, **kw):
  kw.setdefault("kl_estimator", "k3")  # The hand values above are k3's.
  return objectives.ObjectiveConfig(kind=kind, alpha=10.0, beta1=BETA1, beta2=BETA2, n=2, **kw)


# Compiled once per config and shape: faster than op-by-op dispatch on the CPU.
_jit_loss = jax.jit(objectives.loss_fn, static_argnums=0)
_jit_grad = jax.jit(jax.grad(lambda cfg, *args: objectives.loss_fn(cfg, *args)[0], argnums=1),
                    static_argnums=0)


def _loss(cfg, logp=LOGP, ref=REF, rewards=REWARDS, attempt=ATTEMPT, entropy=None):
  return _jit_loss(cfg, logp, ref, attempt, rewards, entropy)


def _grad(cfg, logp=LOGP, ref=REF, rewards=REWARDS):
  """d loss / d logp, [B, T]."""
  return np.asarray(_jit_grad(cfg, logp, ref, ATTEMPT, rewards))


# ----------------------------------------------------------------------------- RLOO


def test_rloo_two_samples_is_difference_with_the_other():
  adv = objectives.rloo_advantages(jnp.asarray(REWARDS), n=2)
  np.testing.assert_array_equal(adv, np.stack([A1, A2], axis=1))


def test_rloo_two_samples_scales_with_the_gap_unlike_a_z_score():
  # A z-score of (0.2, 0.3) would be (-0.71, 0.71); the leave-one-out advantage is the gap.
  adv = objectives.rloo_advantages(jnp.array([[0.2], [0.3]]), n=2)
  np.testing.assert_allclose(adv[:, 0], [-0.1, 0.1], rtol=1e-5)


def test_rloo_three_samples():
  rewards = jnp.array([[1., 0.], [0., 0.], [0., 1.],    # prompt 0
                       [1., 1.], [1., 1.], [0., 1.]])   # prompt 1
  # Attempt 1, prompt 0: 1 - (0+0)/2, 0 - (1+0)/2, 0 - (1+0)/2; prompt 1: 1 - 1/2, 1 - 1/2, 0 - 1.
  # Attempt 2, prompt 0: 0 - 1/2, 0 - 1/2, 1 - 0; prompt 1: all rewards equal -> 0.
  expected = [[1., -0.5], [-0.5, -0.5], [-0.5, 1.], [0.5, 0.], [0.5, 0.], [-1., 0.]]
  np.testing.assert_allclose(objectives.rloo_advantages(rewards, n=3), expected, atol=1e-7)


def test_rloo_one_sample_falls_back_to_batch_mean():
  rewards = jnp.array([[1., 0.], [0., 0.], [0., 1.], [1., 1.]])
  # Batch means per attempt: 0.5 and 0.5.
  expected = [[0.5, -0.5], [-0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]
  np.testing.assert_array_equal(objectives.rloo_advantages(rewards, n=1), expected)


@pytest.mark.parametrize("n", [0, 3])
def test_rloo_rejects_bad_group_size(n):
  with pytest.raises(ValueError, match="multiple of n"):
    objectives.rloo_advantages(jnp.zeros((4, 2)), n=n)


# ----------------------------------------------------------------------------- KL estimators


def test_kl_estimators_match_formulas():
  logp = jnp.array([-1.0, -2.0, -0.5])
  ref = jnp.array([-1.0 - LN2, -2.0 + LN2, -0.5])  # logp - ref = ln 2, -ln 2, 0.
  np.testing.assert_allclose(objectives.kl(logp, ref, "k1"), [LN2, -LN2, 0.0], rtol=1e-6)
  np.testing.assert_allclose(objectives.kl(logp, ref, "k2"),
                             [LN2 ** 2 / 2, LN2 ** 2 / 2, 0.0], rtol=1e-6)
  # exp(ref - logp) - 1 - (ref - logp): 1/2 - 1 + ln 2, 2 - 1 - ln 2, 0.
  np.testing.assert_allclose(objectives.kl(logp, ref, "k3"), [LN2 - 0.5, 1 - LN2, 0.0],
                             rtol=1e-5, atol=1e-7)


def test_k3_is_nonnegative_zero_at_equality_and_accurate_for_small_gaps():
  d = np.concatenate([-np.logspace(-8, 1, 40), [0.0], np.logspace(-8, 1, 40)])
  got = np.asarray(objectives.kl(jnp.zeros_like(d, dtype=jnp.float32),
                                 jnp.asarray(-d, jnp.float32), "k3"))
  assert (got >= 0).all()
  assert got[40] == 0.0
  # Against float64: float32 rounding of expm1 near d costs at most a few ulp(d) ~ 1e-12 here.
  np.testing.assert_allclose(got, np.expm1(-d) + d, rtol=2e-3, atol=1e-11)
  # Naive exp(x) - 1 - x in float32 loses everything at d = 1e-4 (true value 5e-9).
  np.testing.assert_allclose(objectives.kl(jnp.float32(0.0), jnp.float32(1e-4), "k3"), 5e-9,
                             rtol=1e-2)


def test_kl_is_finite_for_large_gaps():
  logp = jnp.array([0.0, -50.0])
  ref = jnp.array([-50.0, 0.0])
  for est in objectives.KL_ESTIMATORS:
    value = objectives.kl(logp, ref, est)
    grad = jax.grad(lambda lp, e=est: jnp.sum(objectives.kl(lp, ref, e)))(logp)
    assert np.isfinite(value).all() and np.isfinite(grad).all(), est
  np.testing.assert_allclose(objectives.kl(logp, ref, "k3"), [49.0, math.exp(50) - 51],
                             rtol=1e-5)


def _categorical_kl_gradients(estimator, num_samples=200_000, seed=0):
  """On a 5-token categorical policy pi = softmax(theta) and a fixed pi_ref: the gradient in
  theta of the loss term kl(log pi(x), log pi_ref(x)) for x ~ pi, per sample [S, 5], and the
  exact gradients of KL(pi || pi_ref) and KL(pi_ref || pi) [5]."""
  theta = jnp.array([0.5, -1.0, 1.5, 0.0, -0.3])
  ref_logp = jax.nn.log_softmax(jnp.array([-0.2, 0.4, 0.3, -1.0, 0.8]))
  x = jax.random.categorical(jax.random.PRNGKey(seed), theta, shape=(num_samples,))

  def term(th, token):
    return objectives.kl(jax.nn.log_softmax(th)[token], ref_logp[token], estimator)

  per_sample = jax.jit(jax.vmap(jax.grad(term), in_axes=(None, 0)))(theta, x)

  def kl_forward(th):  # KL(pi || pi_ref), exactly.
    logp = jax.nn.log_softmax(th)
    return jnp.sum(jnp.exp(logp) * (logp - ref_logp))

  def kl_reverse(th):  # KL(pi_ref || pi), exactly.
    return jnp.sum(jnp.exp(ref_logp) * (ref_logp - jax.nn.log_softmax(th)))

  return np.asarray(per_sample), jax.grad(kl_forward)(theta), jax.grad(kl_reverse)(theta)


def _within_sampling_error(per_sample, exact):
  """Whether the mean of per-sample gradients is within 4 standard errors of `exact`."""
  mean = per_sample.mean(0)
  stderr = per_sample.std(0) / math.sqrt(len(per_sample))
  return bool(np.all(np.abs(mean - exact) <= 4 * stderr + 1e-6))


def test_default_kl_estimator_has_the_gradient_of_kl_pi_to_ref():
  # The default everywhere a user can meet it: the function, the config and the gin entry point.
  default = objectives.ObjectiveConfig().kl_estimator
  assert objectives.objective().kl_estimator == default
  assert objectives.kl.__defaults__ == (default,)
  per_sample, forward, reverse = _categorical_kl_gradients(default)
  assert np.max(np.abs(forward - reverse)) > 0.05  # The two directions differ here ...
  assert _within_sampling_error(per_sample, forward)
  assert not _within_sampling_error(per_sample, reverse)  # ... and the test tells them apart.


def test_k3_as_a_loss_term_has_the_gradient_of_the_reverse_kl():
  per_sample, forward, reverse = _categorical_kl_gradients("k3")
  assert _within_sampling_error(per_sample, reverse)
  assert not _within_sampling_error(per_sample, forward)


def test_kl_rejects_unknown_estimator():
  with pytest.raises(ValueError, match="k4"):
    objectives.kl(jnp.zeros(2), jnp.zeros(2), "k4")


# ----------------------------------------------------------------------------- losses


def test_stage1_loss_by_hand():
  # Attempt 1: KL only (beta2); attempt 2: -A(r2) logp plus beta1 KL.
  expected = (-np.dot(A2, S2) / N2                  # -(1/9)(-2 + 4 - 3 + 5) = -4/9
              + BETA2 * KL_SUM1 / N1 + BETA1 * KL_SUM2 / N2)
  assert math.isclose(expected, -4 / 9 + 0.1 * 0.5 / 7 + 0.01 * (LN2 - 0.5) / 9)
  loss, metrics = _loss(_cfg("stage1"))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["pg_loss"], -4 / 9, rtol=1e-6)


def test_stage2_loss_by_hand():
  expected = (-np.dot(A1, S1) / N1                  # -(1/7)(3 - 1 - 3 + 2) = -1/7
              - np.dot(A2_SHAPED, S2) / N2          # -(1/9)(-42 + 84 - 3 + 5) = -44/9
              + BETA1 * (KL_SUM1 / N1 + KL_SUM2 / N2))
  assert math.isclose(expected, -1 / 7 - 44 / 9 + 0.01 * (0.5 / 7 + (LN2 - 0.5) / 9))
  loss, _ = _loss(_cfg("stage2"))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_multi_turn_loss_by_hand():
  expected = -1 / 7 - 4 / 9 + 0.01 * (0.5 / 7 + (LN2 - 0.5) / 9)
  loss, _ = _loss(_cfg("multi_turn"))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_single_turn_loss_by_hand_ignores_later_attempts():
  expected = -1 / 7 + 0.01 * 0.5 / 7
  loss, _ = _loss(_cfg("single_turn"))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  loss_one_reward, _ = _loss(_cfg("single_turn"), rewards=REWARDS[:, :1])
  np.testing.assert_allclose(loss_one_reward, expected, rtol=1e-6)


@pytest.mark.parametrize("estimator,kl_sum1,kl_sum2", [
    ("k1", -LN2 + LN2, LN2),             # logp - ref: -ln 2, +ln 2; +ln 2.
    ("k2", LN2 ** 2, LN2 ** 2 / 2),
])
def test_stage1_loss_with_other_estimators(estimator, kl_sum1, kl_sum2):
  expected = -4 / 9 + BETA2 * kl_sum1 / N1 + BETA1 * kl_sum2 / N2
  loss, _ = _loss(_cfg("stage1", kl_estimator=estimator))
  np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-7)


def test_metrics_by_hand():
  entropy = np.arange(24, dtype=np.float32).reshape(4, 6)
  _, m = _loss(_cfg("stage2"), entropy=jnp.asarray(entropy))
  expected = {
      "reward_t1": 0.5, "reward_t2": 0.5,
      "kl_t1": 0.5 / 7, "kl_t2": (LN2 - 0.5) / 9,
      "tokens_t1": 7, "tokens_t2": 9,
      "context_fraction": 8 / 24,
      "delta": 0.0, "i2c": 0.25, "c2i": 0.25,
      # Advantages (-1, 1, 1, -1) and (21, -21, 1, -1): mean 0, std sqrt(888 / 8).
      "adv_mean": 0.0, "adv_std": math.sqrt(111), "adv_abs_max": 21.0,
      "entropy": entropy[ATTEMPT > 0].mean(),
  }
  for key, value in expected.items():
    assert m[key].dtype == jnp.float32 and m[key].shape == (), key
    np.testing.assert_allclose(m[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
  _, m1 = _loss(_cfg("stage1"))
  # Stage I: only attempt 2 is rewarded, advantages (1, -1, 1, -1).
  np.testing.assert_allclose([m1["adv_mean"], m1["adv_std"], m1["adv_abs_max"]], [0, 1, 1])


def test_three_attempts():
  # Attempt 3 takes the last two tokens of row 3 (were attempt 2): N2 = 7, N3 = 2.
  attempt = ATTEMPT.copy()
  attempt[3, 4:] = 3
  rewards = np.array([[0., 1., 1.], [1., 0., 1.], [1., 1., 0.], [0., 0., 1.]], np.float32)
  # Attempt-2 sums (-2, -4, -3, -2), KL 0; attempt 3: row 3 only, sum -3, KL ln 2 - 1/2.
  s2, n2, s3, n3, kl3 = np.array([-2., -4., -3., -2.]), 7, np.array([0., 0., 0., -3.]), 2, LN2 - 0.5
  # Stage I: reward on the final attempt only, RLOO(r3) = (0, 0, -1, 1); beta1 KL on attempt 2.
  expected = -np.dot([0., 0., -1., 1.], s3) / n3 + BETA2 * KL_SUM1 / N1 + BETA1 * kl3 / n3
  loss, _ = _loss(_cfg("stage1"), rewards=rewards, attempt=attempt)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # Stage II: r_k + 10 (r_k - r_(k-1)) for k = 2, 3.
  # k = 2: (11, -10, 1, 0) -> RLOO (21, -21, 1, -1); k = 3: (1, 11, -10, 11) -> (-10, 10, -21, 21).
  a3 = np.array([-10., 10., -21., 21.])
  expected = (-np.dot(A1, S1) / N1 - np.dot(A2_SHAPED, s2) / n2 - np.dot(a3, s3) / n3
              + BETA1 * (KL_SUM1 / N1 + kl3 / n3))
  loss, m = _loss(_cfg("stage2"), rewards=rewards, attempt=attempt)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert m["tokens_t3"] == 2 and m["reward_t3"] == 0.75


# ----------------------------------------------------------------------------- gradients


def _tokens_of(k):
  """[B, T] mask of the attempt-k positions of the hand batch."""
  return ATTEMPT == k


def test_stage1_attempt1_gradient_is_only_the_kl_pull():
  cfg = _cfg("stage1")
  # With logp == ref the KL gradient vanishes and there is no reward term: exactly zero.
  np.testing.assert_array_equal(_grad(cfg, ref=LOGP)[_tokens_of(1)], 0.0)
  # Otherwise beta2 * d k3 / d logp / N1, with d k3 / d logp = 1 - exp(ref - logp).
  expected = np.zeros_like(LOGP)
  expected[0, 1] = BETA2 * (1 - 2.0) / N1
  expected[2, 3] = BETA2 * (1 - 0.5) / N1
  g = _grad(cfg)
  np.testing.assert_allclose(g[_tokens_of(1)], expected[_tokens_of(1)], rtol=1e-6, atol=1e-9)
  # Whatever the rewards.
  g_other = _grad(cfg, rewards=1.0 - REWARDS)
  np.testing.assert_array_equal(g_other[_tokens_of(1)], g[_tokens_of(1)])


def test_stage1_attempt2_gradient_by_hand_depends_on_r2_only():
  cfg = _cfg("stage1")
  g = _grad(cfg)
  # (-A2_b + beta1 (1 - exp(ref - logp))) / N2; the only KL token is (3, 4), ref - logp = -ln 2.
  expected = np.where(ATTEMPT == 2, -A2[:, None] / N2, 0.0)
  expected[3, 4] += BETA1 * (1 - 0.5) / N2
  np.testing.assert_allclose(g[_tokens_of(2)], expected[_tokens_of(2)], rtol=1e-6)
  flipped_r1 = REWARDS.copy()
  flipped_r1[:, 0] = 1.0 - flipped_r1[:, 0]
  np.testing.assert_array_equal(_grad(cfg, rewards=flipped_r1)[_tokens_of(2)], g[_tokens_of(2)])
  flipped_r2 = REWARDS.copy()
  flipped_r2[:, 1] = 1.0 - flipped_r2[:, 1]
  assert not np.allclose(_grad(cfg, rewards=flipped_r2)[_tokens_of(2)], g[_tokens_of(2)])


def test_stage2_r1_reaches_both_attempts():
  cfg = _cfg("stage2")
  g = _grad(cfg)
  expected = np.zeros_like(LOGP)
  expected += np.where(ATTEMPT == 1, -A1[:, None] / N1, 0.0)
  expected += np.where(ATTEMPT == 2, -A2_SHAPED[:, None] / N2, 0.0)
  expected[0, 1] += BETA1 * (1 - 2.0) / N1
  expected[2, 3] += BETA1 * (1 - 0.5) / N1
  expected[3, 4] += BETA1 * (1 - 0.5) / N2
  np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-9)
  # Row 3's r1 from 0 to 1: A1 changes and, through alpha, the shaped attempt-2 advantage too.
  changed = REWARDS.copy()
  changed[3, 0] = 1.0
  g_changed = _grad(cfg, rewards=changed)
  assert not np.allclose(g_changed[_tokens_of(1)], g[_tokens_of(1)])
  assert not np.allclose(g_changed[_tokens_of(2)], g[_tokens_of(2)])
  # Without shaping (multi_turn) attempt 2 does not see r1.
  g_mt = _grad(_cfg("multi_turn"))
  np.testing.assert_array_equal(_grad(_cfg("multi_turn"), rewards=changed)[_tokens_of(2)],
                                g_mt[_tokens_of(2)])


@pytest.mark.parametrize("kind", objectives.KINDS)
def test_context_gets_zero_gradient_even_with_nonfinite_values(kind):
  logp = LOGP.copy()
  ref = REF.copy()
  logp[0, 0], logp[1, 5], ref[2, 0], ref[3, 0] = -np.inf, np.nan, np.nan, -np.inf
  loss, metrics = _loss(_cfg(kind), logp=logp, ref=ref)
  np.testing.assert_allclose(loss, _loss(_cfg(kind))[0], rtol=1e-6)
  assert all(np.isfinite(v) for v in metrics.values())
  g = _grad(_cfg(kind), logp=logp, ref=ref)
  assert np.isfinite(g).all()
  np.testing.assert_array_equal(g[ATTEMPT == 0], 0.0)


# ----------------------------------------------------------------------------- config


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="kind"):
    objectives.ObjectiveConfig(kind="stage3")
  with pytest.raises(ValueError, match="kl_estimator"):
    objectives.ObjectiveConfig(kl_estimator="k5")
  with pytest.raises(ValueError, match="n must be"):
    objectives.ObjectiveConfig(n=0)
  with pytest.raises(ValueError, match=">= 2 attempts"):
    _loss(_cfg("stage1"), rewards=REWARDS[:, :1])
  with pytest.raises(ValueError, match="rewards"):
    _loss(_cfg("stage2"), rewards=REWARDS[:3])
  with pytest.raises(ValueError, match="shape"):
    _loss(_cfg("stage2"), ref=REF[:, :5])


def test_gin_factory_and_trainer_sets_n():
  try:
    gin.parse_config("objective.kind = 'stage1'\nobjective.beta2 = 0.25")
    cfg = objectives.objective()
  finally:
    gin.clear_config()
  assert cfg == objectives.ObjectiveConfig(kind="stage1", alpha=10.0, beta1=0.01, beta2=0.25,
                                           kl_estimator="k2", n=1)
  assert dataclasses.replace(cfg, n=4).n == 4
