"""SCoRe losses: REINFORCE with a leave-one-out baseline and per-attempt KL, as pure functions.

Inputs come from one forward pass over the whole multi-turn sequence (B = num_prompts * n rows,
the n samples of a prompt contiguous; K attempts per row):

  logp, ref_logp  float32 [B, T]  log-prob of the token at each position (policy / frozen ref).
  attempt         int32   [B, T]  0 for context (prompt, instruction, padding), k for attempt k.
  rewards         float32 [B, K]  host reward of each attempt.

With A(.) the RLOO advantage (`rloo_advantages`, taken per attempt index), sg the stop-gradient,
kl(t) the per-token KL estimate and N_k the number of attempt-k tokens in the whole batch, the
loss is a sum over attempts of token means:

  L = sum_k (1 / N_k) sum_{t in attempt k} [ -sg(w_k) * logp(t) + c_k * kl(t) ]

  kind         w_1          c_1    w_2                          c_2
  stage1       0            beta2  A(r2)                        beta1
  stage2       A(r1)        beta1  A(r2 + alpha * (r2 - r1))    beta1
  multi_turn   A(r1)        beta1  A(r2)                        beta1   (stage2 with alpha = 0)
  single_turn  A(r1)        beta1  (later attempts are ignored)

In Stage I the attempt-1 tokens therefore get no reward signal: their whole gradient is
beta2 * d kl / d logp / N_1, the pull back to the reference. Each attempt's tokens see only that
attempt's (shaped) reward: discount 0 between attempts. `attempt_terms` holds this table.

KL, with d = logp - ref_logp on tokens sampled from pi (`kl`; `kl_estimator`, default k2):

  k2(t) = d^2 / 2        E[grad k2] = E[d * grad logp] = grad KL(pi || pi_ref)   (the paper's)
  k3(t) = e^-d - 1 + d   E[k3] = KL(pi || pi_ref), but E[grad k3] = grad KL(pi_ref || pi)
  k1(t) = d              E[grad k1] = E[grad logp] = 0: no pull at all

As a loss term only the gradient matters, so the default is k2: its expected gradient is that of
the paper's KL(pi || pi_ref). The kl_t{k} metrics report the same estimator's token means.
"""

import dataclasses
from typing import Optional

import gin
import jax
import jax.numpy as jnp

Array = jax.Array

KINDS = ("stage1", "stage2", "multi_turn", "single_turn")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static settings of `loss_fn` (hashable, so it can be a static argument of `jax.jit`).

  `n` (samples per prompt) belongs to the sampler; the trainer sets it with
  `dataclasses.replace(cfg, n=...)`.
  """
  kind: str = "stage2"
  alpha: float = 10.0
  beta1: float = 0.01
  beta2: float = 0.1
  kl_estimator: str = "k2"
  n: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"objective kind must be one of {KINDS}, got {self.kind!r}")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
    if self.n < 1:
      raise ValueError(f"samples per prompt n must be >= 1, got {self.n}")


@gin.configurable
def objective(kind: str = "stage2", alpha: float = 10.0, beta1: float = 0.01,
              beta2: float = 0.1, kl_estimator: str = "k2") -> ObjectiveConfig:
  """The module's gin entry point. Defaults are the paper's MATH values (MBPP: beta2 = 0.25)."""
  return ObjectiveConfig(kind=kind, alpha=alpha, beta1=beta1, beta2=beta2,
                         kl_estimator=kl_estimator)


def rloo_advantages(rewards: Array, n: int) -> Array:
  """REINFORCE leave-one-out advantages, independently for each attempt index.

  Args:
    rewards: [B, K]; rows b of one prompt are the contiguous block b // n.
    n: samples per prompt (static).

  Returns:
    [B, K]: r_b - mean of r_j over the other n - 1 samples of b's prompt. With n == 1 there is
    no other sample; the fallback baseline is the batch mean of that attempt: r_b - mean_j r_j.
    Never divided by a standard deviation (with n = 2 a z-score is +-0.71 whatever the gap).
  """
  batch, num_attempts = rewards.shape
  if n < 1 or batch % n:
    raise ValueError(f"batch size {batch} is not a positive multiple of n={n}")
  if n == 1:
    return rewards - jnp.mean(rewards, axis=0, keepdims=True)
  groups = rewards.reshape(batch // n, n, num_attempts)
  others_mean = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (n - 1)
  return (groups - others_mean).reshape(batch, num_attempts)


def kl(logp: Array, ref_logp: Array, estimator: str = "k2") -> Array:
  """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs (any shape).

  With d = logp - ref_logp (tokens sampled from pi):
    k1 = d                             unbiased, can be negative.
    k2 = d^2 / 2                       biased, >= 0; the default (see the module docstring).
    k3 = exp(-d) - 1 + d               unbiased, >= 0 (expm1, then clamped at 0 against rounding).
  Differentiated as a loss term (samples held fixed) the expected per-token gradients are:
  k1 -> 0 (no pull at all), k2 -> grad KL(pi || ref), k3 -> grad KL(ref || pi).
  k3 overflows float32 only when ref_logp - logp > 88, i.e. for a sampled token the policy gives
  probability < e^-88.
  """
  d = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
  if estimator == "k1":
    return d
  if estimator == "k2":
    return 0.5 * jnp.square(d)
  if estimator == "k3":
    return jnp.maximum(jnp.expm1(-d) + d, 0.0)
  raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def attempt_terms(cfg: ObjectiveConfig, rewards: Array) -> tuple[Array, Array, tuple[int, ...]]:
  """Per-attempt policy-gradient weight w_k and KL coefficient c_k (the table in the docstring).

  Args:
    cfg: the objective.
    rewards: float32 [B, K].

  Returns:
    w: [B, K] advantage multiplying attempt k's log-probs (0 where the attempt is not rewarded);
    c: [K] KL coefficient of attempt k;
    rewarded: indices (0-based) of the attempts with a reward term.
  """
  num_attempts = rewards.shape[1]
  if cfg.kind != "single_turn" and num_attempts < 2:
    raise ValueError(f"objective {cfg.kind!r} needs >= 2 attempts, rewards have {num_attempts}")
  no_reward = jnp.zeros_like(rewards[:, :1])

  if cfg.kind == "stage1":
    # Attempt 1: no reward, strong KL (beta2). Final attempt: reward, beta1 KL.
    # Attempts in between (K > 2): beta1 KL only.
    w = jnp.concatenate(
        [no_reward] * (num_attempts - 1) + [rloo_advantages(rewards[:, -1:], cfg.n)], axis=1)
    c = [cfg.beta2] + [cfg.beta1] * (num_attempts - 1)
    rewarded = (num_attempts - 1,)
  elif cfg.kind == "single_turn":
    # Attempt 1 alone, as in base RL; later attempts (if any) are not trained.
    w = jnp.concatenate(
        [rloo_advantages(rewards[:, :1], cfg.n)] + [no_reward] * (num_attempts - 1), axis=1)
    c = [cfg.beta1] + [0.0] * (num_attempts - 1)
    rewarded = (0,)
  else:
    # stage2 / multi_turn: every attempt rewarded, attempt k > 1 with r_k + alpha (r_k - r_{k-1}).
    alpha = cfg.alpha if cfg.kind == "stage2" else 0.0
    shaped = rewards.at[:, 1:].add(alpha * (rewards[:, 1:] - rewards[:, :-1]))
    w = rloo_advantages(shaped, cfg.n)
    c = [cfg.beta1] * num_attempts
    rewarded = tuple(range(num_attempts))
  return w, jnp.asarray(c, jnp.float32), rewarded


def loss_fn(cfg: ObjectiveConfig, logp: Array, ref_logp: Array, attempt: Array, rewards: Array,
            entropy: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
  """SCoRe loss (module docstring) and float32 scalar metrics.

  Args:
    cfg: the objective (static).
    logp, ref_logp: [B, T] log-probs; positions outside attempts 1..K may hold anything
      (even -inf or nan): they are replaced before any arithmetic and get zero gradient.
    attempt: int32 [B, T] attempt index of each token, 0 for context; ids > K count as context.
    rewards: [B, K].
    entropy: optional [B, T] policy entropy per position, reported as its mean over attempt tokens.

  Returns:
    loss: scalar; sum over attempts of (sum of attempt-k token terms) / N_k.
    metrics: loss, pg_loss, kl_loss; reward_t{k}, kl_t{k} (token mean), tokens_t{k} (N_k);
      adv_mean / adv_std / adv_abs_max over the rewarded attempts' advantages; context_fraction;
      with K >= 2, delta = mean(r2 - r1), i2c / c2i = fraction with r1 < 0.5 <= r2 / r2 < 0.5 <= r1;
      entropy if given.
  """
  if logp.ndim != 2 or logp.shape != ref_logp.shape or logp.shape != attempt.shape:
    raise ValueError(f"logp, ref_logp, attempt must share one [B, T] shape, got "
                     f"{logp.shape}, {ref_logp.shape}, {attempt.shape}")
  if rewards.ndim != 2 or rewards.shape[0] != logp.shape[0]:
    raise ValueError(f"rewards must be [B={logp.shape[0]}, K], got {rewards.shape}")
  if entropy is not None and entropy.shape != logp.shape:
    raise ValueError(f"entropy must be {logp.shape}, got {entropy.shape}")
  rewards = rewards.astype(jnp.float32)
  num_attempts = rewards.shape[1]

  w, c, rewarded = attempt_terms(cfg, rewards)
  masks = attempt[:, :, None] == jnp.arange(1, num_attempts + 1)         # [B, T, K]
  in_attempt = jnp.any(masks, axis=-1)                                    # [B, T]
  logp = jnp.where(in_attempt, logp.astype(jnp.float32), 0.0)
  ref_logp = jnp.where(in_attempt, ref_logp.astype(jnp.float32), 0.0)
  num_tokens = jnp.sum(masks, axis=(0, 1)).astype(jnp.float32)           # [K]
  denom = jnp.maximum(num_tokens, 1.0)

  def attempt_mean(x):  # [B, T, K] or [B, T, 1] -> [K]: mean over each attempt's tokens.
    return jnp.sum(jnp.where(masks, x, 0.0), axis=(0, 1)) / denom

  pg = attempt_mean(-jax.lax.stop_gradient(w)[:, None, :] * logp[:, :, None])
  kl_mean = attempt_mean(kl(logp, ref_logp, cfg.kl_estimator)[:, :, None])
  loss = jnp.sum(pg + c * kl_mean)

  adv = w[:, list(rewarded)]
  metrics = {
      "loss": loss,
      "pg_loss": jnp.sum(pg),
      "kl_loss": jnp.sum(c * kl_mean),
      "adv_mean": jnp.mean(adv),
      "adv_std": jnp.std(adv),
      "adv_abs_max": jnp.max(jnp.abs(adv)),
      "context_fraction": 1.0 - jnp.sum(num_tokens) / logp.size,
  }
  for k in range(num_attempts):
    metrics[f"reward_t{k + 1}"] = jnp.mean(rewards[:, k])
    metrics[f"kl_t{k + 1}"] = kl_mean[k]
    metrics[f"tokens_t{k + 1}"] = num_tokens[k]
  if num_attempts >= 2:
    r1, r2 = rewards[:, 0], rewards[:, 1]
    metrics["delta"] = jnp.mean(r2 - r1)
    metrics["i2c"] = jnp.mean((r1 < 0.5) & (r2 >= 0.5)).astype(jnp.float32)
    metrics["c2i"] = jnp.mean((r1 >= 0.5) & (r2 < 0.5)).astype(jnp.float32)
  if entropy is not None:
    ent = jnp.where(in_attempt, entropy.astype(jnp.float32), 0.0)
    metrics["entropy"] = jnp.sum(ent) / jnp.maximum(jnp.sum(num_tokens), 1.0)
  return loss, metrics
