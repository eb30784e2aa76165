"""Sampling methods: how the next token is chosen from float32 logits, as small static objects.

    method = Sampling(temperature=1.0, top_p=0.95)   # or Greedy()
    tokens, logp = method.choose(logits, rng)        # [B, V] -> [B], [B]
    log_probs = method.log_probs(logits)             # [..., V]: the distribution sampled from

`log_probs` is THE distribution a method samples from (temperature applied, tokens outside
top-k / top-p / min-p at -inf, the rest renormalised), so the log-probs the sampler reports and
those the trainer recomputes for the same tokens (`logprobs.token_logprobs` with
`method.log_probs`) are the same quantity. Methods are frozen dataclasses: hashable, so a
compiled sampler is specialised to one (greedy decoding pays for no random numbers).
"""

import dataclasses
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Greedy:
  """The argmax token; its reported log-prob is under the plain softmax."""

  def log_probs(self, logits: Array) -> Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  def choose(self, logits: Array, rng: Array) -> tuple[Array, Array]:
    del rng
    logits = logits.astype(jnp.float32)
    tokens = jnp.argmax(logits, axis=-1)
    return tokens, _take(logits, tokens) - jax.nn.logsumexp(logits, axis=-1)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Ancestral sampling at `temperature`, optionally truncated.

  Truncations apply in this order, each to the distribution the previous ones left:
  top_k: the k most likely tokens (ties at the k-th logit are all kept);
  top_p: the smallest set of most likely tokens whose probability reaches p (nucleus);
  min_p: tokens with probability >= min_p times the most likely token's.
  """
  temperature: float = 1.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None
  min_p: Optional[float] = None

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0 (use Greedy() for 0), got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.min_p is not None and not 0 <= self.min_p <= 1:
      raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

  def log_probs(self, logits: Array) -> Array:
    return jax.nn.log_softmax(self._scores(logits), axis=-1)

  def choose(self, logits: Array, rng: Array) -> tuple[Array, Array]:
    scores = self._scores(logits)
    tokens, log_norm = categorical(rng, scores)
    return tokens, _take(scores, tokens) - log_norm

  def _scores(self, logits: Array) -> Array:
    """float32 logits / temperature, -inf outside the truncations: log-probs up to a
    constant."""
    logits = logits.astype(jnp.float32) / self.temperature
    if self.top_k is not None and self.top_k < logits.shape[-1]:
      kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
      logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if self.top_p is not None and self.top_p < 1:
      ordered = jnp.sort(logits, axis=-1)[..., ::-1]
      probs = jax.nn.softmax(ordered, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
      # The least likely kept token: the last one whose predecessors hold < p.
      kept = jnp.sum(before < self.top_p, axis=-1, keepdims=True)
      threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
      logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    if self.min_p is not None and self.min_p > 0:
      floor = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(self.min_p)
      logits = jnp.where(logits >= floor, logits, -jnp.inf)
    return logits


def categorical(rng: Array, scores: Array) -> tuple[Array, Array]:
  """A token drawn from each row of `scores` [..., V] (log-probabilities up to a constant),
  by Gumbel-max in two levels: a block of ~sqrt(V) tokens by its total probability, then a
  token in it; and each row's logsumexp, from the block totals the draw computes anyway.

  P(block) * P(token | block) is exactly P(token), as with one Gumbel per token, but it draws
  ~2 sqrt(V) random numbers per row instead of V (512 + 512 for Gemma's 262k vocabulary: the
  draw had cost more than the output head on a CPU). The drawn token's log-prob is its score
  minus the logsumexp: no normalised [..., V] array is written.
  """
  *lead, v = scores.shape
  size = max(1, math.isqrt(v))
  num_blocks = -(-v // size)
  padded = jnp.pad(scores, [(0, 0)] * len(lead) + [(0, num_blocks * size - v)],
                   constant_values=-jnp.inf)
  blocks = padded.reshape(*lead, num_blocks, size)
  block_log_mass = jax.nn.logsumexp(blocks, axis=-1)
  block_rng, token_rng = jax.random.split(rng)
  block = jnp.argmax(block_log_mass + jax.random.gumbel(block_rng, (*lead, num_blocks)),
                     axis=-1)
  inside = jnp.take_along_axis(blocks, block[..., None, None], axis=-2)[..., 0, :]
  token = jnp.argmax(inside + jax.random.gumbel(token_rng, (*lead, size)), axis=-1)
  return block * size + token, jax.nn.logsumexp(block_log_mass, axis=-1)


Method = Union[Greedy, Sampling]


def from_temperature(temperature: float, **truncation) -> Method:
  """Greedy() for temperature 0, else Sampling(temperature, **truncation)."""
  if temperature == 0:
    if any(v is not None for v in truncation.values()):
      raise ValueError("top_k / top_p / min_p need a temperature > 0")
    return Greedy()
  return Sampling(float(temperature), **truncation)


def _take(log_probs: Array, tokens: Array) -> Array:
  return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
