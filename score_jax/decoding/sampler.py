"""Multi-attempt sampler: attempt 1, self-correction instruction, attempt 2, ... in ONE program.

`sample` is a pure function compiled once per shape and sampling method: it prefills the
prompts, decodes attempt 1 in a `lax.while_loop` over a `SamplingState`, appends the
instruction tokens, decodes attempt 2 conditioned on everything before, and so on for K
attempts.

Layout. Every sequence lives in a conversation buffer of T = P + K * N + (K - 1) * L
tokens (P prompt slots, N new tokens per attempt, L instruction tokens), written contiguously
from index 0: a sequence that stops early in attempt 1 gets its instruction right after its
last token, and positions run without holes across turns, exactly as a chat would show it.
The KV cache has T slots too, but shared by the rows (see models/transformer.py): every decode
step writes slot s of all rows with one `dynamic_update_slice`, each row's keys carrying their own
position, and slots a row did not fill (prompt padding, steps after it ended an attempt)
hold position -1 and are never attended. So the model sees exactly the contiguous
conversation, and the cache is written without any scatter.

Cost of a decode step. The KV cache lives in the loop carry and each layer writes its one new
key/value per row in place (no copy of the cache per token); with `unroll_decode` the layers'
weights are sliced off their stack once per call, not once per token (`model.apply(...,
layers=...)`); prompts are prefilled without logits except at each prompt's last position;
attention reads only the slots the decoding can have reached, not the whole buffer: each
attempt runs as `attend_spans` loops over consecutive parts of its N steps (by default 4 when
the cache is big next to the weights, else 1: `auto_attend_spans`), a loop attending the slots
filled by its last step at most (`attend_len`, static per loop), and sliding-window layers
keep their keys in a ring of `window` slots once the buffer is longer than that (see
models/transformer.py); the cache may be kept in bfloat16 (`cache_dtype`).

A sampled end-of-turn token is part of its attempt (its log-prob is trained like any other);
an attempt that reaches N tokens without one is cut there.
"""

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from score_jax import partitioning
from score_jax.decoding import sampling
from score_jax.models import transformer as model_lib

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
  """What `sample` returns. B sequences, K attempts, N new tokens per attempt, T buffer slots."""
  tokens: Array            # int32 [B, T]: the whole conversation, pad after `lengths`.
  attempt: Array           # int32 [B, T]: 0 context (prompt, instruction, pad), k for attempt k.
  logprobs: Array          # float32 [B, T]: sampler log-prob of each attempt token, 0 elsewhere.
  lengths: Array           # int32 [B]: tokens in the conversation.
  attempt_tokens: Array    # int32 [K, B, N]: each attempt's tokens, pad after its length.
  attempt_logprobs: Array  # float32 [K, B, N]
  attempt_mask: Array      # bool [K, B, N]: True on the attempt's tokens.
  attempt_lengths: Array   # int32 [K, B]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingState:
  """The decode loop's carry (B sequences, T slots, V vocabulary)."""
  tokens: Array          # int32 [B, T] conversation buffer
  attempt: Array         # int32 [B, T] attempt id of each slot (0: context)
  logprobs: Array        # float32 [B, T]
  pos: Array             # int32 [B] next free slot = length so far
  cache: model_lib.KVCache
  next_logits: Array     # float32 [B, V]: predicts the token at `pos`
  rng: Array             # typed "rbg" key


def buffer_length(prompt_len: int, num_attempts: int, max_new_tokens: int,
                  instruction_len: int) -> int:
  return prompt_len + num_attempts * max_new_tokens + (num_attempts - 1) * instruction_len


def _write(buf: Array, pos: Array, values: Array) -> Array:
  """buf [B, T] with values [B, S] written at slots pos[:, None] + arange(S)."""
  rows = jnp.arange(buf.shape[0])[:, None]
  return buf.at[rows, pos[:, None] + jnp.arange(values.shape[1])].set(values)


# `attend_spans=None` decodes each attempt in this many loops when the KV cache holds at least
# _SPANS_CACHE_SHARE of the bytes of the weights (a decode step reads both), else in one.
_AUTO_SPANS = 4
_SPANS_CACHE_SHARE = 0.5


def auto_attend_spans(model_cfg: model_lib.ModelConfig, batch: int, total_len: int,
                      cache_dtype: Any = None) -> int:
  """The decode loops per attempt `sample` runs when `attend_spans` is None.

  Each loop more attends fewer empty cache slots per step, a saving in proportion to the
  cache's bytes, for a fixed price: one more copy of the decode step to compile and hold
  (see `sample`). So more loops only where the cache's reads weigh: SmolLM2-135M's 2 x 128
  tokens after 64-token prompts get 4 at batch 32 (cache 0.50 GB, weights 0.54 GB), 1 at
  batch 8 (0.13 GB).
  """
  cache = jax.eval_shape(functools.partial(model_lib.init_cache, model_cfg, batch, total_len,
                                           cache_dtype))
  cache_bytes = sum(x.size * x.dtype.itemsize for x in (cache.k, cache.v, cache.ring_k,
                                                         cache.ring_v) if x is not None)
  weight_bytes = model_cfg.num_params() * jnp.dtype(model_cfg.dtype).itemsize
  return _AUTO_SPANS if cache_bytes >= _SPANS_CACHE_SHARE * weight_bytes else 1


def span_ends(max_new_tokens: int, attend_spans: int) -> list[int]:
  """The steps at which an attempt's decode loops end: `attend_spans` near-equal parts of N
  (fewer when N is smaller), the last one N."""
  if attend_spans < 1:
    raise ValueError(f"attend_spans must be >= 1, got {attend_spans}")
  spans = min(attend_spans, max_new_tokens)
  return [-(-max_new_tokens * j // spans) for j in range(1, spans + 1)]


def _decode_attempt(state: SamplingState, k: int, *, params, layers, model_cfg, method,
                    max_new_tokens, eot_id, pad_id, start_reach,
                    attend_spans) -> SamplingState:
  """Samples attempt k (1-based) of every row until each has ended or N tokens are written.

  `start_reach`: slots filled at most when the attempt starts (static). The steps run in
  loops ending at `span_ends`; the loop ending at step e attends `start_reach + e` slots.
  """

  def body(attend_len, carry):
    step, done, s = carry
    rng, sub = jax.random.split(s.rng)
    tok, lp = method.choose(s.next_logits, sub)
    active = ~done
    tok = jnp.where(active, tok, pad_id)
    # Ended rows write pad / 0 into the free index at their end, which holds exactly that.
    tokens = _write(s.tokens, s.pos, tok[:, None])
    attempt = _write(s.attempt, s.pos, jnp.where(active, k, 0)[:, None])
    logprobs = _write(s.logprobs, s.pos, jnp.where(active, lp, 0.0)[:, None])
    # Feed the token; ended rows fill their cache slot with a key nothing attends.
    hidden, cache = model_lib.apply(model_cfg, params, tok[:, None],
                                    jnp.where(active, s.pos, -1)[:, None], s.cache, attend_len,
                                    layers)
    s = SamplingState(tokens, attempt, logprobs, s.pos + active.astype(jnp.int32), cache,
                      model_lib.logits_of(model_cfg, params, hidden[:, 0]), rng)
    done = done | (tok == eot_id) | (step + 1 >= max_new_tokens)
    return step + 1, done, s

  carry = (jnp.int32(0), jnp.zeros(state.pos.shape[0], bool), state)
  for end in span_ends(max_new_tokens, attend_spans):
    carry = jax.lax.while_loop(lambda c, end=end: (c[0] < end) & ~jnp.all(c[1]),
                               functools.partial(body, start_reach + end), carry)
  return carry[2]


def _attempt_views(state: SamplingState, num_attempts: int, max_new_tokens: int, pad_id: int):
  """Each attempt's tokens, log-probs, mask [K, B, N] and lengths [K, B], read off the buffer."""
  slots = jnp.arange(state.tokens.shape[1])
  toks, lps, masks, lengths = [], [], [], []
  for k in range(1, num_attempts + 1):
    is_k = state.attempt == k
    length = is_k.sum(axis=1).astype(jnp.int32)
    start = jnp.argmax(is_k, axis=1)  # attempt k is contiguous from its first slot
    idx = jnp.minimum(start[:, None] + jnp.arange(max_new_tokens), slots[-1])
    mask = jnp.arange(max_new_tokens)[None, :] < length[:, None]
    toks.append(jnp.where(mask, jnp.take_along_axis(state.tokens, idx, axis=1), pad_id))
    lps.append(jnp.where(mask, jnp.take_along_axis(state.logprobs, idx, axis=1), 0.0))
    masks.append(mask)
    lengths.append(length)
  return jnp.stack(toks), jnp.stack(lps), jnp.stack(masks), jnp.stack(lengths)


def token_key(rng: Array) -> Array:
  """The typed "rbg" key the decode loop draws its per-token random numbers from.

  XLA's RngBitGenerator: threefry costs more than the logits themselves for a 262k vocabulary
  on a CPU. Reproducible per backend.
  """
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")


def sample(params: Any, prompts: Array, prompt_lengths: Array, instruction: Array,
           rng: Array, *, model_cfg: model_lib.ModelConfig, method: sampling.Method,
           num_attempts: int, max_new_tokens: int, eot_id: int, pad_id: int,
           cache_dtype: Any = None, unroll_decode: bool = False,
           attend_spans: Optional[int] = None) -> SampleOutput:
  """Generates `num_attempts` attempts per prompt. Pure; jit with the keyword args static.

  Args:
    params: model parameters (any dtype; cast to the compute dtype where used).
    prompts: int32 [B, P], each row left-aligned, pad after its length.
    prompt_lengths: int32 [B], each in [1, P].
    instruction: int32 [L], tokens placed after each attempt but the last (the chat text
      closing the model turn, the self-correction instruction and the opening of the next
      model turn).
    rng: PRNG key (unused by greedy decoding).
    method: how tokens are chosen (`sampling.Greedy()` or `sampling.Sampling(...)`).
    cache_dtype: dtype of the KV cache; None: the model's compute dtype.
    unroll_decode: decode with the layers unrolled on weight slices taken once per call
      rather than scanned over the stack. The scanned program (default) is one layer's code:
      it compiles ~4x faster and holds no copy of the layers' weights through the call (peak
      memory at or below transformers'); unrolled decodes ~10% faster on a CPU, whose XLA
      copies a scanned layer's weights out of the stack at every step, for a copy of all the
      layers' weights held through the call (benchmarks/bench_sampler.py prints both).
    attend_spans: decode loops per attempt (see the module docstring); None: chosen by
      `auto_attend_spans`. More loops attend fewer empty slots, for a longer compile and its
      memory (each loop is its own copy of the decode step). On a 2-core CPU, SmolLM2-135M,
      2 x 128 new tokens after 64-token prompts: 4 loops rather than 1 sampled 5-6% faster
      at batch 32 (alternating runs in one process), no faster at batch 1, and compiled in
      ~4 s rather than ~2 s (the unrolled program: ~25 s rather than ~7 s), with the
      process's peak RSS 0.06 GB higher at batch 8 and 32 and 0.17 GB at batch 1. Long
      buffers on accelerators (attempt 1 of the paper's setting fills at most 1,536 of
      2,624 slots) gain more.
  """
  batch, prompt_len = prompts.shape
  n_instr = instruction.shape[0]
  total = buffer_length(prompt_len, num_attempts, max_new_tokens, n_instr)
  rows = jnp.arange(batch)
  if attend_spans is None:
    attend_spans = auto_attend_spans(model_cfg, batch, total, cache_dtype)

  # Matrices in the compute dtype once, rather than converted at every use in the loop.
  params = jax.tree.map(lambda w: w.astype(model_cfg.dtype) if w.ndim > 1 else w, params)
  cache = model_lib.init_cache(model_cfg, batch, total, cache_dtype)
  kv_axes = (None, model_lib.A_BATCH, model_lib.A_KV_HEADS, None, None)
  ring_axes = (model_lib.A_BATCH, None, model_lib.A_KV_HEADS, None, None)
  cache = dataclasses.replace(cache, **{
      name: nn.with_logical_constraint(getattr(cache, name), axes)
      for name, axes in (("k", kv_axes), ("v", kv_axes), ("ring_k", ring_axes),
                         ("ring_v", ring_axes)) if getattr(cache, name) is not None})
  # Prefill: logits only at each prompt's last token, which predicts its first new token.
  slots = jnp.arange(prompt_len)
  positions = jnp.where(slots < prompt_lengths[:, None], slots, -1)
  hidden, cache = model_lib.apply(model_cfg, params, prompts, positions, cache, prompt_len)
  tokens = jnp.full((batch, total), pad_id, jnp.int32).at[:, :prompt_len].set(prompts)
  tokens = jnp.where(jnp.arange(total) < prompt_lengths[:, None], tokens, pad_id)
  state = SamplingState(
      tokens=tokens, attempt=jnp.zeros((batch, total), jnp.int32),
      logprobs=jnp.zeros((batch, total), jnp.float32), pos=prompt_lengths.astype(jnp.int32),
      cache=cache,
      next_logits=model_lib.logits_of(model_cfg, params, hidden[rows, prompt_lengths - 1]),
      rng=token_key(rng))

  layers = model_lib.unstack_layers(model_cfg, params) if unroll_decode else None
  decode = functools.partial(_decode_attempt, params=params, layers=layers,
                             model_cfg=model_cfg, method=method, max_new_tokens=max_new_tokens,
                             eot_id=eot_id, pad_id=pad_id, attend_spans=attend_spans)
  for k in range(1, num_attempts + 1):
    # Slots filled by the end of attempt k, at most (static).
    reach = prompt_len + k * max_new_tokens + (k - 1) * n_instr
    state = decode(state, k, start_reach=reach - max_new_tokens)
    if k < num_attempts:  # Append the instruction at each sequence's own position.
      chunk = jnp.broadcast_to(instruction, (batch, n_instr))
      positions = state.pos[:, None] + jnp.arange(n_instr)
      hidden, cache = model_lib.apply(model_cfg, params, chunk, positions, state.cache,
                                      reach + n_instr)
      state = dataclasses.replace(
          state, tokens=_write(state.tokens, state.pos, chunk), pos=state.pos + n_instr,
          cache=cache, next_logits=model_lib.logits_of(model_cfg, params, hidden[:, -1]))

  att_tokens, att_logprobs, att_mask, att_lengths = _attempt_views(
      state, num_attempts, max_new_tokens, pad_id)
  return SampleOutput(tokens=state.tokens, attempt=state.attempt, logprobs=state.logprobs,
                      lengths=state.pos, attempt_tokens=att_tokens,
                      attempt_logprobs=att_logprobs, attempt_mask=att_mask,
                      attempt_lengths=att_lengths)


def concatenate(outputs: Sequence[SampleOutput], pad_id: int) -> SampleOutput:
  """The rows of several outputs, in order, as numpy arrays; buffers of different lengths are
  padded to the longest (tokens with `pad_id`, attempt ids and log-probs with 0)."""
  total = max(np.shape(o.tokens)[1] for o in outputs)

  def rows(field):
    if field.startswith("attempt_"):  # [K, B, N]
      return np.concatenate([np.asarray(getattr(o, field)) for o in outputs], axis=1)
    parts = [np.asarray(getattr(o, field)) for o in outputs]
    if field == "lengths":
      return np.concatenate(parts)
    fill = pad_id if field == "tokens" else 0
    return np.concatenate([np.pad(x, ((0, 0), (0, total - x.shape[1])), constant_values=fill)
                           for x in parts])
  return SampleOutput(**{f.name: rows(f.name) for f in dataclasses.fields(SampleOutput)})


class Sampler:
  """Host-side front end: pads prompts, checks sizes, calls the compiled `sample`.

  Prompts are padded to `max_prompt_len`, or with `prompt_bucket` to the smallest multiple of
  it that holds the call's longest prompt (at most `max_prompt_len`): the buffer, the prefill
  and the attention span shrink with the prompts, at the price of one compiled program per
  bucket. One compiled program per (batch, padded prompt length) and sampling method; calls at
  the same shapes and method reuse it. `total_len` is the longest buffer a call can return.
  With a `mesh`, the batch is split over its ("data", "fsdp") axes; in a multi-host run every
  process passes its own prompts and gets back its own rows.
  With `max_batch`, a call with more rows runs the program on chunks of at most that many
  rows of this host, one after the other (the KV cache of a chunk must fit the devices).
  """

  def __init__(self, model_cfg: model_lib.ModelConfig, *, num_attempts: int,
               max_new_tokens: int, max_prompt_len: int, instruction: Sequence[int],
               eot_id: int, pad_id: int, mesh: Optional[Mesh] = None,
               cache_dtype: Any = None, max_batch: Optional[int] = None,
               unroll_decode: bool = False, prompt_bucket: Optional[int] = None,
               attend_spans: Optional[int] = None):
    if min(num_attempts, max_new_tokens, max_prompt_len) < 1:
      raise ValueError("num_attempts, max_new_tokens and max_prompt_len must be >= 1")
    if attend_spans is not None and attend_spans < 1:
      raise ValueError(f"attend_spans must be >= 1 or None, got {attend_spans}")
    if max_batch is not None and max_batch < 1:
      raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if prompt_bucket is not None and prompt_bucket < 1:
      raise ValueError(f"prompt_bucket must be >= 1, got {prompt_bucket}")
    self.prompt_bucket = prompt_bucket
    self.max_batch = max_batch
    self.model_cfg = model_cfg
    self.max_prompt_len = max_prompt_len
    self.num_attempts = num_attempts
    self.max_new_tokens = max_new_tokens
    self.instruction = np.asarray(instruction, np.int32)
    self.pad_id = pad_id
    self.total_len = buffer_length(max_prompt_len, num_attempts, max_new_tokens,
                                   len(self.instruction))
    fn = functools.partial(
        sample, model_cfg=model_cfg, num_attempts=num_attempts, max_new_tokens=max_new_tokens,
        eot_id=eot_id, pad_id=pad_id, cache_dtype=cache_dtype, unroll_decode=unroll_decode,
        attend_spans=attend_spans)
    self._mesh = mesh
    if mesh is None:
      self._sample = jax.jit(fn, static_argnames="method")
    else:
      rows = NamedSharding(mesh, PartitionSpec(partitioning.BATCH_AXES))
      per_attempt = NamedSharding(mesh, PartitionSpec(None, partitioning.BATCH_AXES))
      self._specs = SampleOutput(*[rows.spec] * 4, *[per_attempt.spec] * 4)
      self._sample = jax.jit(fn, static_argnames="method",
                             out_shardings=SampleOutput(*[rows] * 4, *[per_attempt] * 4))

  def lower(self, params: Any, batch: int, method: sampling.Method) -> jax.stages.Lowered:
    """The program `__call__` runs for `batch` rows, lowered without running it.

    `params` may be abstract (`jax.ShapeDtypeStruct`s with shardings): with `.compile()
    .memory_analysis()` this plans a model's memory on devices that are not there.
    """
    def row_input(shape, dtype):
      sharding = (None if self._mesh is None
                  else NamedSharding(self._mesh, PartitionSpec(partitioning.BATCH_AXES)))
      return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    return self._sample.lower(
        params, row_input((batch, self.max_prompt_len), jnp.int32),
        row_input((batch,), jnp.int32),
        jax.ShapeDtypeStruct(self.instruction.shape, jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.uint32), method=method)

  def padded_len(self, prompts: Sequence[Sequence[int]]) -> int:
    """The prompt length a call pads `prompts` to (see the class docstring); checks them.

    In a multi-host run every process must call it (its longest prompt is agreed on by all).
    """
    lengths = [len(p) for p in prompts]
    if not lengths or min(lengths) < 1:
      raise ValueError("every prompt needs at least one token")
    if max(lengths) > self.max_prompt_len:
      raise ValueError(f"a prompt has {max(lengths)} tokens, more than max_prompt_len="
                       f"{self.max_prompt_len}; raise max_prompt_len (nothing is truncated)")
    if self.prompt_bucket is None:
      return self.max_prompt_len
    longest = max(lengths)
    if self._mesh is not None and jax.process_count() > 1:
      longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
    return min(self.max_prompt_len, -(-longest // self.prompt_bucket) * self.prompt_bucket)

  def pad_prompts(self, prompts: Sequence[Sequence[int]],
                  padded_len: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (int32 [B, padded_len] right-padded, int32 [B] lengths); `padded_len`
    defaults to `self.padded_len(prompts)`."""
    if padded_len is None:
      padded_len = self.padded_len(prompts)
    out = np.full((len(prompts), padded_len), self.pad_id, np.int32)
    for i, p in enumerate(prompts):
      out[i, :len(p)] = p
    return out, np.array([len(p) for p in prompts], np.int32)

  def __call__(self, params: Any, prompts: Sequence[Sequence[int]], rng: Array,
               method: sampling.Method) -> SampleOutput:
    padded_len = self.padded_len(prompts)  # One length for all chunks: one buffer length.
    if self.max_batch is None or len(prompts) <= self.max_batch:
      return self._call(params, prompts, padded_len, rng, method)
    return concatenate([self._call(params, prompts[i:i + self.max_batch], padded_len,
                                   jax.random.fold_in(rng, i), method)
                        for i in range(0, len(prompts), self.max_batch)], self.pad_id)

  def _call(self, params: Any, prompts: Sequence[Sequence[int]], padded_len: int, rng: Array,
            method: sampling.Method) -> SampleOutput:
    padded, lengths = self.pad_prompts(prompts, padded_len)
    if self._mesh is None:
      return self._sample(params, padded, lengths, self.instruction, rng, method=method)
    # Pad this host's rows to a multiple of its share of the data-parallel devices.
    n = len(prompts)
    share = max(1, math.prod(self._mesh.shape[a] for a in partitioning.BATCH_AXES)
                // jax.process_count())
    extra = -n % share
    padded = np.concatenate([padded, np.repeat(padded[:1], extra, 0)])
    lengths = np.concatenate([lengths, np.repeat(lengths[:1], extra)])
    padded, lengths = partitioning.host_local_to_global((padded, lengths), self._mesh)
    out = self._sample(params, padded, lengths, self.instruction, rng, method=method)
    out = multihost_utils.global_array_to_host_local_array(out, self._mesh, self._specs)
    rows_of = lambda x, axis: np.take(np.asarray(x), np.arange(n), axis=axis)
    return SampleOutput(*[rows_of(x, 0) for x in (out.tokens, out.attempt, out.logprobs,
                                                  out.lengths)],
                        *[rows_of(x, 1) for x in (out.attempt_tokens, out.attempt_logprobs,
                                                  out.attempt_mask, out.attempt_lengths)])
