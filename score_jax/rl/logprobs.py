"""Per-token log-probs and entropy of long sequences without [B, T, V] logits.

    logp, entropy, top1 = token_logprobs(cfg, params, hidden, targets, log_probs_fn)

`hidden` [B, T, D] are the model's final hidden states (`model.apply`), `targets` [B, T] the
token each position predicts. The sequence axis is cut into chunks of `chunk_len` positions; a
`lax.scan` computes each chunk's float32 logits [B, chunk_len, V], takes what it needs and
drops them, and `jax.checkpoint` makes the backward pass recompute them chunk by chunk rather
than keep them. Peak memory is O(B * chunk_len * V) instead of O(B * T * V), with the same
values and gradients as the unchunked computation (`tests/test_logprobs.py`).

Chunks run along T, not over flattened tokens, and each chunk is computed vocabulary-parallel:
its few rows of hidden states go to every device, each device computes the logits of its own
slice of the vocabulary (the embedding is split on V, see partitioning.py), and the softmax
reductions cross devices. No device holds the whole [V, D] head, nor logits of all of V.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_jax.models import transformer as model_lib

Array = jax.Array
LogProbsFn = Callable[[Array], Array]  # float32 logits [..., V] -> log-probs [..., V]

DEFAULT_CHUNK_LEN = 256


def token_logprobs(cfg: model_lib.ModelConfig, params: Any, hidden: Array, targets: Array,
                   log_probs_fn: Optional[LogProbsFn] = None,
                   chunk_len: Optional[int] = None) -> tuple[Array, Array, Array]:
  """Log-prob, entropy and argmax-hit of each target, all float32 [B, T].

  Args:
    cfg, params: the model (only its output head is used here).
    hidden: [B, T, D] final hidden states.
    targets: int32 [B, T].
    log_probs_fn: the distribution, from float32 logits (e.g. `sampling.Sampling(...).
      log_probs` for temperature and truncation); None: the plain softmax.
    chunk_len: positions per chunk; None: `DEFAULT_CHUNK_LEN`.

  Returns:
    logp: log_probs_fn(logits)[target] (differentiable).
    entropy: entropy of that distribution (no gradient).
    top1: 1.0 where the target is the most likely token under the raw logits, else 0.0.
  """
  log_probs_fn = log_probs_fn or (lambda logits: jax.nn.log_softmax(logits, axis=-1))
  chunk_len = DEFAULT_CHUNK_LEN if chunk_len is None else chunk_len
  if chunk_len < 1:
    raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
  batch, length, _ = hidden.shape
  chunk = min(chunk_len, length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length

  def chunked(x):  # [B, T, ...] -> [num_chunks, B, chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((batch, num_chunks, chunk) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one(params, h, t):
    # Vocabulary-parallel: every device takes all rows of the chunk and its slice of the
    # vocabulary (see partitioning.py), so the [V, D] head is never gathered.
    h = nn.with_logical_constraint(h, (None, model_lib.A_LENGTH, model_lib.A_EMBED))
    logits = nn.with_logical_constraint(model_lib.logits_of(cfg, params, h),
                                        (None, model_lib.A_LENGTH, model_lib.A_VOCAB))
    log_probs = log_probs_fn(logits)
    logp = jnp.take_along_axis(log_probs, t[..., None], axis=-1)[..., 0]
    probs = jnp.exp(log_probs)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)
    target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    top1 = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return logp, jax.lax.stop_gradient(entropy), jax.lax.stop_gradient(top1)

  # The output head in the compute dtype, converted once rather than once per chunk.
  head = {k: params[k].astype(cfg.dtype) for k in ("embedding", "lm_head") if k in params}
  _, out = jax.lax.scan(lambda _, xs: (None, one(head, *xs)), None,
                        (chunked(hidden), chunked(targets)))
  # [num_chunks, B, chunk] -> [B, T]
  return tuple(jnp.moveaxis(x, 0, 1).reshape(batch, -1)[:, :length] for x in out)
