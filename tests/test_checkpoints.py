"""Checkpoints: round trip, keep newest + best, interrupted saves, mismatches, exports."""

import functools
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from score_jax import checkpoints
from score_jax import partitioning
from score_jax.models import transformer as model_lib
from score_jax.rl import train_step as ts
from multidevice import run_with_devices

CFG = model_lib.tiny_config()


def _random_params(cfg, seed):
  """Random values in the model's parameter tree (no model compile: fast)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(model_lib.init_params, cfg), jax.random.PRNGKey(0))
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def _init_state(cfg):
  """A tiny Adam state whose params differ from its reference, so each tree is checked."""
  state = ts.init_state(_random_params(cfg, 0), optax.adam(1e-3), _random_params(cfg, 1))
  return state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))


@pytest.fixture(scope="module")
def state():
  return _init_state(CFG)


def _at_step(state, step):
  return state.replace(step=jnp.asarray(step, jnp.int32))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _abstract(state):
  return jax.eval_shape(lambda: state)


def test_round_trip_in_a_new_checkpointer(state, tmp_path):
  meta = {"data": {"epoch": 2, "pos": [3, 1]}, "rng": 2**80 + 1, "gin": "a.b = 1\n"}
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, _at_step(state, 7), meta, reward=0.5)
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 7
    assert ckpt.reward(7) == 0.5
    restored, restored_meta = ckpt.restore(None, _abstract(state))
  assert isinstance(restored, ts.TrainState)
  _assert_trees_equal(restored, _at_step(state, 7))
  assert restored_meta == meta


def test_keeps_newest_and_best_by_reward(state, tmp_path):
  rewards = {1: 0.2, 2: 0.9, 3: 0.1, 4: None, 5: 0.3, 6: None}
  with checkpoints.Checkpointer(str(tmp_path), keep=2) as ckpt:
    for step, reward in rewards.items():
      ckpt.save(step, _at_step(state, step), {"step": step}, reward=reward)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
  with checkpoints.Checkpointer(str(tmp_path), keep=2) as ckpt:  # Survives reopening.
    assert sorted(os.listdir(tmp_path)) == ["2", "5", "6"]
    assert ckpt.best_step() == 2
    restored, meta = ckpt.restore_best(_abstract(state))
  assert int(restored.step) == 2 and meta == {"step": 2}


def test_best_step_none_without_rewards(state, tmp_path):
  with checkpoints.Checkpointer(str(tmp_path), keep=1) as ckpt:
    ckpt.save(1, state, {})
    ckpt.save(2, state, {})
    ckpt.wait()
    assert ckpt.all_steps() == [2]
    assert ckpt.best_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint with a reward"):
      ckpt.restore_best(_abstract(state))


def test_interrupted_save_leaves_the_previous_checkpoint(state, tmp_path):
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _at_step(state, 1), {"step": 1})
    ckpt.save(2, _at_step(state, 2), {"step": 2})
  # A save of step 3 killed midway: orbax's temporary directory, partly written.
  tmp_dir = tmp_path / "3.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(tmp_path / "2", tmp_dir)
  shutil.rmtree(tmp_dir / "meta")
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 2
    restored, meta = ckpt.restore(None, _abstract(state))
    assert int(restored.step) == 2 and meta == {"step": 2}
    assert not tmp_dir.exists()  # Cleaned up on opening.
    assert ckpt.save(3, _at_step(state, 3), {"step": 3})
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.restore(3, _abstract(state))[1] == {"step": 3}


def test_save_is_safe_when_the_state_is_donated_right_after(state, tmp_path):
  copy = jax.tree.map(jnp.copy, state)
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, copy, {})
    for leaf in jax.tree.leaves(copy):  # What donating the buffers to the next step does.
      leaf.delete()
    ckpt.wait()
    restored, _ = ckpt.restore(1, _abstract(state))
  _assert_trees_equal(restored, state)


def test_other_model_shape_raises_mismatch(state, tmp_path):
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state, {})
    other = jax.eval_shape(lambda: _init_state(model_lib.tiny_config(embed_dim=32)))
    with pytest.raises(checkpoints.CheckpointMismatchError) as info:
      ckpt.restore(None, other)
  message = str(info.value)
  assert "\n" not in message
  assert "params/embedding stored shape (64, 64), expected shape (64, 32)" in message
  assert "fresh work dir" in message


def test_missing_parameter_raises_mismatch(state, tmp_path):
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state, {})
    untied = jax.eval_shape(lambda: _init_state(model_lib.tiny_config(tie_embeddings=False)))
    with pytest.raises(checkpoints.CheckpointMismatchError,
                       match=r"params/lm_head stored nothing, expected shape \(64, 64\)"):
      ckpt.restore(None, untied)


def test_restore_onto_mesh_shardings_and_dtypes(state, tmp_path):
  mesh = partitioning.make_mesh((1, 1, 1))
  rules = partitioning.DEFAULT_RULES
  param_sh = partitioning.model_param_shardings(CFG, mesh, rules)
  shapes = _abstract(state)
  shardings = ts.TrainState(
      step=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), params=param_sh,
      opt_state=partitioning.opt_state_shardings(shapes.opt_state, param_sh, mesh),
      ref_params=param_sh)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)
  target = target.replace(ref_params=jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16, sharding=s.sharding),
      target.ref_params))
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state, {})
    restored, _ = ckpt.restore(1, target)
  for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert leaf.sharding == want.sharding and leaf.dtype == want.dtype
  _assert_trees_equal(restored.params, state.params)
  _assert_trees_equal(restored.ref_params,
                      jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.ref_params))


def _check_resharding_on_four_devices():
  """Saved fully sharded (fsdp x tensor), restored onto one device, and back."""
  assert jax.device_count() == 4
  mesh = partitioning.make_mesh((1, 2, 2))
  param_sh = partitioning.model_param_shardings(CFG, mesh, partitioning.DEFAULT_RULES)
  params = jax.jit(functools.partial(model_lib.init_params, CFG), out_shardings=param_sh)(
      jax.random.PRNGKey(0))
  assert not params["embedding"].sharding.is_fully_replicated
  state = ts.init_state(params, optax.adam(1e-3), params)
  with tempfile.TemporaryDirectory() as workdir:
    with checkpoints.Checkpointer(workdir) as ckpt:
      ckpt.save(1, state, {})
      one_device = jax.eval_shape(lambda: state)
      one_device = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), one_device)
      restored, _ = ckpt.restore(1, one_device)
      assert len(restored.params["embedding"].sharding.device_set) == 1
      _assert_trees_equal(restored, state)
      back, _ = ckpt.restore(1, state)
      assert back.params["embedding"].sharding == param_sh["embedding"]
      _assert_trees_equal(back, state)


@pytest.mark.slow
def test_resharding_on_four_devices():
  run_with_devices(4, _check_resharding_on_four_devices)


def test_without_ref_params_takes_them_from_the_target(state, tmp_path):
  with checkpoints.Checkpointer(str(tmp_path), save_ref=False) as ckpt:
    ckpt.save(1, state, {})
    ckpt.wait()
    restored, _ = ckpt.restore(1, _abstract(state).replace(ref_params=state.ref_params))
    _assert_trees_equal(restored, state)
    with pytest.raises(ValueError, match="saved without ref_params"):
      ckpt.restore(1, _abstract(state))
  assert not (tmp_path / "1" / "state" / "ref_params").exists()


def test_state_without_reference_for_sft(state, tmp_path):
  sft_state = state.replace(ref_params=None)
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, sft_state, {"mode": "sft"})
    restored, meta = ckpt.restore(1, _abstract(sft_state))
  assert restored.ref_params is None and meta == {"mode": "sft"}
  _assert_trees_equal(restored, sft_state)


def test_bad_inputs(state, tmp_path):
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(ValueError, match="meta must be JSON-serializable"):
      ckpt.save(1, state, {"x": np.zeros(2)})
    with pytest.raises(ValueError, match="reward must be a finite number"):
      ckpt.save(1, state, {}, reward=float("nan"))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
      ckpt.restore(None, _abstract(state))
    ckpt.save(1, state, {})
    assert not ckpt.save(1, state, {})  # Already there: skipped.
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5 .* steps \[1\]"):
      ckpt.restore(5, _abstract(state))
  with pytest.raises(ValueError, match="keep must be >= 1"):
    checkpoints.Checkpointer(str(tmp_path), keep=0)


def test_export_round_trip(state, tmp_path):
  cfg = model_lib.tiny_config(dtype=jnp.bfloat16)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), jax.device_get(state.params))
  vocab_spec = {"kind": "char", "alphabet": "abc\n"}
  export_dir = str(tmp_path / "export")
  checkpoints.export_params(export_dir, cfg, params, vocab_spec)
  assert sorted(os.listdir(export_dir)) == ["model_config.json", "params", "vocab.json"]
  loaded_cfg, loaded, loaded_vocab = checkpoints.load_export(export_dir)
  assert loaded_cfg == cfg and hash(loaded_cfg) == hash(cfg)
  assert loaded_vocab == vocab_spec
  _assert_trees_equal(loaded, params)
  # A second export replaces the first.
  params2 = jax.tree.map(lambda x: x * 2, params)
  checkpoints.export_params(export_dir, cfg, params2, {"kind": "gguf", "path": "/m.gguf"})
  _, loaded2, vocab2 = checkpoints.load_export(export_dir)
  _assert_trees_equal(loaded2, params2)
  assert vocab2 == {"kind": "gguf", "path": "/m.gguf"}


def test_export_rejects_params_of_another_config(state, tmp_path):
  with pytest.raises(checkpoints.CheckpointMismatchError, match="embedding stored shape"):
    checkpoints.export_params(str(tmp_path), model_lib.tiny_config(embed_dim=32),
                              state.params, {})
  with pytest.raises(FileNotFoundError, match="no complete export"):
    checkpoints.load_export(str(tmp_path))
