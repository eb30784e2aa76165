"""Training modes: what one step of `trainer.train` trains on, and with which loss.

`trainer.train` is one loop for every mode; a mode supplies the rest:

  mode.make_loss(model_cfg, cfg)                  the pure loss of the jitted train step
  mode.next_batch(ctx, state, examples, rng, step)  -> (global batch, host metrics)
  mode.training_reward(metrics)                   what "best checkpoint" means
  mode.group_size(cfg)                            rows per prompt (kept whole in micro-batches)
  mode.uses_pool                                  whether it checks rewards on the host

  SFT      the task's transcripts (`task.sft_transcript`), cross-entropy: the toy's base model.
  RL       rollouts from the policy, host rewards, frozen-reference log-probs, an objective of
           objectives.py (stage1, stage2, multi_turn, single_turn). `offline_fraction` > 0
           replaces that fraction of the prompts by offline ones: attempt 1 sampled by the base
           model (the reference), the policy only writes attempt 2 after it (the paper's
           "base-model first attempts mixed into Stage II"); attempt 1 of those rows is context.
  STaR     two-attempt samples, the rows whose final attempt is correct kept (`star_keep`), SFT
           on them (both attempts). `online=False` samples with the frozen start model (the
           state's `ref_params`): the paper's baseline, one STaR iteration on the base model's
           traces; `online=True` samples with the latest policy, so every step is an iteration
           (STaR in place of REINFORCE in Stage II).
  PairSFT  for each prompt one pair from the base model's (the reference's) samples: a wrong
           attempt, then a correct one (`make_pair`; attempts cut at max_new_tokens are not
           used); SFT on the correction (attempt 2) only.
           With no correct sample, the task's reference solution (`task.reference_solution`,
           the toy has one) stands in when `use_reference_solution`.

Fixed shapes: every batch has the same rows and columns whatever the filters keep; a dropped row
has all its attempt ids 0 (context), so the SFT loss (a mean over attempt tokens) ignores it.
"""

import dataclasses
import functools
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from score_jax import partitioning
from score_jax.decoding import sampling
from score_jax.eval import evaluation
from score_jax.rl import objectives
from score_jax.rl import rollout as rollout_lib
from score_jax.rl import train_step as ts
from score_jax.rl import trainer

UserError = trainer.UserError


def sampling_method(cfg: trainer.RunConfig) -> sampling.Method:
  """How training rollouts are sampled (and so the distribution whose log-probs are trained)."""
  return sampling.from_temperature(cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                   min_p=cfg.min_p)


@functools.cache
def ref_logprobs_fn(model_cfg, method, chunk_len=None, num_micro_batches=1):
  return jax.jit(functools.partial(ts.reference_logprobs, model_cfg=model_cfg, method=method,
                                   chunk_len=chunk_len, num_micro_batches=num_micro_batches))


# ------------------------------------------------------------------------------------------
# Host-side batch construction (pure functions of texts and rewards).


def transcript_batch(conv: rollout_lib.Conversation, examples, transcripts, length: int,
                     trained: Optional[Sequence[int]] = None) -> dict[str, np.ndarray]:
  """Token ids and attempt ids [B, length] of transcripts (one sequence of attempt texts per
  example, or None for a row trained on nothing). Attempts whose 1-based index is not in
  `trained` (None: all) are context (attempt id 0)."""
  vocab, eot, ins = conv.vocab, conv.stop_id, conv.instruction_ids()
  tokens = np.full((len(examples), length), vocab.pad_id, np.int32)
  attempt = np.zeros_like(tokens)
  for b, (ex, texts) in enumerate(zip(examples, transcripts)):
    seq = conv.prompt_ids(ex)
    att = [0] * len(seq)
    for k, text in enumerate(texts or ()):
      if k:
        seq, att = seq + ins, att + [0] * len(ins)
      ids = vocab.encode(text) + [eot]
      mark = k + 1 if trained is None or k + 1 in trained else 0
      seq, att = seq + ids, att + [mark] * len(ids)
    if len(seq) > length:
      raise UserError(f"SFT transcript of {len(seq)} tokens exceeds the buffer of {length}; "
                      "raise RunConfig.max_new_tokens or max_prompt_len")
    tokens[b, :len(seq)], attempt[b, :len(seq)] = seq, att
  return {"tokens": tokens, "attempt": attempt}


def star_keep(rewards: np.ndarray, only_corrections: bool = False) -> np.ndarray:
  """bool [B]: the rows of rewards [B, K] that STaR trains on: final attempt correct (and, with
  `only_corrections`, the first one wrong: the traces that actually corrected a mistake)."""
  r = np.asarray(rewards) >= 0.5
  keep = r[:, -1]
  return keep & ~r[:, 0] if only_corrections else keep


def make_pair(attempts: Sequence[str], rewards: Sequence[float],
              reference_solution: Optional[str] = None) -> Optional[tuple[str, str]]:
  """(a wrong attempt, a correct one) from one problem's sampled attempts and their rewards,
  the first of each in order; `reference_solution` stands in when no attempt is correct. None
  when there is no wrong attempt (nothing to correct) or no correct one."""
  wrong = [a for a, r in zip(attempts, rewards) if r < 0.5]
  right = [a for a, r in zip(attempts, rewards) if r >= 0.5] or [reference_solution]
  if not wrong or right[0] is None:
    return None
  return wrong[0], right[0]


def final_reward(metrics: dict[str, Any]) -> float:
  """The final attempt's mean reward in a step's metrics (reward_t1 ... reward_tK)."""
  return float(metrics[max((k for k in metrics if k.startswith("reward_t")),
                           key=lambda k: int(k[len("reward_t"):]))])


def _rollout_metrics(ro: rollout_lib.Rollout, rewards: np.ndarray) -> dict[str, float]:
  """reward_t{k} and the edit ratio of attempts 1 and 2 of a rollout (host metrics)."""
  out = {f"reward_t{k + 1}": float(rewards[:, k].mean()) for k in range(rewards.shape[1])}
  if rewards.shape[1] > 1:
    out["edit_ratio"] = float(evaluation.edit_ratios(ro.texts).mean())
  return out


# ------------------------------------------------------------------------------------------
# The modes.


@dataclasses.dataclass(frozen=True)
class SFT:
  """Supervised fine-tuning on the task's transcripts."""
  name: str = "sft"
  uses_pool = False

  def group_size(self, cfg):
    del cfg
    return 1

  def make_loss(self, model_cfg, cfg):
    return functools.partial(ts.sft_loss, model_cfg=model_cfg, chunk_len=cfg.logprob_chunk_len)

  def next_batch(self, ctx, state, examples, rng, step):
    del state, rng
    np_rng = np.random.default_rng([ctx.cfg.seed, step])
    transcripts = [ctx.task.sft_transcript(ex, np_rng) for ex in examples]
    batch = transcript_batch(ctx.conv, examples, transcripts, ctx.sampler.total_len)
    return partitioning.host_local_to_global(batch, ctx.mesh), {}

  def training_reward(self, metrics):
    return -float(metrics["loss"])


@dataclasses.dataclass(frozen=True)
class RL:
  """Policy-gradient training with an objective of objectives.py (see the module docstring)."""
  objective: objectives.ObjectiveConfig
  offline_fraction: float = 0.0
  uses_pool = True

  def __post_init__(self):
    if not 0.0 <= self.offline_fraction < 1.0:
      raise UserError(f"offline_fraction must be in [0, 1), got {self.offline_fraction}")

  @property
  def name(self):
    return self.objective.kind

  def group_size(self, cfg):
    return cfg.samples_per_prompt

  def make_loss(self, model_cfg, cfg):
    objective = dataclasses.replace(self.objective, n=cfg.samples_per_prompt)
    return functools.partial(ts.policy_loss, model_cfg=model_cfg, objective=objective,
                             method=sampling_method(cfg), chunk_len=cfg.logprob_chunk_len)

  def next_batch(self, ctx, state, examples, rng, step):
    del step
    cfg, method = ctx.cfg, sampling_method(ctx.cfg)
    t0 = time.time()
    num_offline = int(self.offline_fraction * len(examples))  # Leaves >= 1 online prompt.
    online, offline = examples[:len(examples) - num_offline], examples[len(examples) - num_offline:]
    ro = rollout_lib.generate(ctx.conv, ctx.sampler, state.params, online, rng, method,
                              cfg.samples_per_prompt)
    if offline:
      ro = rollout_lib.concatenate(ro, rollout_lib.generate_after_first(
          ctx.conv, ctx.sampler, ctx.after_first_sampler, state.ref_params, state.params,
          offline, jax.random.fold_in(rng, 1), method, cfg.samples_per_prompt),
          ctx.conv.vocab.pad_id)
    t_sampled = time.time()
    rewards_future = rollout_lib.score(ctx.pool, ctx.task, ro, cfg.truncated_reward)
    batch = partitioning.host_local_to_global(
        {"tokens": ro.output.tokens, "attempt": ro.output.attempt}, ctx.mesh)
    # Dispatched asynchronously: the device computes while the host waits for the rewards.
    batch["ref_logp"] = ref_logprobs_fn(ctx.sampler.model_cfg, method, cfg.logprob_chunk_len,
                                        cfg.num_micro_batches)(state.ref_params, batch["tokens"])
    t_dispatched = time.time()
    rewards = rewards_future.result()
    batch["rewards"] = partitioning.host_local_to_global(rewards, ctx.mesh)
    # Host reward time left exposed: how long the host still waited after the device work
    # was dispatched, out of the whole time the checks took.
    extra = {"reward_wait_s": time.time() - t_dispatched, "reward_s": rewards_future.compute_s,
             "sample_s": t_sampled - t0}
    if cfg.num_attempts > 1:
      extra["edit_ratio"] = _rollout_metrics(ro, rewards)["edit_ratio"]
    return batch, extra

  def training_reward(self, metrics):
    return final_reward(metrics)


@dataclasses.dataclass(frozen=True)
class _SampledSFT(SFT):
  """SFT on model samples (STaR, Pair-SFT): SFT's loss, batches from checked samples."""
  uses_pool = True

  def _sample(self, ctx, params, examples, rng):
    """A rollout of `params` and its rewards [B, K] (checked by the pool)."""
    ro = rollout_lib.generate(ctx.conv, ctx.sampler, params, examples, rng,
                              sampling_method(ctx.cfg), ctx.cfg.samples_per_prompt)
    return ro, rollout_lib.score(ctx.pool, ctx.task, ro, ctx.cfg.truncated_reward).result()


@dataclasses.dataclass(frozen=True)
class STaR(_SampledSFT):
  """Filtered SFT on the model's own two-attempt traces (see the module docstring)."""
  name: str = "star"
  online: bool = False
  only_corrections: bool = False

  def group_size(self, cfg):
    return cfg.samples_per_prompt

  def next_batch(self, ctx, state, examples, rng, step):
    del step
    ro, rewards = self._sample(ctx, state.params if self.online else state.ref_params,
                               examples, rng)
    keep = star_keep(rewards, self.only_corrections)
    attempt = np.where(keep[:, None], np.asarray(ro.output.attempt), 0)
    batch = partitioning.host_local_to_global(
        {"tokens": np.asarray(ro.output.tokens), "attempt": attempt}, ctx.mesh)
    return batch, dict(_rollout_metrics(ro, rewards), kept_fraction=float(keep.mean()))

  def training_reward(self, metrics):
    # Online, the samples are the policy's own: select by their final reward, as RL does.
    return final_reward(metrics) if self.online else -float(metrics["loss"])


@dataclasses.dataclass(frozen=True)
class PairSFT(_SampledSFT):
  """SFT on (wrong attempt, correct attempt) pairs of the base model (module docstring)."""
  name: str = "pair_sft"
  use_reference_solution: bool = True

  def next_batch(self, ctx, state, examples, rng, step):
    del step
    ro, rewards = self._sample(ctx, state.ref_params, examples, rng)
    n = ctx.cfg.samples_per_prompt
    pairs = []
    for i, ex in enumerate(examples):  # The finished attempts of the problem's n samples.
      cells = [(b, k) for b in range(i * n, (i + 1) * n) for k in range(rewards.shape[1])
               if not ro.truncated[b, k]]
      fallback = ctx.task.reference_solution(ex) if self.use_reference_solution else None
      pairs.append(make_pair([ro.texts[b][k] for b, k in cells],
                             [rewards[b, k] for b, k in cells], fallback))
    batch = transcript_batch(ctx.conv, examples, pairs, ctx.sampler.total_len, trained=(2,))
    metrics = dict(_rollout_metrics(ro, rewards),
                   kept_fraction=float(np.mean([p is not None for p in pairs])))
    return partitioning.host_local_to_global(batch, ctx.mesh), metrics
