"""Decoder-only transformer covering the Gemma (1, 2, 3) and Llama / Qwen families.

One flax linen module, `Transformer`, applied purely:

    logits, cache = Transformer(cfg).apply({"params": params}, tokens, positions, cache)

* `tokens`, `positions`: int32 [B, S]. Position p of a sequence is also its slot in the KV
  cache, so a sequence is always stored contiguously from slot 0.
* `cache`: None (full causal attention over the S tokens given, as in training) or a
  `KVCache` from `init_cache` (decoding: the S new keys/values are written at their positions
  and each query attends every slot <= its own position).
* `logits`: float32 [B, S, V] whatever the parameter dtype.

Every parameter and the main activations carry logical axis names (see `partitioning.py`),
so partitioning rules, not this file, decide how they are sharded.
"""

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of one model. Defaults are Llama-style; see the named configs below."""
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
  qkv_bias: bool = False              # Qwen.
  qk_norm: bool = False               # Gemma 3.
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
  dtype: Any = jnp.float32             # activation / parameter dtype

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
  """Keys and values of every layer: [L, B, T, K, H] each (T slots = positions)."""
  k: Array
  v: Array


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))


def _param(module, name, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
  plus_one: bool
  eps: float
  axis_name: str = EMBED
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = _param(self, "scale", init, (x.shape[-1],), (self.axis_name,), self.dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = scale.astype(jnp.float32)
    return (y * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def apply_rope(x: Array, positions: Array, base: float, scale: float = 1.0) -> Array:
  """Rotary embedding, half-split convention. x: [B, S, N, H]; positions: [B, S]."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angle = (positions.astype(jnp.float32) / scale)[..., None] * freq  # [B, S, half]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _softcap(x: Array, cap: Optional[float]) -> Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


class Attention(nn.Module):
  cfg: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x: Array, positions: Array, kv: Optional[tuple[Array, Array]]):
    """x: [B, S, D]. kv: this layer's cache (k, v) [B, T, K, H] or None. Returns (y, kv)."""
    cfg = self.cfg
    init = nn.initializers.normal(stddev=0.02)
    wq = _param(self, "q", init, (cfg.embed_dim, cfg.num_heads, cfg.head_dim),
                (EMBED, HEADS, HEAD_DIM), cfg.dtype)
    wk = _param(self, "k", init, (cfg.embed_dim, cfg.num_kv_heads, cfg.head_dim),
                (EMBED, KV_HEADS, HEAD_DIM), cfg.dtype)
    wv = _param(self, "v", init, (cfg.embed_dim, cfg.num_kv_heads, cfg.head_dim),
                (EMBED, KV_HEADS, HEAD_DIM), cfg.dtype)
    wo = _param(self, "o", init, (cfg.num_heads, cfg.head_dim, cfg.embed_dim),
                (HEADS, HEAD_DIM, EMBED), cfg.dtype)
    q = jnp.einsum("bsd,dnh->bsnh", x, wq)
    k = jnp.einsum("bsd,dnh->bsnh", x, wk)
    v = jnp.einsum("bsd,dnh->bsnh", x, wv)
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q += _param(self, "q_bias", zeros, wq.shape[1:], (HEADS, HEAD_DIM), cfg.dtype)
      k += _param(self, "k_bias", zeros, wk.shape[1:], (KV_HEADS, HEAD_DIM), cfg.dtype)
      v += _param(self, "v_bias", zeros, wv.shape[1:], (KV_HEADS, HEAD_DIM), cfg.dtype)
    if cfg.qk_norm:
      q = RMSNorm(cfg.norm_plus_one, cfg.norm_eps, HEAD_DIM, cfg.dtype, name="q_norm")(q)
      k = RMSNorm(cfg.norm_plus_one, cfg.norm_eps, HEAD_DIM, cfg.dtype, name="k_norm")(k)
    is_global = cfg.is_global(self.layer)
    base = cfg.rope_base if is_global else (cfg.rope_local_base or cfg.rope_base)
    q = apply_rope(q, positions, base, cfg.rope_scale if is_global else 1.0)
    k = apply_rope(k, positions, base, cfg.rope_scale if is_global else 1.0)
    q = nn.with_logical_constraint(q, (A_BATCH, A_LENGTH, A_HEADS, None))

    if kv is None:  # Attend the S tokens given.
      keys, values, key_pos = k, v, positions
    else:  # Write the new keys/values at their positions, attend the whole cache.
      keys, values = kv
      batch_idx = jnp.arange(x.shape[0])[:, None]
      keys = keys.at[batch_idx, positions].set(k.astype(keys.dtype))
      values = values.at[batch_idx, positions].set(v.astype(values.dtype))
      kv = (keys, values)
      key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (x.shape[0], keys.shape[1]))

    # Query position p sees key position j iff j <= p (and p - j < window on local layers).
    visible = key_pos[:, None, :] <= positions[:, :, None]  # [B, S, T]
    if not is_global:
      visible &= positions[:, :, None] - key_pos[:, None, :] < cfg.sliding_window

    groups = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(q.shape[:2] + (cfg.num_kv_heads, groups, cfg.head_dim))
    scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
    logits = jnp.einsum("bskgh,btkh->bkgst", qg.astype(jnp.float32),
                        keys.astype(jnp.float32)) * scale
    logits = _softcap(logits, cfg.attn_logit_softcap)
    logits = jnp.where(visible[:, None, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgst,btkh->bskgh", probs, values.astype(jnp.float32))
    out = out.reshape(q.shape).astype(cfg.dtype)
    y = jnp.einsum("bsnh,nhd->bsd", out, wo)
    return y, kv


class FeedForward(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    init = nn.initializers.normal(stddev=0.02)
    gate = _param(self, "gate", init, (cfg.embed_dim, cfg.mlp_dim), (EMBED, MLP), cfg.dtype)
    up = _param(self, "up", init, (cfg.embed_dim, cfg.mlp_dim), (EMBED, MLP), cfg.dtype)
    down = _param(self, "down", init, (cfg.mlp_dim, cfg.embed_dim), (MLP, EMBED), cfg.dtype)
    act = {"silu": jax.nn.silu,
           "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True)}[cfg.activation]
    h = act(x @ gate) * (x @ up)
    h = nn.with_logical_constraint(h, (A_BATCH, A_LENGTH, A_MLP))
    return h @ down


class Block(nn.Module):
  cfg: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x, positions, kv):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_plus_one, cfg.norm_eps, EMBED, cfg.dtype, name=name)
    h, kv = Attention(cfg, self.layer, name="attn")(norm("pre_attn_norm")(x), positions, kv)
    if cfg.post_norms:
      h = norm("post_attn_norm")(h)
    x = x + h
    h = FeedForward(cfg, name="mlp")(norm("pre_mlp_norm")(x))
    if cfg.post_norms:
      h = norm("post_mlp_norm")(h)
    x = nn.with_logical_constraint(x + h, (A_BATCH, A_LENGTH, A_EMBED))
    return x, kv


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: Array, positions: Array,
               cache: Optional[KVCache] = None) -> tuple[Array, Optional[KVCache]]:
    cfg = self.cfg
    embedding = _param(self, "embedding", nn.initializers.normal(stddev=cfg.embed_dim**-0.5),
                       (cfg.vocab_size, cfg.embed_dim), (VOCAB, EMBED), cfg.dtype)
    x = jnp.take(embedding, tokens, axis=0)
    if cfg.scale_embeddings:
      x = x * jnp.asarray(math.sqrt(cfg.embed_dim), cfg.dtype)
    x = nn.with_logical_constraint(x, (A_BATCH, A_LENGTH, A_EMBED))
    new_k, new_v = [], []
    for i in range(cfg.num_layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x, kv = Block(cfg, i, name=f"layer_{i}")(x, positions, kv)
      if cache is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    x = RMSNorm(cfg.norm_plus_one, cfg.norm_eps, EMBED, cfg.dtype, name="final_norm")(x)
    if cfg.tie_embeddings:
      head = embedding.T
    else:
      head = _param(self, "lm_head", nn.initializers.normal(stddev=0.02),
                    (cfg.embed_dim, cfg.vocab_size), (EMBED, VOCAB), cfg.dtype)
    logits = jnp.einsum("bsd,dv->bsv", x.astype(jnp.float32), head.astype(jnp.float32))
    logits = _softcap(logits, cfg.final_logit_softcap)
    logits = nn.with_logical_constraint(logits, (A_BATCH, A_LENGTH, A_VOCAB))
    new_cache = None if cache is None else KVCache(jnp.stack(new_k), jnp.stack(new_v))
    return logits, new_cache


def init_params(cfg: ModelConfig, rng: Array) -> Any:
  """Random parameters (plain arrays, logical-axis boxes removed)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = Transformer(cfg).init(rng, tokens, tokens)
  return nn.unbox(variables["params"])


def logical_axes(cfg: ModelConfig) -> Any:
  """The logical axis names of every parameter, as a tree of PartitionSpecs."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), tokens, tokens)
  return nn.get_partition_spec(abstract)["params"]


def forward(cfg: ModelConfig, params: Any, tokens: Array, positions: Array,
            cache: Optional[KVCache] = None) -> tuple[Array, Optional[KVCache]]:
  """Pure apply: float32 logits [B, S, V] and the updated cache (None without one)."""
  return Transformer(cfg).apply({"params": params}, tokens, positions, cache)


def token_logprobs(logits: Array, targets: Array, temperature: float = 1.0) -> Array:
  """log softmax(logits / temperature)[targets], in float32. logits [..., V], targets [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
