"""Decoder-only transformer covering the Gemma (1, 2, 3) and Llama / Qwen families.

The layers are one `nn.scan` over a stacked parameter tree (compile time does not grow with
depth), optionally rematerialised, with mixed precision:

    hidden, cache = apply(cfg, params, tokens, positions, cache)   # the transformer body
    logits = logits_of(cfg, params, hidden)                          # float32 [..., V]
    logits, cache = forward(cfg, params, tokens, positions, cache)   # both (small models, tests)

* `tokens`, `positions`: int32 [B, S]; a negative position marks a token nothing attends
  (padding, a finished row's filler).
* `cache`: None (causal attention over the S tokens given, as in training: tokens are in
  position order, none attends a later slot, which lets `causal_blocks` skip the blocks above
  the diagonal) or a
  `KVCache` from `init_cache` (decoding: the S new keys/values of every row go to the cache's
  next S slots, written in place with one `dynamic_update_slice` per layer; a query attends
  the filled slots whose position is <= its own, within the first `attend_len` slots when that
  static bound is given). Slots are shared by all rows and positions are per row, so rows at
  different lengths decode in lockstep; a row's unused slots hold position -1.
  Sliding-window layers of a cache longer than the window keep their keys in a ring of
  `window` slots per row instead (slot = position mod window, one scatter per layer), which
  holds exactly the keys the window lets a query see, provided each row's positions run
  0, 1, 2, ... across calls with none repeated (as the sampler feeds them; `init_cache(...,
  ring=False)` for anything else). A single new token is written, then attends the ring; a
  chunk of S tokens attends the ring as it was plus itself, and is written after all layers
  (its later tokens may take the slots of keys its earlier ones still see).
* `hidden`: [B, S, D] final-normed activations in the compute dtype. Log-probs of long
  sequences come from `logprobs.py`, which never holds [B, S, V] logits at once.

Parameters. `params["layers"]` holds every layer's weights stacked on a leading "layers" axis
(layer i is index i of each leaf); `embedding`, `final_norm` and (untied) `lm_head` sit at the
top. Layer kinds (Gemma 2/3 sliding-window "local" layers vs "global" ones) differ only in data
(window, rope base and scale), passed to the scan as per-layer inputs, so one compiled layer
serves all of them.

Precision. Parameters are stored in `param_dtype` (float32 master weights for training) and
cast to `dtype` for compute (bfloat16 on accelerators); norms, softmax, rope, logits and
everything downstream (log-probs, KL, losses) are float32.

Every parameter and the main activations carry logical axis names (see `partitioning.py`),
so partitioning rules, not this file, decide how they are sharded.
"""

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# Logical axis names used in this file. Parameters:
EMBED, VOCAB, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS = (
    "embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers")
# Activations:
A_BATCH, A_LENGTH, A_EMBED, A_HEADS, A_KV_HEADS, A_MLP, A_VOCAB = (
    "act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")

# Rematerialisation policies of the scanned layer (what the backward pass keeps of a layer).
REMAT_POLICIES = {
    "none": None,  # no remat: every intermediate is saved
    "full": jax.checkpoint_policies.nothing_saveable,  # only each layer's input
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmul outputs
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of one model. Defaults are Llama-style; see the named configs in configs.py."""
  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  # Family switches.
  activation: str = "silu"            # "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
  norm_plus_one: bool = False         # Gemma RMSNorm: x * (1 + scale).
  norm_eps: float = 1e-6
  scale_embeddings: bool = False      # Gemma: embeddings * sqrt(embed_dim).
  tie_embeddings: bool = True
  qkv_bias: bool = False              # Qwen2.
  qk_norm: bool = False               # Gemma 3, Qwen3.
  post_norms: bool = False            # Gemma 2/3: norms after attention and after MLP.
  query_pre_attn_scalar: Optional[float] = None  # None: head_dim.
  attn_logit_softcap: Optional[float] = None      # Gemma 2.
  final_logit_softcap: Optional[float] = None     # Gemma 2.
  # Attention pattern: layer i is global iff (i + 1) % global_every == 0 (1: all global).
  sliding_window: Optional[int] = None
  global_every: int = 1
  rope_base: float = 10_000.0          # global layers
  rope_local_base: Optional[float] = None  # local (sliding) layers; None: rope_base.
  rope_scale: float = 1.0              # linear position scaling on global layers (Gemma 3 4B+).
  # Llama 3.x frequency scaling on global layers: (factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings), or None.
  llama3_rope: Optional[tuple[float, float, float, int]] = None
  # Precision and memory (not architecture: the same weights run under any of these).
  dtype: Any = jnp.float32             # compute dtype of activations and matmuls
  param_dtype: Any = jnp.float32       # storage dtype of the parameters
  remat: str = "none"                  # a key of REMAT_POLICIES

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, "
                       f"got {self.activation!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")

  def is_global(self, layer: int) -> bool:
    return self.sliding_window is None or (layer + 1) % self.global_every == 0

  def num_params(self) -> int:
    """Number of parameters (embedding counted once when tied)."""
    d, h, k, hd, f = (self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim,
                      self.mlp_dim)
    attn = d * hd * (h + 2 * k) + h * hd * d
    if self.qkv_bias:
      attn += hd * (h + 2 * k)
    if self.qk_norm:
      attn += 2 * hd
    norms = d * (4 if self.post_norms else 2)
    layer = attn + 3 * d * f + norms
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * layer + d + head


def tiny_config(vocab_size: int = 64, **overrides) -> ModelConfig:
  """A toy Gemma-3-like config (all family features on) for tests and the CPU demo."""
  kw = dict(vocab_size=vocab_size, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
            head_dim=16, mlp_dim=128, activation="gelu_tanh", norm_plus_one=True,
            scale_embeddings=True, qk_norm=True, post_norms=True, sliding_window=8,
            global_every=2, rope_local_base=10_000.0, rope_base=1_000_000.0)
  kw.update(overrides)
  return ModelConfig(**kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """The keys and values of the layers in T slots shared by the rows (see the module docstring).

  With a ring (`ring_k` not None), `k` / `v` hold the global layers only (in layer order) and
  the local (sliding-window) layers keep theirs in `ring_k` / `ring_v`, W = window slots per
  row, slot = position mod W, rows first (each row's writes are its own: a batching dimension
  of the scatter, which a sharded batch keeps sharded). Heads before slots: attention
  contracts each head's [T, H] block as it is stored.
  """
  k: Array      # [L, B, K, T, H]; with a ring [L_global, B, K, T, H]
  v: Array
  pos: Array    # int32 [B, T]: position of the token in each slot; -1: none
  used: Array   # int32 scalar: slots filled so far; the next tokens go to slot `used` on
  ring_k: Optional[Array] = None    # [B, L_local, K, W, H]
  ring_v: Optional[Array] = None
  ring_pos: Optional[Array] = None  # int32 [B, W]: position held by each ring slot; -1: none


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = None,
               ring: Optional[bool] = None) -> KVCache:
  """An empty cache of `length` slots per sequence, in `dtype` (default: the compute dtype).

  `ring`: keep the sliding-window layers' keys in a ring of `cfg.sliding_window` slots (see
  the module docstring); None: when that saves memory (`length` longer than the window, and
  the model has layers of both kinds).
  """
  local = sum(not cfg.is_global(i) for i in range(cfg.num_layers))
  can_ring = 0 < local < cfg.num_layers
  if ring is None:
    ring = can_ring and length > cfg.sliding_window
  elif ring and not can_ring:
    raise ValueError("a ring cache needs both sliding-window and global layers; "
                     f"this model has {local} sliding-window layers of {cfg.num_layers}")
  dtype = cfg.dtype if dtype is None else dtype
  kv = lambda layers, slots: jnp.zeros(
      (layers, batch, cfg.num_kv_heads, slots, cfg.head_dim), dtype)
  shared = cfg.num_layers - local if ring else cfg.num_layers
  cache = KVCache(kv(shared, length), kv(shared, length),
                  jnp.full((batch, length), -1, jnp.int32), jnp.zeros((), jnp.int32))
  if ring:
    w = cfg.sliding_window
    ring = lambda: kv(local, w).swapaxes(0, 1)
    cache = dataclasses.replace(cache, ring_k=ring(), ring_v=ring(),
                                ring_pos=jnp.full((batch, w), -1, jnp.int32))
  return cache


def _param(module, name, init, shape, axes, cfg):
  """A parameter stored in `cfg.param_dtype`, returned cast to the compute dtype."""
  value = module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)
  return value.astype(cfg.dtype)


class RMSNorm(nn.Module):
  cfg: ModelConfig
  axis_name: str = EMBED

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)),
                       (x.shape[-1],), cfg.param_dtype).astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
    return (y * (1.0 + scale if cfg.norm_plus_one else scale)).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig, is_global: Array) -> Array:
  """Inverse frequencies [head_dim / 2] (float32) of a layer; `is_global` may be traced."""
  half = cfg.head_dim // 2
  exponents = jnp.arange(half, dtype=jnp.float32) * 2.0 / cfg.head_dim
  local_base = cfg.rope_local_base or cfg.rope_base
  base = jnp.where(is_global, cfg.rope_base, local_base).astype(jnp.float32)
  freq = base ** -exponents
  if cfg.llama3_rope is not None:
    factor, low, high, old_len = cfg.llama3_rope
    wavelength = 2.0 * math.pi / freq
    smooth = jnp.clip((old_len / wavelength - low) / (high - low), 0.0, 1.0)
    scaled = (1.0 - smooth) * freq / factor + smooth * freq
    freq = jnp.where(is_global, scaled, freq)
  return freq / jnp.where(is_global, cfg.rope_scale, 1.0)


def apply_rope(x: Array, positions: Array, freq: Array) -> Array:
  """Rotary embedding, half-split convention. x: [B, S, N, H]; positions: [B, S]."""
  angle = positions.astype(jnp.float32)[..., None] * freq  # [B, S, H/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _softcap(x: Array, cap: Optional[float]) -> Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


def _dot32(spec: str, a: Array, b: Array) -> Array:
  """einsum of compute-dtype operands with float32 accumulation and result."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def dense(x: Array, w: Array, n_in: int = 1, transposed: bool = False,
          preferred_element_type: Any = None) -> Array:
  """x [..., *w.shape[:n_in]] times w: [..., *w.shape[n_in:]], as one 2-D matmul.

  The leading axes of `x` (batch, length) are merged into one before the matmul, and the
  contracted / output axes of `w` into one each (all bitcasts, no copies). The gradient of `w`
  is then a 2-D dot contracting the tokens axis of two row-major operands, which XLA runs
  as is; contracting several leading axes (`einsum("bsd,df->bsf")`) makes XLA:CPU first
  transpose the (fused, recomputed) activations in a slow elementwise loop: the MLP's forward
  and backward ran 1.6x faster this way on a 2-core CPU. `transposed`: `w` is stored
  [*out, *in] (the tied embedding [V, D] as output head). `preferred_element_type`: as
  `jnp.dot`'s (float32 for logits).
  """
  lead = x.shape[:x.ndim - n_in]
  k = math.prod(x.shape[x.ndim - n_in:])
  if transposed:
    out_shape = w.shape[:w.ndim - n_in]
    y = jnp.dot(x.reshape(-1, k), w.reshape(-1, k).T,
                preferred_element_type=preferred_element_type)
  else:
    out_shape = w.shape[n_in:]
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1),
                preferred_element_type=preferred_element_type)
  return y.reshape(lead + out_shape)


# Queries of a forward without cache attend in blocks of at least this many (`causal_blocks`).
_CAUSAL_BLOCK_MIN = 128
_CAUSAL_BLOCKS_MAX = 4


def causal_blocks(length: int) -> int:
  """Query blocks of a self-attention over `length` tokens without cache: the most, up to
  _CAUSAL_BLOCKS_MAX, that divide it into blocks of at least _CAUSAL_BLOCK_MIN tokens. Block
  i attends the keys of blocks 0..i only, so (n - 1) / 2n of the square is not computed: on
  a 2-core CPU, SmolLM2-135M train steps at 16 x 512 tokens took 26.8-31.0 s with 2 blocks
  against 29.5-31.4 s with 1 (three of each, alternating in one process; 4 blocks: the same
  as 2)."""
  return max(n for n in range(1, _CAUSAL_BLOCKS_MAX + 1)
             if n == 1 or (length % n == 0 and length // n >= _CAUSAL_BLOCK_MIN))


def _attend(cfg: ModelConfig, qg: Array, q_pos: Array, keys: Array, values: Array,
            key_pos: Array, *, is_global: Array, decoding: bool) -> Array:
  """Softmax attention of grouped queries qg [B, K, S, G, H] at positions q_pos [B, S] over
  keys / values [B, K, T, H] at key_pos [B, T]: [B, K, S, G, H] float32."""
  # Query position p sees key position j iff 0 <= j <= p (and p - j < window on local
  # layers).
  distance = q_pos[:, :, None] - key_pos[:, None, :]  # [B, S, T]
  visible = (distance >= 0) & (key_pos[:, None, :] >= 0)
  if cfg.sliding_window is not None:
    visible &= is_global | (distance < cfg.sliding_window)
  scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
  if not decoding:
    logits = _dot32("bksgh,bkth->bksgt", qg, keys.astype(cfg.dtype))
  else:  # Few queries against many cached keys: XLA:CPU's batched dot runs faster with the
    # keys' axis first in its result (decode probes at batch 32: SmolLM2 +22%, Gemma 3
    # +6% tokens/s); the transpose of the small result is cheap. Training shapes (as many
    # queries as keys) are faster the other way.
    logits = _dot32("bksgh,bkth->bktsg", qg, keys.astype(cfg.dtype)).transpose(0, 1, 3, 4, 2)
  logits = logits * scale  # [B, K, S, G, T]
  logits = _softcap(logits, cfg.attn_logit_softcap)
  logits = jnp.where(visible[:, None, :, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1)
  return _dot32("bksgt,bkth->bksgh", probs.astype(cfg.dtype), values.astype(cfg.dtype))


def _write_shared(cache: KVCache, layer: Array, k: Array, v: Array,
                  skip: Any = False) -> KVCache:
  """The cache with keys / values [B, S, K, H] in layer `layer`'s next S shared slots, written
  in place; where `skip` (a traced bool; or a Python one, when the layer kind is known) the
  slots get back what they hold instead."""
  if skip is True:
    return cache
  at = (layer, 0, 0, cache.used, 0)

  def put(buf, new):
    new = new.swapaxes(1, 2)[None].astype(buf.dtype)
    if skip is not False:  # Both reads and writes clamp `at` alike: a no-op at any index.
      new = jnp.where(skip, jax.lax.dynamic_slice(buf, at, new.shape), new)
    return jax.lax.dynamic_update_slice(buf, new, at)
  return dataclasses.replace(cache, k=put(cache.k, k), v=put(cache.v, v))


def _shared_span(cache: KVCache, layer: Array, attend_len: Optional[int]):
  """Layer `layer`'s keys and values [B, K, T', H] in the first T' = `attend_len` (all when
  None) shared slots, and their positions [B, T']."""
  span = cache.k.shape[3] if attend_len is None else attend_len
  keys = jax.lax.dynamic_index_in_dim(cache.k, layer, keepdims=False)[:, :, :span]
  values = jax.lax.dynamic_index_in_dim(cache.v, layer, keepdims=False)[:, :, :span]
  return keys, values, cache.pos[:, :span]


def ring_slots(positions: Array, size: int) -> Array:
  """The ring slot [B, S] of each token at `positions` [B, S]: position mod `size`, or `size`
  (out of range: not written) for padding and for a token that a later token of its row in
  the same chunk would overwrite."""
  last = positions.max(axis=1, keepdims=True)
  keep = (positions >= 0) & (positions > last - size)
  return jnp.where(keep, positions % size, size)


def _scatter_ring(ring: Array, layers, slots: Array, new: Array) -> Array:
  """`ring` [B, L_local, K, W, H] with `new` at each row's `slots` [B, S] (slot W: not
  written) of ring layer `layers` (an index: `new` [B, S, K, H]) or of every ring layer
  (`slice(None)`: `new` [B, L_local, K, S, H]), in place. Each row writes its own slots: mapped
  over the rows, the batch is a batching dimension of the scatter, which a sharded batch keeps
  sharded (with a row index the partitioner gathers the updates of all rows)."""
  row = lambda r, s, u: r.at[layers, :, s].set(u.astype(r.dtype), mode="drop")
  return jax.vmap(row)(ring, slots, new)


def _write_ring(cache: KVCache, layer: Array, k: Array, v: Array, positions: Array,
                skip: Any) -> KVCache:
  """The cache with one token's keys / values [B, 1, K, H] in ring layer `layer` at each row's
  slot for `positions` [B, 1]; nothing written where `skip` (a global layer: a traced bool, or
  a Python one when the layer kind is known)."""
  if skip is True:
    return cache
  size = cache.ring_k.shape[3]
  slots = jnp.where(skip, size, ring_slots(positions, size))
  return dataclasses.replace(cache, ring_k=_scatter_ring(cache.ring_k, layer, slots, k),
                             ring_v=_scatter_ring(cache.ring_v, layer, slots, v))


def _write_ring_chunk(cfg: ModelConfig, cache: KVCache, k: Array, v: Array,
                      positions: Array) -> KVCache:
  """The cache with a chunk's keys / values of every layer, [L, B, S, K, H], in the ring (the
  local layers'), after all layers attended the ring as it was."""
  local = jnp.asarray([i for i in range(cfg.num_layers) if not cfg.is_global(i)])
  slots = ring_slots(positions, cache.ring_k.shape[3])
  put = lambda ring, new: _scatter_ring(ring, slice(None), slots,
                                        new[local].transpose(1, 0, 3, 2, 4))
  return dataclasses.replace(cache, ring_k=put(cache.ring_k, k), ring_v=put(cache.ring_v, v))


def _ring_span(cache: KVCache, layer: Array, attend_len: Optional[int]):
  """Ring layer `layer`'s keys and values [B, K, W', H] in its first W' slots, and their
  positions [B, W']: all W, or the first `attend_len` when fewer (positions below it have not
  wrapped)."""
  span = cache.ring_k.shape[3] if attend_len is None else min(cache.ring_k.shape[3],
                                                                attend_len)
  keys = jax.lax.dynamic_index_in_dim(cache.ring_k, layer, 1, keepdims=False)[:, :, :span]
  values = jax.lax.dynamic_index_in_dim(cache.ring_v, layer, 1, keepdims=False)[:, :, :span]
  return keys, values, cache.ring_pos[:, :span]


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, layer: Array, is_global: Array,
               cache: Optional[KVCache], attend_len: Optional[int]):
    """x: [B, S, D]; `layer` / `is_global`: this layer's index in the cache (`layer_kinds`) /
    its kind (traced scalars; Python values when the layers are unrolled).

    With a cache, writes this layer's new keys and values into it (in place) and attends the
    first `attend_len` slots (all when None). Returns (y [B, S, D], cache, written): `written`
    is None, or a chunk's keys and values for the ring, which `apply` writes after the layers.
    """
    cfg = self.cfg
    init = nn.initializers.normal(stddev=0.02)
    wq = _param(self, "q", init, (cfg.embed_dim, cfg.num_heads, cfg.head_dim),
                (EMBED, HEADS, HEAD_DIM), cfg)
    wk = _param(self, "k", init, (cfg.embed_dim, cfg.num_kv_heads, cfg.head_dim),
                (EMBED, KV_HEADS, HEAD_DIM), cfg)
    wv = _param(self, "v", init, (cfg.embed_dim, cfg.num_kv_heads, cfg.head_dim),
                (EMBED, KV_HEADS, HEAD_DIM), cfg)
    wo = _param(self, "o", init, (cfg.num_heads, cfg.head_dim, cfg.embed_dim),
                (HEADS, HEAD_DIM, EMBED), cfg)
    q = dense(x, wq)
    k = dense(x, wk)
    v = dense(x, wv)
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q += _param(self, "q_bias", zeros, wq.shape[1:], (HEADS, HEAD_DIM), cfg)
      k += _param(self, "k_bias", zeros, wk.shape[1:], (KV_HEADS, HEAD_DIM), cfg)
      v += _param(self, "v_bias", zeros, wv.shape[1:], (KV_HEADS, HEAD_DIM), cfg)
    if cfg.qk_norm:
      q = RMSNorm(cfg, HEAD_DIM, name="q_norm")(q)
      k = RMSNorm(cfg, HEAD_DIM, name="k_norm")(k)
    freq = rope_frequencies(cfg, is_global)
    q = apply_rope(q, positions, freq)
    k = apply_rope(k, positions, freq)
    q = nn.with_logical_constraint(q, (A_BATCH, A_LENGTH, A_HEADS, None))

    # Query heads grouped by the key head they share, batch dims (b, k) leading in every
    # operand and result: XLA:CPU runs these batched dots ~1.4x faster than with the query's
    # [B, S, K, G, H] order (a probe of the attention alone; no transposes around each of
    # the B x K small matmuls).
    groups = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(q.shape[:2] + (cfg.num_kv_heads, groups, cfg.head_dim)).transpose(
        0, 2, 1, 3, 4)  # [B, K, S, G, H]
    attend = functools.partial(_attend, cfg, qg, positions, is_global=is_global, decoding=True)
    written = None  # A chunk's keys / values [B, S, K, H] when the ring takes them after.
    if cache is None:  # Attend the S tokens given, causally: query block i sees key blocks
      # 0..i only; the blocks above the diagonal of the square are not computed (training
      # and reference forwards of long sequences).
      keys, values = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, K, S, H]
      n = causal_blocks(q.shape[1])
      size = q.shape[1] // n
      blocks = [_attend(cfg, qg[:, :, i * size:(i + 1) * size],
                        positions[:, i * size:(i + 1) * size], keys[:, :, :(i + 1) * size],
                        values[:, :, :(i + 1) * size], positions[:, :(i + 1) * size],
                        is_global=is_global, decoding=False)
                for i in range(n)]
      out = blocks[0] if n == 1 else jnp.concatenate(blocks, axis=2)
    elif cache.ring_k is None:  # Write the new keys to the next shared slots, attend them.
      cache = _write_shared(cache, layer, k, v)
      out = attend(*_shared_span(cache, layer, attend_len))
    else:  # Global layers as above, local ones in the ring; the other kind's write is a no-op.
      known = isinstance(is_global, bool)  # Unrolled layers: the kind is known.
      cache = _write_shared(cache, layer, k, v,
                            skip=(not is_global) if known else jnp.logical_not(is_global))
      if q.shape[1] > 1:  # A chunk attends the ring as it was, plus itself; `apply` writes
        # it to the ring after all layers (a write here, beside the read, copies the ring).
        # Read outside the `cond`: inside it, the TPU compiler planned Gemma 3 4B's sampler
        # 24-26% higher (the prompt's concatenation held in the branch).
        keys, values, key_pos = _ring_span(cache, layer, attend_len)
        chunk = (jnp.concatenate([keys, k.swapaxes(1, 2).astype(keys.dtype)], axis=2),
                 jnp.concatenate([values, v.swapaxes(1, 2).astype(values.dtype)], axis=2),
                 jnp.concatenate([key_pos, positions], axis=1))
        attend_ring = lambda: attend(*chunk)
        written = (k, v)
      else:  # One token is written, then attends the ring (see the module docstring).
        cache = _write_ring(cache, layer, k, v, positions, skip=is_global)
        attend_ring = lambda: attend(*_ring_span(cache, layer, attend_len))
      attend_shared = lambda: attend(*_shared_span(cache, layer, attend_len))
      if known:
        out = attend_shared() if is_global else attend_ring()
      else:
        out = jax.lax.cond(is_global, attend_shared, attend_ring)
    out = out.transpose(0, 2, 1, 3, 4).reshape(q.shape).astype(cfg.dtype)
    return dense(out, wo, n_in=2), cache, written


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True)}


class FeedForward(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    init = nn.initializers.normal(stddev=0.02)
    gate = _param(self, "gate", init, (cfg.embed_dim, cfg.mlp_dim), (EMBED, MLP), cfg)
    up = _param(self, "up", init, (cfg.embed_dim, cfg.mlp_dim), (EMBED, MLP), cfg)
    down = _param(self, "down", init, (cfg.mlp_dim, cfg.embed_dim), (MLP, EMBED), cfg)
    h = _ACTIVATIONS[cfg.activation](dense(x, gate)) * dense(x, up)
    h = nn.with_logical_constraint(h, (A_BATCH, A_LENGTH, A_MLP))
    return dense(h, down)


class Block(nn.Module):
  """One layer, in the signature `nn.scan` wants: (carry, per-layer input, shared input).

  carry: (x [B, S, D], cache or None); layer_info: (index in the cache, is_global);
  positions: int32 [B, S]. `attend_len` bounds the attended cache slots (static). The
  per-layer output is None or the chunk keys and values the ring takes after the layers.
  """
  cfg: ModelConfig
  attend_len: Optional[int] = None

  @nn.compact
  def __call__(self, carry, layer_info, positions):
    cfg = self.cfg
    x, cache = carry
    layer, is_global = layer_info
    h, cache, written = Attention(cfg, name="attn")(
        RMSNorm(cfg, name="pre_attn_norm")(x), positions, layer, is_global, cache,
        self.attend_len)
    if cfg.post_norms:
      h = RMSNorm(cfg, name="post_attn_norm")(h)
    x = x + h
    h = FeedForward(cfg, name="mlp")(RMSNorm(cfg, name="pre_mlp_norm")(x))
    if cfg.post_norms:
      h = RMSNorm(cfg, name="post_mlp_norm")(h)
    x = nn.with_logical_constraint(x + h, (A_BATCH, A_LENGTH, A_EMBED))
    return (x, cache), written


def _embed(cfg: ModelConfig, embedding: Array, tokens: Array) -> Array:
  """Token embeddings [B, S, D] in the compute dtype (Gemma: scaled by sqrt(D))."""
  x = jnp.take(embedding.astype(cfg.dtype), tokens, axis=0)
  if cfg.scale_embeddings:
    x = x * jnp.asarray(math.sqrt(cfg.embed_dim), cfg.dtype)
  return nn.with_logical_constraint(x, (A_BATCH, A_LENGTH, A_EMBED))


def _record_positions(cache: Optional[KVCache], positions: Array) -> Optional[KVCache]:
  """The cache with `positions` [B, S] recorded for the next S slots, before the layers write
  their keys there (and in the ring, for a single token: see the module docstring)."""
  if cache is None:
    return None
  cache = dataclasses.replace(
      cache, pos=jax.lax.dynamic_update_slice(cache.pos, positions.astype(jnp.int32),
                                              (0, cache.used)))
  return _record_ring_positions(cache, positions) if positions.shape[1] == 1 else cache


def _record_ring_positions(cache: KVCache, positions: Array) -> KVCache:
  if cache.ring_pos is None:
    return cache
  rows = jnp.arange(positions.shape[0])[:, None]
  slots = ring_slots(positions, cache.ring_pos.shape[1])
  return dataclasses.replace(cache, ring_pos=cache.ring_pos.at[rows, slots].set(
      positions.astype(jnp.int32), mode="drop"))


def _advance(cfg: ModelConfig, cache: Optional[KVCache], positions: Array,
             written: Optional[tuple[Array, Array]]) -> Optional[KVCache]:
  """The cache after the layers wrote the tokens at `positions` [B, S]; `written`: the keys
  and values [L, B, S, K, H] of a chunk for the ring, or None."""
  if cache is None:
    return None
  if written is not None:
    cache = _record_ring_positions(_write_ring_chunk(cfg, cache, *written, positions),
                                   positions)
  return dataclasses.replace(cache, used=cache.used + positions.shape[1])


def _has_ring(cache: Optional[KVCache]) -> bool:
  return cache is not None and cache.ring_k is not None


def _cache_layers(cfg: ModelConfig, ring: bool) -> list[int]:
  """Each layer's index in the cache: its own, or with a ring its index among its kind's."""
  kinds = [cfg.is_global(i) for i in range(cfg.num_layers)]
  return [kinds[:i].count(kinds[i]) if ring else i for i in range(cfg.num_layers)]


def layer_kinds(cfg: ModelConfig, ring: bool = False) -> tuple[Array, Array]:
  """The per-layer scan inputs: (index in the cache int32 [L], is_global bool [L])."""
  return (jnp.asarray(_cache_layers(cfg, ring), jnp.int32),
          jnp.asarray([cfg.is_global(i) for i in range(cfg.num_layers)]))


class Transformer(nn.Module):
  """Embedding, the scanned layers and the final norm; returns hidden states (see module doc)."""
  cfg: ModelConfig
  attend_len: Optional[int] = None

  @nn.compact
  def __call__(self, tokens: Array, positions: Array,
               cache: Optional[KVCache] = None) -> tuple[Array, Optional[KVCache]]:
    cfg = self.cfg
    embedding = _param(self, "embedding",
                       nn.initializers.normal(stddev=cfg.embed_dim**-0.5),
                       (cfg.vocab_size, cfg.embed_dim), (VOCAB, EMBED), cfg)
    if not cfg.tie_embeddings:
      _param(self, "lm_head", nn.initializers.normal(stddev=0.02),
             (cfg.embed_dim, cfg.vocab_size), (EMBED, VOCAB), cfg)
    x = _embed(cfg, embedding, tokens)
    cache = _record_positions(cache, positions)
    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast), length=cfg.num_layers,
                     metadata_params={nn.PARTITION_NAME: LAYERS})
    (x, cache), written = layers(cfg, self.attend_len, name="layers")(
        (x, cache), layer_kinds(cfg, _has_ring(cache)), positions)
    return RMSNorm(cfg, name="final_norm")(x), _advance(cfg, cache, positions, written)


def init_params(cfg: ModelConfig, rng: Array) -> Any:
  """Random parameters (plain arrays in `param_dtype`, logical-axis boxes removed)."""
  return nn.unbox(_init_variables(cfg, rng)["params"])


@functools.partial(jax.jit, static_argnums=0)
def _init_variables(cfg: ModelConfig, rng: Array) -> Any:
  # One compiled program (cached per config, in memory and in the persistent compilation
  # cache), not an initializer at a time run eagerly.
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(rng, tokens, tokens)


def logical_axes(cfg: ModelConfig) -> Any:
  """The logical axis names of every parameter, as a tree of PartitionSpecs."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), tokens, tokens)
  return nn.get_partition_spec(abstract)["params"]


def unstack_layers(cfg: ModelConfig, params: Any) -> list[Any]:
  """Each layer's parameter tree, sliced off the stack (for `apply(..., layers=...)`)."""
  return [jax.tree.map(lambda w, i=i: w[i], params["layers"]) for i in range(cfg.num_layers)]


def apply(cfg: ModelConfig, params: Any, tokens: Array, positions: Array,
          cache: Optional[KVCache] = None, attend_len: Optional[int] = None,
          layers: Optional[list[Any]] = None) -> tuple[Array, Optional[KVCache]]:
  """Pure apply of the body: hidden states [B, S, D] (compute dtype) and the updated cache.

  With `layers` (from `unstack_layers`, sliced once outside a decode loop) the layers run
  unrolled on those slices instead of scanned over the stack. Same numbers; in a loop that
  calls the model once per token, it spares the copy of every layer's weights that a scan's
  per-iteration slicing makes on each call, at the price of a program that grows with depth.
  """
  if layers is None:
    return Transformer(cfg, attend_len).apply({"params": params}, tokens, positions, cache)
  x = _embed(cfg, params["embedding"], tokens)
  cache = _record_positions(cache, positions)
  written = []
  for i, (layer, index) in enumerate(zip(layers, _cache_layers(cfg, _has_ring(cache)))):
    (x, cache), kv = Block(cfg, attend_len).apply(
        {"params": layer}, (x, cache), (index, cfg.is_global(i)), positions)
    written.append(kv)
  written = None if written[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *written)
  hidden = RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
  return hidden, _advance(cfg, cache, positions, written)


def logits_of(cfg: ModelConfig, params: Any, hidden: Array) -> Array:
  """float32 logits [..., V] of hidden states [..., D] (final softcap applied).

  Only the output head of `params` is read: `embedding` (tied) or `lm_head`.
  """
  h = hidden.astype(cfg.dtype)
  if cfg.tie_embeddings:
    logits = dense(h, params["embedding"].astype(cfg.dtype), transposed=True,
                   preferred_element_type=jnp.float32)
  else:
    logits = dense(h, params["lm_head"].astype(cfg.dtype), preferred_element_type=jnp.float32)
  return _softcap(logits, cfg.final_logit_softcap)


def forward(cfg: ModelConfig, params: Any, tokens: Array, positions: Array,
            cache: Optional[KVCache] = None) -> tuple[Array, Optional[KVCache]]:
  """float32 logits [B, S, V] and the updated cache. Holds all [B, S, V] logits: for long
  sequences and big vocabularies use `apply` with `logprobs.token_logprobs`."""
  hidden, cache = apply(cfg, params, tokens, positions, cache)
  logits = logits_of(cfg, params, hidden)
  return nn.with_logical_constraint(logits, (A_BATCH, A_LENGTH, A_VOCAB)), cache
