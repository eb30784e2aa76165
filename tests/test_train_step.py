"""The pure train step: sampler -> rewards -> loss, gradient accumulation, SFT loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from score_jax import model as model_lib
from score_jax import objectives
from score_jax import sampler as sampler_lib
from score_jax import train_step as ts

CFG = model_lib.tiny_config(vocab_size=24)
PROMPTS = [[3, 9, 4], [3, 9, 4], [8, 5], [8, 5]]  # 2 prompts x n=2 samples


@pytest.fixture(scope="module")
def rollout():
  params = model_lib.init_params(CFG, jax.random.PRNGKey(0))
  sampler = sampler_lib.Sampler(CFG, num_attempts=2, max_new_tokens=6, max_prompt_len=4,
                                instruction=[5, 6], eot_id=3, pad_id=0)
  out = sampler(params, PROMPTS, jax.random.PRNGKey(1), 1.0)
  rewards = np.array([[0, 1], [1, 1], [0, 0], [1, 0]], np.float32)
  batch = {"tokens": out.tokens, "attempt": out.attempt, "rewards": jnp.asarray(rewards),
           "ref_logp": ts.reference_logprobs(params, out.tokens, model_cfg=CFG, temperature=1.0)}
  return params, out, batch


def stage2_step(num_micro_batches=1):
  objective = objectives.ObjectiveConfig(kind="stage2", n=2)
  loss_fn = functools.partial(ts.policy_loss, model_cfg=CFG, objective=objective,
                              temperature=1.0)
  return objective, jax.jit(ts.make_train_step(loss_fn, optax.adam(1e-3), num_micro_batches))


def test_loss_at_start_equals_objective_on_sampler_logprobs(rollout):
  params, out, batch = rollout
  objective, step = stage2_step()
  state = ts.init_state(params, optax.adam(1e-3))
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
  # Two identical halves have identical token counts, so the token means agree exactly.
  doubled = jax.tree.map(lambda x: jnp.concatenate([x, x]), batch)
  _, full = stage2_step(1)
  _, accum = stage2_step(2)
  s1, m1 = full(ts.init_state(params, optax.adam(1e-3)), doubled)
  s2, m2 = accum(ts.init_state(params, optax.adam(1e-3)), doubled)
  np.testing.assert_allclose(m1["loss"], m2["loss"], atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.params, s2.params)


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
