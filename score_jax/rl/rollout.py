"""Rollouts: problems -> token ids -> multi-attempt samples (device) -> texts -> rewards (host).

Shared by the trainer and the evaluation. The device part is `sampler.Sampler`; this module is
the host side around it: building the conversation's token ids from a task's text, decoding
each attempt, and scoring attempts in the reward pool while the device does other work.

Truncated attempts. An attempt that reaches `max_new_tokens` without its stop token was cut
off; its text may still hold a final answer (a box written before rambling on, or the toy
task's answer line, which comes first). `score` gives such attempts `truncated_reward`
(default 0) without checking them, so a policy cannot earn reward by never finishing.
"""

import concurrent.futures
import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from score_jax.data import tasks
from score_jax.decoding import sampler as sampler_lib
from score_jax.decoding import sampling
from score_jax.models import chat
from score_jax.models import vocab as vocab_lib


@dataclasses.dataclass(frozen=True)
class Conversation:
  """Token ids of the self-correction conversation for one task, vocabulary and format."""
  task: tasks.Task
  vocab: vocab_lib.Vocabulary
  fmt: chat.ChatFormat

  @property
  def stop_id(self) -> int:
    """The token that ends an attempt."""
    return chat.stop_token_id(self.fmt, self.vocab)

  def prompt_ids(self, example: tasks.Example) -> list[int]:
    return chat.first_turn_ids(self.fmt, self.vocab, example.prompt)

  def instruction_ids(self) -> list[int]:
    return chat.next_turn_ids(self.fmt, self.vocab, self.task.self_correction_instruction)

  def make_sampler(self, model_cfg, *, num_attempts: int, max_new_tokens: int,
                   max_prompt_len: int, **kwargs) -> sampler_lib.Sampler:
    return sampler_lib.Sampler(
        model_cfg, num_attempts=num_attempts, max_new_tokens=max_new_tokens,
        max_prompt_len=max_prompt_len, instruction=self.instruction_ids(),
        eot_id=self.stop_id, pad_id=self.vocab.pad_id, **kwargs)

  def decode_attempts(self, out: sampler_lib.SampleOutput) -> list[list[str]]:
    """Texts [B][K] of each attempt (the end-of-turn token dropped)."""
    toks, mask = np.asarray(out.attempt_tokens), np.asarray(out.attempt_mask)
    return [[self.vocab.decode(toks[k, b][mask[k, b]].tolist()) for k in range(toks.shape[0])]
            for b in range(toks.shape[1])]

  def truncated(self, out: sampler_lib.SampleOutput) -> np.ndarray:
    """bool [B, K]: whether each attempt was cut at N tokens (all N used, the last of them not
    the stop token)."""
    toks, lengths = np.asarray(out.attempt_tokens), np.asarray(out.attempt_lengths)
    return ((lengths == toks.shape[2]) & (toks[:, :, -1] != self.stop_id)).T


@dataclasses.dataclass
class Rollout:
  examples: list[tasks.Example]   # [B] (each prompt repeated n times, contiguous)
  output: sampler_lib.SampleOutput
  texts: list[list[str]]          # [B][K]
  truncated: np.ndarray           # bool [B, K] (see `Conversation.truncated`)


def generate(conv: Conversation, sampler: sampler_lib.Sampler, params: Any,
             examples: Sequence[tasks.Example], rng: Any, method: sampling.Method,
             samples_per_prompt: int = 1) -> Rollout:
  """Samples every attempt for each example, `samples_per_prompt` times (rows contiguous)."""
  repeated = [e for e in examples for _ in range(samples_per_prompt)]
  out = sampler(params, [conv.prompt_ids(e) for e in repeated], rng, method)
  return Rollout(repeated, out, conv.decode_attempts(out), conv.truncated(out))


def concatenate(a: Rollout, b: Rollout, pad_id: int) -> Rollout:
  """The rows of `a`, then those of `b` (numpy outputs; the shorter buffer padded)."""
  return Rollout(a.examples + b.examples,
                 sampler_lib.concatenate([a.output, b.output], pad_id),
                 a.texts + b.texts, np.concatenate([a.truncated, b.truncated]))


def generate_after_first(conv: Conversation, first_sampler: sampler_lib.Sampler,
                         second_sampler: sampler_lib.Sampler, first_params: Any, params: Any,
                         examples: Sequence[tasks.Example], rng: Any, method: sampling.Method,
                         samples_per_prompt: int = 1) -> Rollout:
  """Two-attempt rollouts whose attempt 1 comes from `first_params` (e.g. the base model) and
  attempt 2 from `params`, written after attempt 1 and the instruction.

  `first_sampler` samples two attempts (the second is dropped); `second_sampler` samples one,
  with room for the prompt, attempt 1 and the instruction as its prompt (max_prompt_len =
  P + N + L, hence at most the same buffer length). In the result attempt 1's tokens are context
  (attempt id 0: `params` did not write them) and attempt 2's carry id 2; texts, truncation and
  the per-attempt views hold both attempts.
  """
  first = generate(conv, first_sampler, first_params, examples, rng, method, samples_per_prompt)
  out1 = first.output
  tokens, attempt = np.asarray(out1.tokens), np.asarray(out1.attempt)
  # Everything before attempt 2: prompt, attempt 1, instruction (contiguous in the buffer).
  ends = np.argmax(attempt == 2, axis=1)
  out2 = second_sampler(params, [row[:end].tolist() for row, end in zip(tokens, ends)],
                        jax.random.fold_in(rng, 1), method)
  views = lambda field: np.concatenate([np.asarray(getattr(out1, field))[:1],
                                        np.asarray(getattr(out2, field))])
  output = sampler_lib.SampleOutput(
      tokens=np.asarray(out2.tokens), attempt=np.where(np.asarray(out2.attempt) == 1, 2, 0),
      logprobs=np.asarray(out2.logprobs), lengths=np.asarray(out2.lengths),
      attempt_tokens=views("attempt_tokens"), attempt_logprobs=views("attempt_logprobs"),
      attempt_mask=views("attempt_mask"), attempt_lengths=views("attempt_lengths"))
  second = conv.decode_attempts(out2)
  return Rollout(first.examples, output, [[t[0], s[0]] for t, s in zip(first.texts, second)],
                 np.stack([first.truncated[:, 0], conv.truncated(out2)[:, 0]], axis=1))


def score(pool: Any, task: tasks.Task, rollout: Rollout,
          truncated_reward: Optional[float] = 0.0) -> concurrent.futures.Future:
  """Submits the reward check of every attempt; the future's result is float32 [B, K].

  Args:
    pool: a `rewards.pool.RewardPool` (anything with its `submit`).
    task: the task whose `reward_call` scores an attempt's text.
    rollout: the attempts.
    truncated_reward: the reward of each truncated attempt (`rollout.truncated`), given
      without a check; None checks truncated attempts like the others.

  The future also carries `compute_s`: seconds from submission until the last check finished.
  """
  if truncated_reward is not None and not np.isfinite(truncated_reward):
    raise ValueError(f"truncated_reward must be a finite number or None, got {truncated_reward}")
  shape = rollout.truncated.shape
  given = (np.zeros(shape, bool) if truncated_reward is None
           else np.asarray(rollout.truncated, bool))
  calls = [task.reward_call(text, ex)
           for b, (ex, texts) in enumerate(zip(rollout.examples, rollout.texts))
           for k, text in enumerate(texts) if not given[b, k]]
  start = time.time()
  inner = pool.submit(calls)
  outer: concurrent.futures.Future = concurrent.futures.Future()

  def done(f):
    outer.compute_s = time.time() - start
    try:
      rewards = np.full(shape, truncated_reward or 0.0, np.float32)
      rewards[~given] = np.asarray(f.result(), np.float32)
      outer.set_result(rewards)
    except Exception as e:  # pylint: disable=broad-except
      outer.set_exception(e)

  inner.add_done_callback(done)
  return outer
