"""Multi-attempt sampler: attempt 1, self-correction instruction, attempt 2, ... in ONE program.

`sample` is a pure function compiled once per shape: it prefills the prompts, decodes attempt 1
in a `lax.while_loop` with a KV cache, appends the instruction tokens, decodes attempt 2
conditioned on everything before, and so on for K attempts.

Layout. Every sequence lives in one buffer of T = P + K * N + (K - 1) * L slots (P prompt
slots, N new tokens per attempt, L instruction tokens), written contiguously from slot 0: a
sequence that stops early in attempt 1 gets its instruction right after its last token, so no
padding is ever attended and positions run without holes across turns, exactly as a chat would
show it. Position == cache slot, and a query at position p attends slots <= p (see model.py).
Slots past a sequence's end may hold stale keys; they are always overwritten before any query
can see them.

A sampled end-of-turn token is part of its attempt (its log-prob is trained like any other);
an attempt that reaches N tokens without one is cut there.
"""

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from score_jax import model as model_lib
from score_jax import partitioning

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


def buffer_length(prompt_len: int, num_attempts: int, max_new_tokens: int,
                  instruction_len: int) -> int:
  return prompt_len + num_attempts * max_new_tokens + (num_attempts - 1) * instruction_len


def _choose(logits: Array, temperature: Array, rng: Array) -> tuple[Array, Array]:
  """Samples (temperature > 0) or takes the argmax (temperature == 0) of logits [B, V].

  Returns token ids [B] and their float32 log-probs under softmax(logits / temperature)
  (plain softmax when greedy), i.e. the distribution actually used.
  """
  logits = logits.astype(jnp.float32)
  safe_t = jnp.where(temperature > 0, temperature, 1.0)
  logp = jax.nn.log_softmax(logits / safe_t, axis=-1)
  gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)
  tokens = jnp.where(temperature > 0, jnp.argmax(logp + gumbel, axis=-1),
                     jnp.argmax(logits, axis=-1))
  return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def sample(params: Any, prompts: Array, prompt_lengths: Array, instruction: Array,
           rng: Array, temperature: Array, *, model_cfg: model_lib.ModelConfig,
           num_attempts: int, max_new_tokens: int, eot_id: int,
           pad_id: int) -> SampleOutput:
  """Generates `num_attempts` attempts per prompt. Pure; jit with the keyword args static.

  Args:
    params: model parameters.
    prompts: int32 [B, P], each row left-aligned, pad after its length.
    prompt_lengths: int32 [B], each in [1, P].
    instruction: int32 [L], tokens placed after each attempt but the last (the chat text
      closing the model turn, the self-correction instruction and the opening of the next
      model turn).
    rng: PRNG key.
    temperature: float32 scalar; 0 is greedy.
  """
  batch, prompt_len = prompts.shape
  k_att, n_new, n_instr = num_attempts, max_new_tokens, instruction.shape[0]
  total = buffer_length(prompt_len, k_att, n_new, n_instr)
  rows = jnp.arange(batch)

  def run(tokens, positions, cache):
    return model_lib.forward(model_cfg, params, tokens, positions, cache)

  # Prefill the prompts; the logits at each prompt's last token predict its first new token.
  cache = model_lib.init_cache(model_cfg, batch, total)
  positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
  logits, cache = run(prompts, positions, cache)
  next_logits = logits[rows, prompt_lengths - 1]
  buf = jnp.full((batch, total), pad_id, jnp.int32).at[:, :prompt_len].set(prompts)
  buf = jnp.where(jnp.arange(total) < prompt_lengths[:, None], buf, pad_id)
  state = dict(
      buf=buf, attempt=jnp.zeros((batch, total), jnp.int32),
      logprobs=jnp.zeros((batch, total), jnp.float32),
      pos=prompt_lengths.astype(jnp.int32), cache=cache, next_logits=next_logits, rng=rng)

  att_tokens, att_logprobs, att_mask, att_lengths = [], [], [], []
  for k in range(1, k_att + 1):
    # --- Decode attempt k: one token per sequence per step until all are done. ---
    def cond(carry):
      step, done, _, _, _, _ = carry
      return (step < n_new) & ~jnp.all(done)

    def body(carry, k=k):
      step, done, s, toks, lps, mask = carry
      rng, sub = jax.random.split(s["rng"])
      tok, lp = _choose(s["next_logits"], temperature, sub)
      active = ~done
      tok = jnp.where(active, tok, pad_id)
      pos = s["pos"]
      write = lambda a, v: a.at[rows, pos].set(jnp.where(active, v, a[rows, pos]))
      new = dict(s, rng=rng, buf=write(s["buf"], tok), attempt=write(s["attempt"], k),
                 logprobs=write(s["logprobs"], lp))
      # Feed the token (inactive rows write a stale key at their next free slot: harmless).
      logits, new["cache"] = run(tok[:, None], pos[:, None], s["cache"])
      new["next_logits"] = logits[:, 0]
      new["pos"] = pos + active.astype(jnp.int32)
      toks = toks.at[:, step].set(tok)
      lps = lps.at[:, step].set(jnp.where(active, lp, 0.0))
      mask = mask.at[:, step].set(active)
      done = done | (tok == eot_id) | (step + 1 >= n_new)
      return step + 1, done, new, toks, lps, mask

    init = (jnp.int32(0), jnp.zeros((batch,), bool), state,
            jnp.full((batch, n_new), pad_id, jnp.int32), jnp.zeros((batch, n_new), jnp.float32),
            jnp.zeros((batch, n_new), bool))
    _, _, state, toks, lps, mask = jax.lax.while_loop(cond, body, init)
    att_tokens.append(toks)
    att_logprobs.append(lps)
    att_mask.append(mask)
    att_lengths.append(mask.sum(axis=1).astype(jnp.int32))

    if k < k_att:  # --- Append the instruction at each sequence's own position. ---
      positions = state["pos"][:, None] + jnp.arange(n_instr)
      chunk = jnp.broadcast_to(instruction, (batch, n_instr))
      logits, cache = run(chunk, positions, state["cache"])
      state = dict(state, cache=cache, buf=state["buf"].at[rows[:, None], positions].set(chunk),
                   pos=state["pos"] + n_instr, next_logits=logits[:, -1])

  return SampleOutput(
      tokens=state["buf"], attempt=state["attempt"], logprobs=state["logprobs"],
      lengths=state["pos"], attempt_tokens=jnp.stack(att_tokens),
      attempt_logprobs=jnp.stack(att_logprobs), attempt_mask=jnp.stack(att_mask),
      attempt_lengths=jnp.stack(att_lengths))


class Sampler:
  """Host-side front end: pads prompts, checks sizes, calls the compiled `sample`.

  One compiled program per (batch, prompt_len) shape; calls at the same shapes reuse it.
  With a `mesh`, the batch is split over its ("data", "fsdp") axes; in a multi-host run every
  process passes its own prompts and gets back its own rows.
  """

  def __init__(self, model_cfg: model_lib.ModelConfig, *, num_attempts: int,
               max_new_tokens: int, max_prompt_len: int, instruction: Sequence[int],
               eot_id: int, pad_id: int, mesh: Optional[Mesh] = None):
    if num_attempts < 1 or max_new_tokens < 1 or max_prompt_len < 1:
      raise ValueError("num_attempts, max_new_tokens and max_prompt_len must be >= 1")
    self.model_cfg = model_cfg
    self.max_prompt_len = max_prompt_len
    self.num_attempts = num_attempts
    self.max_new_tokens = max_new_tokens
    self.instruction = np.asarray(instruction, np.int32)
    self.pad_id = pad_id
    self.total_len = buffer_length(max_prompt_len, num_attempts, max_new_tokens,
                                   len(self.instruction))
    fn = lambda *args: sample(
        *args, model_cfg=model_cfg, num_attempts=num_attempts, max_new_tokens=max_new_tokens,
        eot_id=eot_id, pad_id=pad_id)
    self._mesh = mesh
    if mesh is None:
      self._sample = jax.jit(fn)
    else:
      rows = NamedSharding(mesh, PartitionSpec(partitioning.BATCH_AXES))
      per_attempt = NamedSharding(mesh, PartitionSpec(None, partitioning.BATCH_AXES))
      self._specs = SampleOutput(*[rows.spec] * 4, *[per_attempt.spec] * 4)
      self._sample = jax.jit(fn, out_shardings=SampleOutput(*[rows] * 4, *[per_attempt] * 4))

  def pad_prompts(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (int32 [B, max_prompt_len] right-padded, int32 [B] lengths)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1:
      raise ValueError("every prompt needs at least one token")
    if lengths.max() > self.max_prompt_len:
      raise ValueError(f"a prompt has {lengths.max()} tokens, more than max_prompt_len="
                       f"{self.max_prompt_len}; raise max_prompt_len (nothing is truncated)")
    out = np.full((len(prompts), self.max_prompt_len), self.pad_id, np.int32)
    for i, p in enumerate(prompts):
      out[i, :len(p)] = p
    return out, lengths

  def __call__(self, params: Any, prompts: Sequence[Sequence[int]], rng: Array,
               temperature: float) -> SampleOutput:
    padded, lengths = self.pad_prompts(prompts)
    if self._mesh is None:
      return self._sample(params, padded, lengths, self.instruction, rng,
                          jnp.float32(temperature))
    # Pad this host's rows to a multiple of its share of the data-parallel devices.
    n = len(prompts)
    share = max(1, math.prod(self._mesh.shape[a] for a in partitioning.BATCH_AXES)
                // jax.process_count())
    extra = -n % share
    padded = np.concatenate([padded, np.repeat(padded[:1], extra, 0)])
    lengths = np.concatenate([lengths, np.repeat(lengths[:1], extra)])
    padded, lengths = partitioning.host_local_to_global((padded, lengths), self._mesh)
    out = self._sample(params, padded, lengths, self.instruction, rng,
                       jnp.float32(temperature))
    out = multihost_utils.global_array_to_host_local_array(out, self._mesh, self._specs)
    rows_of = lambda x, axis: np.take(np.asarray(x), np.arange(n), axis=axis)
    return SampleOutput(*[rows_of(x, 0) for x in (out.tokens, out.attempt, out.logprobs,
                                                  out.lengths)],
                        *[rows_of(x, 1) for x in (out.attempt_tokens, out.attempt_logprobs,
                                                  out.attempt_mask, out.attempt_lengths)])
