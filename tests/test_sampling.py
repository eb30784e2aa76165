"""Sampling methods draw from exactly the distribution `log_probs` reports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax.decoding import sampler as sampler_lib
from score_jax.decoding import sampling

DRAWS = 20_000


def _frequencies(draw, v: int, key_fn) -> np.ndarray:
  keys = jax.vmap(key_fn)(jnp.arange(DRAWS))
  tokens = np.asarray(jax.jit(jax.vmap(draw))(keys))
  assert tokens.min() >= 0 and tokens.max() < v
  return np.bincount(tokens, minlength=v) / DRAWS


def _assert_matches(freq: np.ndarray, probs: np.ndarray) -> None:
  """Each token's frequency within 5 standard errors of its probability (fixed keys:
  deterministic)."""
  tolerance = 5 * np.sqrt(probs * (1 - probs) / DRAWS) + 1e-3
  assert np.all(np.abs(freq - probs) <= tolerance), np.c_[freq, probs]


# V = 10: blocks of 3, the last one padded; 64: 8 blocks of 8; 1: one token.
@pytest.mark.parametrize("v", [10, 64, 1])
def test_categorical_draws_each_token_with_its_probability(v):
  logits = jnp.asarray(np.random.default_rng(v).normal(scale=2.0, size=v), jnp.float32)
  log_probs = jax.nn.log_softmax(logits)
  freq = _frequencies(lambda k: sampling.categorical(k, log_probs)[0], v, jax.random.PRNGKey)
  _assert_matches(freq, np.exp(np.asarray(log_probs)))
  # The row's logsumexp, from the block totals: that of the unnormalised scores too.
  _, log_norm = sampling.categorical(jax.random.PRNGKey(0), logits)
  np.testing.assert_allclose(log_norm, jax.nn.logsumexp(logits), rtol=1e-6)


@pytest.mark.parametrize("method", [
    sampling.Sampling(0.7),
    sampling.Sampling(1.0, top_k=3),
    sampling.Sampling(1.3, top_p=0.6),
    sampling.Sampling(0.9, top_k=5, top_p=0.8, min_p=0.05),
], ids=["temperature", "top_k", "top_p", "all"])
def test_choose_samples_the_distribution_it_reports(method):
  """Tokens outside a truncation are never drawn, the others as often as `log_probs` says,
  with the decode loop's kind of key; the reported log-prob is the drawn token's."""
  v = 23
  logits = jnp.asarray(np.random.default_rng(1).normal(scale=1.5, size=(1, v)), jnp.float32)
  probs = np.exp(np.asarray(method.log_probs(logits))[0])
  key_fn = lambda i: sampler_lib.token_key(jax.random.PRNGKey(i))
  freq = _frequencies(lambda k: method.choose(logits, k)[0][0], v, key_fn)
  assert np.all(freq[probs == 0] == 0)
  _assert_matches(freq, probs)
  tokens, logp = method.choose(logits, key_fn(0))
  np.testing.assert_allclose(logp, np.log(probs[np.asarray(tokens)]), rtol=1e-5)
