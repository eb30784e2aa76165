"""Tests of score_jax.rl.rollout on the host side: truncated attempts and their reward.

The reward pool is a stand-in (checks run in this process), and so is the sampler (a fixed
`SampleOutput`) but in one slow test; the task, its vocabulary, the conversation and the
reward are the toy task's own.
"""

import concurrent.futures

import jax
import numpy as np
import pytest

from score_jax.data import tasks
from score_jax.data import toy
from score_jax.decoding import sampler as sampler_lib
from score_jax.decoding import sampling
from score_jax.models import transformer as model_lib
from score_jax.rl import rollout as rollout_lib

N = 16  # max_new_tokens


class _InlinePool:
  """`RewardPool.submit` run in this process; remembers how many checks it was given."""

  def __init__(self):
    self.submitted = 0

  def submit(self, calls):
    self.submitted += len(calls)
    future = concurrent.futures.Future()
    future.set_result([fn(*args) for fn, args in calls])
    return future


class _FixedSampler:
  """Returns attempts made of the given texts, each one cut at N tokens (no stop token after
  a cut) or ended by the stop token."""

  def __init__(self, vocab, attempts: list[list[str]]):  # [B][K] texts
    self.vocab, self.attempts = vocab, attempts

  def __call__(self, params, prompts, rng, method):
    batch, num_attempts = len(self.attempts), len(self.attempts[0])
    toks = np.full((num_attempts, batch, N), self.vocab.pad_id, np.int32)
    mask = np.zeros((num_attempts, batch, N), bool)
    for b, row in enumerate(self.attempts):
      for k, text in enumerate(row):
        ids = (self.vocab.encode(text) + [self.vocab.eos_id])[:N]
        toks[k, b, :len(ids)], mask[k, b, :len(ids)] = ids, True
    zeros = np.zeros((batch, 1), np.int32)
    return sampler_lib.SampleOutput(
        tokens=zeros, attempt=zeros, logprobs=zeros.astype(np.float32),
        lengths=zeros[:, 0], attempt_tokens=toks, attempt_logprobs=mask.astype(np.float32),
        attempt_mask=mask, attempt_lengths=mask.sum(-1).astype(np.int32))


@pytest.fixture(name="rollout")
def _rollout():
  task = toy.ToyArithmetic()
  conv = rollout_lib.Conversation(task, task.vocab, toy.FORMAT)
  example = tasks.Example(id="e", prompt="9+9+5", reference="23")
  right = "#### 23\n18+5 23"          # 15 characters: with its stop token, 16 = N tokens.
  attempts = [
      [right, right + " 23"],          # ended / cut at N (the stop token would be the 17th)
      ["#### 21\n18", "#### 23\n9+9+5 " * 2],  # ended early, wrong / cut at N
      ["#### 22\n18+5 23", right],     # ended, wrong / ended
  ]
  sampler = _FixedSampler(task.vocab, attempts)
  return task, rollout_lib.generate(conv, sampler, None, [example] * 3, None,
                                    sampling.Greedy())


def test_truncated_attempts(rollout):
  _, ro = rollout
  np.testing.assert_array_equal(ro.truncated, [[False, True], [False, True], [False, False]])
  # The truncated attempts' texts state the right answer, like the first one.
  assert ro.texts[0] == ["#### 23\n18+5 23", "#### 23\n18+5 23 "]
  assert ro.texts[1][1] == "#### 23\n9+9+5 ##"


@pytest.mark.parametrize("truncated_reward, expected, checks", [
    (0.0, [[1, 0], [0, 0], [0, 1]], 4),
    (-0.5, [[1, -0.5], [0, -0.5], [0, 1]], 4),
    (None, [[1, 1], [0, 1], [0, 1]], 6),     # checked like the others: the answers are right
])
def test_score_gives_truncated_attempts_their_reward(rollout, truncated_reward, expected,
                                                     checks):
  task, ro = rollout
  pool = _InlinePool()
  rewards = rollout_lib.score(pool, task, ro, truncated_reward=truncated_reward).result()
  assert rewards.dtype == np.float32
  np.testing.assert_array_equal(rewards, np.asarray(expected, np.float32))
  assert pool.submitted == checks


def test_score_default_gives_truncated_attempts_zero(rollout):
  task, ro = rollout
  np.testing.assert_array_equal(rollout_lib.score(_InlinePool(), task, ro).result(),
                                [[1, 0], [0, 0], [0, 1]])


def test_score_when_every_attempt_is_truncated(rollout):
  task, ro = rollout
  ro.truncated[:] = True
  pool = _InlinePool()
  np.testing.assert_array_equal(rollout_lib.score(pool, task, ro).result(), np.zeros((3, 2)))
  assert pool.submitted == 0


@pytest.mark.slow  # Compiles a sampler: 10-45 s on a CPU.
def test_truncated_on_a_real_sampler_output():
  """An untrained model: some attempts sample the stop token within N tokens, some do not."""
  task = toy.ToyArithmetic()
  conv = rollout_lib.Conversation(task, task.vocab, toy.FORMAT)
  cfg = model_lib.tiny_config(vocab_size=task.vocab.vocab_size, num_layers=1, global_every=1)
  sampler = conv.make_sampler(cfg, num_attempts=2, max_new_tokens=N, max_prompt_len=8)
  examples = [tasks.Example(id=str(i), prompt=f"{i}+{i}", reference=str(2 * i))
              for i in range(10)]
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  ro = rollout_lib.generate(conv, sampler, params, examples, jax.random.PRNGKey(1),
                            sampling.Sampling(temperature=1.0), samples_per_prompt=2)
  toks, mask = np.asarray(ro.output.attempt_tokens), np.asarray(ro.output.attempt_mask)
  stopped = [[conv.stop_id in toks[k, b][mask[k, b]] for k in range(2)] for b in range(20)]
  np.testing.assert_array_equal(ro.truncated, ~np.array(stopped))
  assert 0 < ro.truncated.sum() < ro.truncated.size  # both kinds occur
  rewards = rollout_lib.score(_InlinePool(), task, ro).result()
  assert not rewards[ro.truncated].any()


def test_bad_truncated_reward_raises(rollout):
  task, ro = rollout
  with pytest.raises(ValueError, match="truncated_reward"):
    rollout_lib.score(_InlinePool(), task, ro, truncated_reward=float("nan"))
