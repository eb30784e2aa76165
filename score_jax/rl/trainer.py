"""The training loop: sample on device -> rewards on host -> pure train step; and evaluation.

    for step in range(start, steps):
      prompts = next(data)                             # grain, state checkpointed
      rollout = sample(params, prompts)                # one compiled program, all attempts
      ref_logp = reference(ref_params, rollout)        # dispatched, runs while ...
      rewards = pool(rollout.texts)                    # ... the host checks answers
      state, metrics = train_step(state, batch)        # jitted, sharded, state donated

What a step trains on and with which loss is the mode's (modes.py: SFT on transcripts, the RL
objectives of objectives.py, STaR, Pair-SFT): `mode.next_batch` builds the batch, `mode.make_loss`
is the jitted step's loss; this loop is the same for all of them. Every run writes
WORKDIR/metrics.jsonl, TensorBoard events, orbax checkpoints (resumed automatically after a
crash) and, at the end, WORKDIR/export: the weights for the next stage or evaluation.

Which weights are exported (`RunConfig.export`): "best", as in the paper, is the checkpoint with
the highest training reward (`mode.training_reward`: the final attempt's reward of the policy's
own samples; for the SFT objectives the negative loss), smoothed
by a moving mean over the last `RunConfig.reward_window` steps; "last" is the final step.
WORKDIR/export/selection.json records the step exported and its smoothed reward.
"""

import dataclasses
import functools
import json
import sys
import time
import zlib
from typing import Any, Optional

from absl import logging
import gin
import jax
import optax

from score_jax import checkpoints
from score_jax import metric_writers
from score_jax import partitioning
from score_jax import preemption
from score_jax.data import pipeline as data_lib
from score_jax.data import tasks
from score_jax.decoding import sampler as sampler_lib
from score_jax.models import transformer as model_lib
from score_jax.rewards import pool as pool_lib
from score_jax.rl import rollout as rollout_lib
from score_jax.rl import train_step as ts

class UserError(Exception):
  """A problem with the user's input (config, paths): reported in one line, no traceback."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Hyperparameters of one training run (gin: `RunConfig.steps = 300`, ...)."""
  steps: int = 100
  batch_prompts: int = 32         # prompts per step, all hosts together
  samples_per_prompt: int = 4     # n of the RLOO baseline
  learning_rate: float = 1e-5
  warmup_steps: int = 0
  cosine_decay: bool = False      # decay to lr / 10 at the last step (after the warmup)
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  temperature: float = 1.0        # sampling temperature of training rollouts
  top_k: Optional[int] = None     # optional truncations of the rollout distribution (the
  top_p: Optional[float] = None   # trained log-probs are those of the truncated one)
  min_p: Optional[float] = None
  num_attempts: int = 2
  max_new_tokens: int = 64
  max_prompt_len: int = 128
  truncated_reward: Optional[float] = 0.0  # an attempt cut at max_new_tokens; None: checked
  num_micro_batches: int = 1      # of the train step and the reference forward
  logprob_chunk_len: Optional[int] = 256  # positions per log-prob chunk (None: unchunked)
  sampler_max_batch: Optional[int] = None  # rows per sampler call (None: the whole batch)
  cache_dtype: Optional[str] = None  # KV cache dtype, e.g. "bfloat16" (None: compute dtype)
  unroll_decode: bool = False     # decode layers unrolled: ~10% faster tokens on a CPU, a
                                  # compile ~4x longer, a copy of the layers' weights held
  prompt_bucket: Optional[int] = 64  # prompts padded to a multiple of it, not max_prompt_len
  attend_spans: Optional[int] = None  # decode loops per attempt, each attending only the cache
                                  # slots it can have filled (more: less attention, longer
                                  # compile); None: sampler.auto_attend_spans
  checkpoint_every: int = 50
  keep_checkpoints: int = 3       # the newest ones; the best by smoothed reward is kept too
  export: str = "best"            # "best" (by smoothed training reward) or "last"
  reward_window: int = 10         # steps in the moving mean of the training reward
  log_every: int = 10
  reward_workers: int = 2
  seed: int = 0


@dataclasses.dataclass
class Policy:
  """A model with its vocabulary and conversation format."""
  model_cfg: model_lib.ModelConfig
  params: Any
  conv: rollout_lib.Conversation
  vocab_spec: dict  # How to rebuild the vocabulary (stored with exports).


def make_pool(num_workers: int) -> pool_lib.RewardPool:
  """Reward worker processes, with the answer checkers imported up front."""
  return pool_lib.RewardPool(num_workers,
                             preload=("score_jax.data.tasks", "score_jax.rewards.math"))


def make_optimizer(cfg: RunConfig) -> optax.GradientTransformation:
  if cfg.cosine_decay:
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                            max(cfg.steps, cfg.warmup_steps + 1),
                                            cfg.learning_rate / 10)
  elif cfg.warmup_steps:
    lr = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  else:
    lr = cfg.learning_rate
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(lr, weight_decay=cfg.weight_decay))


def state_shardings(state_shapes, model_cfg, mesh, rules):
  """NamedShardings for a TrainState (params, reference, optimizer moments, step)."""
  param_sh = partitioning.model_param_shardings(model_cfg, mesh, rules)
  return ts.TrainState(
      step=partitioning.batch_sharding(mesh, 0), params=param_sh,
      opt_state=partitioning.opt_state_shardings(state_shapes.opt_state, param_sh, mesh),
      ref_params=None if state_shapes.ref_params is None else param_sh)


def check_prompt_lengths(conv: rollout_lib.Conversation, examples, max_prompt_len: int) -> None:
  """Raises a one-line UserError when a prompt of `examples` has more than `max_prompt_len`
  tokens (nothing is truncated), naming the longest one and the setting that fits them all."""
  longest, worst, too_long = 0, None, 0
  for ex in examples:
    n = len(conv.prompt_ids(ex))
    too_long += n > max_prompt_len
    if n > longest:
      longest, worst = n, ex
  if too_long:
    raise UserError(
        f"{too_long} of {len(examples)} prompts of task {conv.task.name!r} are longer than "
        f"RunConfig.max_prompt_len={max_prompt_len} tokens (the longest, {worst.id}, has "
        f"{longest}): set --gin.RunConfig.max_prompt_len={longest} or more")


def first_line(e: BaseException) -> str:
  """The first line of an error's message (gin appends lines about its call context)."""
  return str(e).splitlines()[0] if str(e) else type(e).__name__


def _restore(ckpt: checkpoints.Checkpointer, step: int, target: Any, mode: str):
  """`ckpt.restore`; a checkpoint that cannot be read, or one of another mode, as one line
  naming it."""
  where = f"checkpoint {step} in {ckpt.directory}"
  try:
    saved_mode = ckpt.meta(step).get("mode", mode)
    if saved_mode == mode:
      return ckpt.restore(step, target)
  except checkpoints.CheckpointMismatchError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot read {where}: {first_line(e)} (delete that step directory to "
                    "resume from an earlier one)") from None
  raise UserError(f"{where} is from a {saved_mode} run, not {mode}: use a fresh work dir")


def batch_hash(examples) -> int:
  """A fingerprint of a batch's example ids (logged, to check the data order on resume)."""
  return zlib.crc32("\n".join(e.id for e in examples).encode())


@dataclasses.dataclass
class StepContext:
  """What a mode's `next_batch` builds its batch with (one per run)."""
  task: tasks.Task
  conv: rollout_lib.Conversation
  sampler: sampler_lib.Sampler  # Two (num_attempts) attempts; SFT batches take its total_len.
  pool: Optional[pool_lib.RewardPool]
  cfg: RunConfig
  mesh: Any

  @functools.cached_property
  def after_first_sampler(self) -> sampler_lib.Sampler:
    """One attempt after a given prompt + attempt 1 + instruction (at most the same buffer
    length)."""
    s = self.sampler
    return self.conv.make_sampler(
        s.model_cfg, num_attempts=1, max_new_tokens=s.max_new_tokens,
        max_prompt_len=s.total_len - s.max_new_tokens, mesh=self.mesh,
        **sampler_options(self.cfg))


def sampler_options(cfg: RunConfig) -> dict[str, Any]:
  """The Sampler's memory and padding options of a RunConfig."""
  if cfg.prompt_bucket is not None and cfg.prompt_bucket < 1:
    raise UserError(f"RunConfig.prompt_bucket must be >= 1 or None, got {cfg.prompt_bucket}")
  if cfg.attend_spans is not None and cfg.attend_spans < 1:
    raise UserError(f"RunConfig.attend_spans must be >= 1 or None, got {cfg.attend_spans}")
  return {"max_batch": cfg.sampler_max_batch, "cache_dtype": cfg.cache_dtype,
          "prompt_bucket": cfg.prompt_bucket, "unroll_decode": cfg.unroll_decode,
          "attend_spans": cfg.attend_spans}


def train(mode: Any, workdir: str, task: tasks.Task, policy: Policy, ref_params: Any,
          cfg: RunConfig, mesh=None, rules=partitioning.DEFAULT_RULES) -> Policy:
  """Trains `policy` for `cfg.steps` steps (resuming from WORKDIR's checkpoints); exports it.

  `mode` is a mode of modes.py (its batches, loss and training reward); `ref_params` the
  frozen reference it may use (KL, or the model STaR / Pair-SFT sample from), None for SFT.
  """
  if cfg.export not in ("best", "last"):
    raise UserError(f"RunConfig.export must be 'best' or 'last', got {cfg.export!r}")
  if cfg.reward_window < 1:
    raise UserError(f"RunConfig.reward_window must be >= 1, got {cfg.reward_window}")
  check_prompt_lengths(policy.conv, task.examples("train"), cfg.max_prompt_len)
  checkpoints.resolve(workdir).mkdir(parents=True, exist_ok=True)
  mesh = mesh or partitioning.make_mesh(partitioning.mesh_shape())
  model_cfg, conv = policy.model_cfg, policy.conv
  optimizer = make_optimizer(cfg)
  per_host = cfg.batch_prompts // jax.process_count()
  if per_host * jax.process_count() != cfg.batch_prompts:
    raise UserError(f"batch_prompts={cfg.batch_prompts} must divide over "
                    f"{jax.process_count()} hosts")

  # The train step, jitted with shardings from the logical-axis rules; state donated.
  loss_fn = mode.make_loss(model_cfg, cfg)
  init_fn = lambda p, r: ts.init_state(p, optimizer, r)
  state_shapes = jax.eval_shape(init_fn, policy.params, ref_params)
  state_sh = state_shardings(state_shapes, model_cfg, mesh, rules)
  with partitioning.with_mesh_and_rules(mesh, rules):
    # From host memory, so that every process lays out its shards of the global state.
    state = jax.jit(init_fn, out_shardings=state_sh)(jax.device_get(policy.params),
                                                     jax.device_get(ref_params))
    step_fn = jax.jit(ts.make_train_step(loss_fn, optimizer, cfg.num_micro_batches,
                                         mode.group_size(cfg)),
                      in_shardings=(state_sh, None), out_shardings=(state_sh, None),
                      donate_argnums=0)
    sampler = conv.make_sampler(model_cfg, num_attempts=cfg.num_attempts,
                                max_new_tokens=cfg.max_new_tokens,
                                max_prompt_len=cfg.max_prompt_len, mesh=mesh,
                                **sampler_options(cfg))

  try:
    # Without the reference: it is the frozen base model, read again from its source.
    ckpt = checkpoints.Checkpointer(checkpoints.resolve(workdir) / "checkpoints",
                                    keep=cfg.keep_checkpoints, save_ref=False)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot read the checkpoints in {workdir}/checkpoints: "
                    f"{first_line(e)} (a damaged step directory there? delete it to resume "
                    "from an earlier one)") from None
  data = data_lib.PromptIterator(task.examples("train"), per_host, seed=cfg.seed)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        state_shapes, state_sh)
  smoothed = checkpoints.MovingMean(cfg.reward_window)
  start = 0
  if ckpt.latest_step() is not None:
    state, meta = _restore(ckpt, ckpt.latest_step(),
                           target.replace(ref_params=state.ref_params), mode.name)
    try:
      data.set_state(meta["data"])
    except ValueError as e:
      raise UserError(f"the checkpoints in {ckpt.directory} were written with other data "
                      f"settings ({e}): use a fresh work dir") from None
    smoothed = checkpoints.MovingMean(cfg.reward_window, meta.get("recent_rewards", ()))
    start = int(state.step)
    logging.info("Resumed %s from step %d in %s", mode.name, start, workdir)
    print(f"Resuming {mode.name} from step {start}", file=sys.stderr, flush=True)

  writer = metric_writers.MetricsWriter(workdir, cfg.steps, start)
  pool = make_pool(cfg.reward_workers) if mode.uses_pool else None
  ctx = StepContext(task, conv, sampler, pool, cfg, mesh)
  rng = jax.random.PRNGKey(cfg.seed)
  try:
    with preemption.StopOnSigterm() as stop:
      for step in range(start, cfg.steps):
        t0 = time.time()
        examples = next(data)
        with partitioning.with_mesh_and_rules(mesh, rules):
          batch, extra = mode.next_batch(ctx, state, examples, jax.random.fold_in(rng, step),
                                         step)
          state, metrics = step_fn(state, batch)
        metrics = jax.device_get(metrics)
        metrics.update(extra, step_time_s=time.time() - t0, batch_hash=batch_hash(examples),
                       epoch=data.epoch)
        last = step + 1 == cfg.steps
        writer.write(step + 1, metrics, console=(step + 1) % cfg.log_every == 0 or last)
        try:  # Before anything is saved: the latest checkpoint stays the last good state.
          preemption.check_finite(step + 1, metrics)
        except preemption.NonFiniteError as e:
          ckpt.wait()
          good = ckpt.latest_step()
          raise UserError(f"{e}: stopped; the last good checkpoint is "
                          + (f"step {good} in {ckpt.directory}" if good else "none")
                          + " (lower RunConfig.learning_rate or check the data)") from None
        reward = smoothed.add(mode.training_reward(metrics))
        preempted = stop.requested()
        if (step + 1) % cfg.checkpoint_every == 0 or last or preempted:
          ckpt.save(step + 1, state, {"data": data.get_state(), "mode": mode.name,
                                      "recent_rewards": smoothed.values()}, reward=reward)
          writer.flush()
        if preempted and not last:
          ckpt.wait()
          raise preemption.Preempted(f"SIGTERM: saved step {step + 1} of {cfg.steps} in "
                                     f"{ckpt.directory}; the same command resumes from it")
    ckpt.wait()
  finally:
    writer.close()
    if pool is not None:
      pool.close()
  export_step = int(state.step)
  if cfg.export == "best" and ckpt.best_step() not in (None, export_step):
    export_step = ckpt.best_step()
    ref = state.ref_params
    state = None  # Frees the last state before the best one is read.
    state, _ = _restore(ckpt, export_step, target.replace(ref_params=ref), mode.name)
  export = checkpoints.resolve(workdir) / "export"
  # The sharded parameters as they are: every process writes its own shards (orbax).
  checkpoints.export_params(export, model_cfg, state.params, policy.vocab_spec)
  if jax.process_index() == 0:
    selection = {"step": export_step, "last_step": cfg.steps, "rule": cfg.export,
                 "reward_window": cfg.reward_window, "smoothed_reward": ckpt.reward(export_step)}
    (export / "selection.json").write_text(json.dumps(selection, indent=2))
    print(f"Exported step {export_step} of {cfg.steps} ({cfg.export}; smoothed training reward "
          f"{selection['smoothed_reward']}) to {export}", file=sys.stderr, flush=True)
  ckpt.close()
  return dataclasses.replace(policy, params=state.params)
