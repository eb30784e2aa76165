"""What the benchmarks measure against: the model's work, counted, and the machine's peaks.

Counted work (exact for `models/transformer.py`'s computation, checked against the matmuls of
its jaxpr in tests/test_benchmarks.py):

* `matmul_params(cfg)`: weights that enter a matmul: per layer the q, k, v, o projections and
  the three MLP matrices, plus the output head (the tied embedding counted once). Norm scales
  and biases are left out (they are no matmul; < 0.1% of the parameters here).
* `attention_flops(cfg, q_len, k_len)`: one sequence's score (Q K^T) and mix (P V) matmuls
  over all layers: 2 * 2 * q_len * k_len * num_heads * head_dim per layer. `models/transformer.py`
  computes every query against every key in its span and masks afterwards.
* `self_attention_flops(cfg, seq_len)`: the same for a forward without cache, which computes
  the causal square in `causal_blocks` query blocks, block i against key blocks 0..i: the
  blocks computed, n (n + 1) / 2 of n^2 (the full square for short sequences; 5/8 of it for
  512 tokens), not the whole rectangle PaLM's model-FLOPs formula counts.
* `train_flops(cfg, batch, seq_len)`: model FLOPs of one training step on B sequences of T
  tokens: forward 2 * matmul_params * B * T + attention, backward twice the forward, so
      6 * matmul_params * B * T + 3 * B * self_attention_flops(cfg, T).
  Recomputation (remat, the chunked log-probs' backward) is real work but not model FLOPs.
* `decode_step_flops` / `decode_step_bytes`: one sampler step (one new token per row), its
  sliding-window layers attending at most their window (`attended_slots`).

Measured peaks (same process, same moment as the benchmark, so a loaded machine lowers both):

* `matmul_flops_per_s(n)`: a float32 n x n x n `jnp.dot`, median of repeats.
* `memory_bandwidth()`: bytes per second of reading a float32 1 GiB array once, the better of
  a `jnp.sum` and a [1, 1024] x [1024, n] vector-matrix product (the access pattern of a
  batch-1 decode step's weights), medians of repeats.
"""

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_jax.models import transformer as model_lib


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """Median wall time of `fn()` (its result blocked on) over `repeats` calls after `warmup`."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_params(cfg: model_lib.ModelConfig) -> int:
  """Number of weights that enter matmuls (see the module docstring)."""
  d, h, k, hd, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = d * hd * (h + 2 * k) + h * hd * d + 3 * d * f
  return cfg.num_layers * per_layer + cfg.vocab_size * d


def attention_flops(cfg: model_lib.ModelConfig, q_len: int, k_len: int) -> int:
  """Forward FLOPs of one sequence's attention matmuls, all layers (q_len queries x k_len keys)."""
  return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * q_len * k_len


def self_attention_flops(cfg: model_lib.ModelConfig, seq_len: int) -> int:
  """Forward FLOPs of one sequence's attention matmuls without cache, all layers: the query
  blocks against the keys they attend (see the module docstring)."""
  n = model_lib.causal_blocks(seq_len)
  size = seq_len // n
  return sum(attention_flops(cfg, size, (i + 1) * size) for i in range(n))


def train_flops(cfg: model_lib.ModelConfig, batch: int, seq_len: int) -> int:
  """Model FLOPs of one forward + backward over `batch` sequences of `seq_len` tokens."""
  forward = 2 * matmul_params(cfg) * batch * seq_len + batch * self_attention_flops(
      cfg, seq_len)
  return 3 * forward


def attended_slots(cfg: model_lib.ModelConfig, attend_len: int) -> int:
  """Cache slots a decode step attending `attend_len` slots reads, summed over the layers: a
  sliding-window layer at most its window (its keys in a ring once the cache is longer:
  `init_cache`)."""
  cache = jax.eval_shape(lambda: model_lib.init_cache(cfg, 1, attend_len))
  if cache.ring_k is None:
    return cfg.num_layers * attend_len
  return cache.k.shape[0] * attend_len + cache.ring_k.shape[1] * cfg.sliding_window


def decode_step_flops(cfg: model_lib.ModelConfig, batch: int, attend_len: int) -> int:
  """FLOPs of one decode step: one token per row through every matmul and the output head,
  attending `attend_len` cache slots (`attended_slots`)."""
  return batch * (2 * matmul_params(cfg)
                  + 4 * cfg.num_heads * cfg.head_dim * attended_slots(cfg, attend_len))


def decode_step_bytes(cfg: model_lib.ModelConfig, batch: int, attend_len: int) -> int:
  """Bytes a decode step must read at least: every matmul weight once (in `param_dtype`) and
  the keys and values of the `attended_slots` of every row (cache in `cfg.dtype`)."""
  weight_bytes = matmul_params(cfg) * jnp.dtype(cfg.param_dtype).itemsize
  kv_values = 2 * batch * attended_slots(cfg, attend_len) * cfg.num_kv_heads * cfg.head_dim
  return weight_bytes + kv_values * jnp.dtype(cfg.dtype).itemsize


def matmul_flops_per_s(n: int, repeats: int = 5) -> float:
  """Achieved FLOP/s of a float32 [n, n] x [n, n] `jnp.dot` (median of `repeats`)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  return 2 * n**3 / median_seconds(lambda: dot(a, b), repeats)


def memory_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
  """Read bandwidth in bytes/s over a float32 array of `num_bytes` (a multiple of 4 KiB): the
  faster of a sum and a vector-matrix product (medians of `repeats`)."""
  x = jnp.asarray(np.ones((1024, num_bytes // 4096), np.float32))
  v = jnp.ones((1, 1024), jnp.float32)
  total, vecmat = jax.jit(jnp.sum), jax.jit(jnp.dot)
  seconds = min(median_seconds(lambda: total(x), repeats),
                median_seconds(lambda: vecmat(v, x), repeats))
  return num_bytes / seconds
