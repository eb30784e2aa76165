"""Chunked log-probs against the unchunked [B, T, V] computation: values, gradients, memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from score_jax.decoding import sampling
from score_jax.models import transformer as model_lib
from score_jax.rl import logprobs
from score_jax.rl import objectives
from score_jax.rl import train_step


def unchunked(cfg, params, hidden, targets, log_probs_fn):
  """The obvious computation: all logits at once."""
  log_probs = log_probs_fn(model_lib.logits_of(cfg, params, hidden))
  logp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  probs = jnp.exp(log_probs)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)
  return logp, entropy


@pytest.fixture(scope="module")
def setup():
  cfg = model_lib.tiny_config(vocab_size=40, final_logit_softcap=30.0, tie_embeddings=False)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 40, (3, 13)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(13), tokens.shape)
  hidden, _ = model_lib.apply(cfg, params, tokens, positions)
  return cfg, params, hidden[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("chunk_len", [1, 5, 12, 64])
@pytest.mark.parametrize("method", [sampling.Sampling(1.0), sampling.Sampling(0.7, top_k=7),
                                    sampling.Sampling(1.0, top_p=0.5, min_p=0.01)],
                         ids=["plain", "top_k", "top_p_min_p"])
def test_values_and_gradients_match_unchunked(setup, chunk_len, method):
  cfg, params, hidden, targets = setup
  # Targets outside a truncated support have log-prob -inf: compare where finite.
  ref_logp, ref_ent = unchunked(cfg, params, hidden, targets, method.log_probs)
  logp, ent, top1 = logprobs.token_logprobs(cfg, params, hidden, targets, method.log_probs,
                                            chunk_len)
  finite = np.isfinite(np.asarray(ref_logp))
  assert finite.sum() >= 4
  np.testing.assert_allclose(np.asarray(logp)[finite], np.asarray(ref_logp)[finite],
                             rtol=1e-6, atol=1e-6)
  assert not np.isfinite(np.asarray(logp)[~finite]).any()
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-6, atol=1e-6)
  logits = model_lib.logits_of(cfg, params, hidden)
  np.testing.assert_array_equal(
      top1, (jnp.argmax(logits, -1) == targets).astype(jnp.float32))

  # Gradients of a weighted sum of the finite log-probs, w.r.t. params and hidden states.
  weights = jnp.asarray(np.random.default_rng(1).normal(size=targets.shape) * finite,
                        jnp.float32)

  def loss(fn, p, h):
    lp = fn(p, h)
    return jnp.sum(jnp.where(finite, lp, 0.0) * weights)

  chunk_fn = lambda p, h: logprobs.token_logprobs(cfg, p, h, targets, method.log_probs,
                                                  chunk_len)[0]
  ref_fn = lambda p, h: unchunked(cfg, p, h, targets, method.log_probs)[0]
  g = jax.grad(functools.partial(loss, chunk_fn), argnums=(0, 1))(params, hidden)
  g_ref = jax.grad(functools.partial(loss, ref_fn), argnums=(0, 1))(params, hidden)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), g, g_ref)


def _train_step_temp_bytes(vocab_size: int, chunk_len: int) -> int:
  """Temporary bytes of a compiled RL train step (loss, gradient, Adam) on a small config;
  chunk_len = T: one chunk, i.e. the unchunked [B, T, V] computation."""
  cfg = model_lib.tiny_config(vocab_size=vocab_size, num_layers=2)
  objective = objectives.ObjectiveConfig(kind="stage2", n=2)
  loss_fn = functools.partial(train_step.policy_loss, model_cfg=cfg, objective=objective,
                              method=sampling.Sampling(1.0), chunk_len=chunk_len)
  optimizer = optax.adam(1e-3)
  params = jax.eval_shape(functools.partial(model_lib.init_params, cfg), jax.random.PRNGKey(0))
  state = jax.eval_shape(lambda p: train_step.init_state(p, optimizer), params)
  b, t = 4, 129
  batch = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32),
           "attempt": jax.ShapeDtypeStruct((b, t), jnp.int32),
           "rewards": jax.ShapeDtypeStruct((b, 2), jnp.float32),
           "ref_logp": jax.ShapeDtypeStruct((b, t - 1), jnp.float32)}
  step = jax.jit(train_step.make_train_step(loss_fn, optimizer), donate_argnums=0)
  return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_train_step_temporaries_stay_nearly_flat_as_vocabulary_grows():
  """V grows 64x: the unchunked step's temporaries grow by its [B, T, V] logits; the chunked
  one's only by a [B, chunk, V] slice and the [V, D] head gradient."""
  small, large = 256, 256 * 64
  unchunked = _train_step_temp_bytes(large, 128) - _train_step_temp_bytes(small, 128)
  chunked = _train_step_temp_bytes(large, 8) - _train_step_temp_bytes(small, 8)
  logits_bytes = 4 * 128 * (large - small) * 4  # one float32 [B, T, V] tensor's growth
  assert unchunked > 2 * logits_bytes
  assert chunked < 0.2 * unchunked
