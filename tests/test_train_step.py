"""The pure train step: sampler -> rewards -> loss, gradient accumulation, SFT loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from score_jax.decoding import sampler as sampler_lib
from score_jax.decoding import sampling
from score_jax.models import transformer as model_lib
from score_jax.rl import objectives
from score_jax.rl import train_step as ts
from score_jax.rl import trainer

CFG = model_lib.tiny_config(vocab_size=24)
PROMPTS = [[3, 9, 4], [3, 9, 4], [8, 5], [8, 5]]  # 2 prompts x n=2 samples
METHOD = sampling.Sampling(temperature=1.0)


@pytest.fixture(scope="module")
def rollout():
  params = model_lib.init_params(CFG, jax.random.PRNGKey(0))
  sampler = sampler_lib.Sampler(CFG, num_attempts=2, max_new_tokens=6, max_prompt_len=4,
                                instruction=[5, 6], eot_id=3, pad_id=0)
  out = sampler(params, PROMPTS, jax.random.PRNGKey(1), METHOD)
  rewards = np.array([[0, 1], [1, 1], [0, 0], [1, 0]], np.float32)
  batch = {"tokens": out.tokens, "attempt": out.attempt, "rewards": jnp.asarray(rewards),
           "ref_logp": ts.reference_logprobs(params, out.tokens, model_cfg=CFG, method=METHOD)}
  return params, out, batch


def stage2_step(num_micro_batches=1):
  objective = objectives.ObjectiveConfig(kind="stage2", n=2)
  loss_fn = functools.partial(ts.policy_loss, model_cfg=CFG, objective=objective,
                              method=METHOD)
  return objective, jax.jit(ts.make_train_step(loss_fn, optax.adam(1e-3), num_micro_batches,
                                               group_size=objective.n))


def test_loss_at_start_equals_objective_on_sampler_logprobs(rollout):
  params, out, batch = rollout
  objective, step = stage2_step()
  state = ts.init_state(params, optax.adam(1e-3), params)
  new_state, metrics = step(state, batch)
  # Policy == reference at the start: KL is 0 and the loss is the objective on the sampler's
  # own log-probs.
  expected, _ = objectives.loss_fn(objective, out.logprobs[:, 1:], out.logprobs[:, 1:],
                                   out.attempt[:, 1:], batch["rewards"])
  np.testing.assert_allclose(metrics["loss"], expected, atol=1e-4)
  assert abs(float(metrics["kl_t1"])) < 1e-6
  assert int(new_state.step) == 1
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_state.params, params)
  assert max(jax.tree.leaves(moved)) > 0
  # The reference stays frozen.
  same = jax.tree.map(lambda a, b: bool((a == b).all()), new_state.ref_params, params)
  assert all(jax.tree.leaves(same))


def test_gradient_accumulation_matches_full_batch(rollout):
  params, _, batch = rollout
  # Each group of n=2 samples twice in a row: micro-batches take every other group, so the two
  # micro-batches are the same rows, with the same token counts, and the token means agree.
  doubled = jax.tree.map(
      lambda x: jnp.repeat(x.reshape((-1, 2) + x.shape[1:]), 2, axis=0).reshape(
          (-1,) + x.shape[1:]), batch)
  _, full = stage2_step(1)
  _, accum = stage2_step(2)
  s1, m1 = full(ts.init_state(params, optax.adam(1e-3), params), doubled)
  s2, m2 = accum(ts.init_state(params, optax.adam(1e-3), params), doubled)
  np.testing.assert_allclose(m1["loss"], m2["loss"], atol=1e-6)
  # Adam's first step moves every weight by about lr: 1e-5 is 1% of it (float sums differ).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), s1.params, s2.params)


def test_sft_loss_decreases_on_fixed_batch(rollout):
  params, _, batch = rollout
  step = jax.jit(ts.make_train_step(functools.partial(ts.sft_loss, model_cfg=CFG),
                                    optax.adam(1e-2)))
  state = ts.init_state(params, optax.adam(1e-2))
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.5


def _check_sharded_step_matches_one_device():
  """Child process with 8 CPU devices: mesh (data, fsdp, tensor) = (2, 2, 2) vs one device."""
  from score_jax import partitioning  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8
  cfg = model_lib.tiny_config(vocab_size=24, num_heads=4, num_kv_heads=2)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  ref = jax.tree.map(lambda x: x * 1.01, params)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 24, (8, 20)).astype(np.int32)
  attempt = np.zeros((8, 20), np.int32)
  attempt[:, 6:12], attempt[:, 14:19] = 1, 2
  batch = {"tokens": tokens, "attempt": attempt,
           "rewards": rng.integers(0, 2, (8, 2)).astype(np.float32)}
  batch["ref_logp"] = np.asarray(ts.reference_logprobs(ref, tokens, model_cfg=cfg,
                                                       method=METHOD))
  objective = objectives.ObjectiveConfig(kind="stage2", n=2)
  optimizer = optax.adam(1e-2)
  loss_fn = functools.partial(ts.policy_loss, model_cfg=cfg, objective=objective,
                              method=METHOD)
  step = ts.make_train_step(loss_fn, optimizer, num_micro_batches=2)

  single, m1 = jax.jit(step)(ts.init_state(params, optimizer, ref), batch)

  mesh = partitioning.make_mesh((2, 2, 2))
  rules = partitioning.DEFAULT_RULES
  init = lambda p, r: ts.init_state(p, optimizer, r)
  shardings = trainer.state_shardings(jax.eval_shape(init, params, ref), cfg, mesh, rules)
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings.params))
  batch_sh = partitioning.data_sharding(batch, mesh)
  with partitioning.with_mesh_and_rules(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)(params, ref)
    sharded, m8 = jax.jit(step, in_shardings=(shardings, batch_sh),
                          out_shardings=(shardings, None), donate_argnums=0)(
                              state, jax.device_put(batch, batch_sh))
  np.testing.assert_allclose(m1["loss"], m8["loss"], atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), single.params,
               jax.device_get(sharded.params))
  assert sharded.params["embedding"].sharding.spec == shardings.params["embedding"].spec


def test_sharded_train_step_matches_one_device():
  from multidevice import run_with_devices  # pylint: disable=g-import-not-at-top
  run_with_devices(8, _check_sharded_step_matches_one_device)


def test_micro_batches_hold_whole_groups_and_stride_over_devices():
  rows = np.arange(24)  # 12 groups of 2; imagine 4 devices holding 6 rows each
  split = np.asarray(ts.split_micro_batches(rows, 3, group_size=2))
  assert split.shape == (3, 8)
  for mb in split:
    assert all(mb[i] // 2 == mb[i + 1] // 2 for i in range(0, 8, 2))  # whole groups
    assert sorted(np.bincount(mb // 6, minlength=4)) == [2, 2, 2, 2]  # 2 rows per device
  np.testing.assert_array_equal(ts.merge_micro_batches(split, group_size=2), rows)
  with pytest.raises(ValueError, match="whole groups"):
    ts.split_micro_batches(rows, 5, group_size=2)


def test_micro_batched_reference_equals_one_batch(rollout):
  params, out, batch = rollout
  kwargs = dict(model_cfg=CFG, method=METHOD)
  np.testing.assert_allclose(
      ts.reference_logprobs(params, out.tokens, num_micro_batches=2, **kwargs),
      batch["ref_logp"], atol=1e-5)  # Other matmul shapes: float32 rounding differs.


@pytest.mark.parametrize("bucket", [0, -64])
def test_bad_prompt_bucket_is_a_user_error(bucket):
  """A bad RunConfig.prompt_bucket is one line naming the setting, before any sampler exists."""
  with pytest.raises(trainer.UserError, match="RunConfig.prompt_bucket must be >= 1"):
    trainer.sampler_options(trainer.RunConfig(prompt_bucket=bucket))
  assert trainer.sampler_options(trainer.RunConfig(prompt_bucket=None))["prompt_bucket"] is None


def test_bad_attend_spans_is_a_user_error():
  with pytest.raises(trainer.UserError,
                     match="RunConfig.attend_spans must be >= 1 or None, got 0"):
    trainer.sampler_options(trainer.RunConfig(attend_spans=0))
  assert trainer.sampler_options(trainer.RunConfig(attend_spans=3))["attend_spans"] == 3
  assert trainer.sampler_options(trainer.RunConfig())["attend_spans"] is None  # auto
