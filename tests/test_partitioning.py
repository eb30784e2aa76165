"""Mesh, logical-axis rules and shardings; the 8-device checks run in a child process."""

import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from multidevice import run_with_devices
from score_jax import partitioning
from score_jax.models import transformer as model_lib

RULES = partitioning.DEFAULT_RULES
SIZES = {"data": 2, "fsdp": 2, "tensor": 2}


def _one_device_mesh():
  return partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _specs(shardings):
  return jax.tree.map(lambda s: s.spec, shardings)


def _params_shapes(cfg):
  return jax.eval_shape(functools.partial(model_lib.init_params, cfg), jax.random.PRNGKey(0))


def _random_params(cfg):
  """Parameters from numpy: no compile or eager dispatch, which are slow with 8 devices."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                      _params_shapes(cfg))


# ---------------------------------------------------------------- rules (no devices needed)

@pytest.mark.parametrize("logical, shape, expected", [
    (P("embed", "heads", "head_dim"), (64, 4, 16), P("fsdp", "tensor", None)),
    (P("embed", "kv_heads", "head_dim"), (64, 1, 16), P("fsdp", None, None)),
    # The vocabulary takes (tensor, fsdp) first: no device holds the whole [V, D] embedding.
    (P("vocab", "embed"), (64, 64), P(("tensor", "fsdp"), None)),
    (P("vocab", "embed"), (62, 64), P("tensor", "fsdp")),   # 62 = 2 x 31: tensor only
    (P("vocab", "embed"), (63, 64), P(None, "fsdp")),       # odd vocab: replicated dim
    (P("heads", "head_dim", "embed"), (9, 16, 64), P(None, None, "fsdp")),
    (P("act_batch", "act_length", "act_vocab"), (8, 5, 64), P(("data", "fsdp"), None, "tensor")),
    (P("act_batch", "act_length"), (6, 5), P(None, None)),  # 6 rows over 4 devices
    (P("vocab", None), (64, 3), P(("tensor", "fsdp"), None)),
    (P("act_length", "act_vocab"), (5, 64), P(None, ("tensor", "fsdp"))),
    (P("embed"), (64, 3), P("fsdp")),                        # trailing dims replicated
    (P(), (), P()),                                          # scalar
    (None, (3, 4), P()),                                     # no logical names
])
def test_logical_to_mesh_spec(logical, shape, expected):
  assert partitioning.logical_to_mesh_spec(logical, shape, SIZES, RULES) == expected


def test_later_rule_is_a_fallback_and_axes_are_used_once():
  rules = (("vocab", "tensor"), ("vocab", "fsdp"), ("a", "tensor"), ("b", "tensor"))
  sizes = {"data": 1, "fsdp": 2, "tensor": 4}
  assert partitioning.logical_to_mesh_spec(P("vocab"), (6,), sizes, rules) == P("fsdp")
  assert partitioning.logical_to_mesh_spec(P("vocab"), (8,), sizes, rules) == P("tensor")
  assert partitioning.logical_to_mesh_spec(P("a", "b"), (4, 4), sizes, rules) == P("tensor", None)


def test_bad_rules_and_specs_raise():
  with pytest.raises(ValueError, match="no partitioning rule"):
    partitioning.logical_to_mesh_spec(P("embd"), (4,), SIZES, RULES)
  with pytest.raises(ValueError, match="more entries than the shape"):
    partitioning.logical_to_mesh_spec(P("embed", "mlp"), (4,), SIZES, RULES)
  with pytest.raises(ValueError, match="not in the mesh"):
    partitioning.normalize_rules((("embed", "model"),))
  with pytest.raises(ValueError, match="not a .logical_name, mesh_axes. pair"):
    partitioning.normalize_rules((("embed",),))


def test_axis_rules_overrides_and_gin():
  assert partitioning.axis_rules() == partitioning.DEFAULT_RULES
  rules = dict(partitioning.axis_rules({"kv_heads": "tensor", "act_batch": ["data"]}))
  assert rules["kv_heads"] == "tensor" and rules["act_batch"] == "data"
  assert rules["embed"] == "fsdp"
  with pytest.raises(ValueError, match="unknown logical axis names"):
    partitioning.axis_rules({"kv_head": None})
  gin.parse_config([
      "test_partitioning/mesh_shape.fsdp = 4",
      "test_partitioning/axis_rules.overrides = {'embed': None}",
  ])
  with gin.config_scope("test_partitioning"):
    assert partitioning.mesh_shape() == (-1, 4, 1)
    assert dict(partitioning.axis_rules())["embed"] is None


# ---------------------------------------------------------------- one device

def test_make_mesh_rejects_bad_shapes():
  devices = jax.devices()[:1]
  for shape, message in [((2, 1, 1), "needs 2 devices"), ((-1, -1, 1), "at most one -1"),
                         ((0, 1, 1), "must be positive"), ((1, 1), "must have 3 sizes"),
                         ({"model": 1}, "unknown mesh axes")]:
    with pytest.raises(ValueError, match=message):
      partitioning.make_mesh(shape, devices=devices)
  assert dict(partitioning.make_mesh(devices=devices).shape) == {"data": 1, "fsdp": 1,
                                                                 "tensor": 1}


def test_opt_state_shardings_follow_params():
  mesh = _one_device_mesh()  # specs still name the axes, so they can be compared
  cfg = model_lib.tiny_config()
  params = _params_shapes(cfg)
  param_specs = _specs(partitioning.model_param_shardings(cfg, mesh, RULES))
  assert param_specs["layers"]["attn"]["q"] == P(None, "fsdp", "tensor", None)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  state = partitioning.opt_state_shardings(jax.eval_shape(tx.init, params),
                                           partitioning.model_param_shardings(cfg, mesh, RULES),
                                           mesh)
  adam = state[1][0]
  assert _specs(adam.mu) == param_specs and _specs(adam.nu) == param_specs
  assert adam.count.spec == P()
  assert all(s.spec == P() for s in jax.tree.leaves(state[0]))


def test_opt_state_leaf_that_does_not_fit_its_param_is_replicated():
  mesh = _one_device_mesh()
  params = {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32)}
  shardings = partitioning.logical_to_sharding({"w": P("embed", "mlp")}, params, mesh, RULES)
  state = {"row": {"w": jax.ShapeDtypeStruct((4,), jnp.float32)},  # factored statistic
           "mu": {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32)},
           "w": jax.ShapeDtypeStruct((4, 6), jnp.float32)}
  specs = _specs(partitioning.opt_state_shardings(state, shardings, mesh))
  assert specs == {"row": {"w": P()}, "mu": {"w": P("fsdp", "tensor")},
                   "w": P("fsdp", "tensor")}


# ---------------------------------------------------------------- 8 devices (child process)

def _check_meshes():
  assert jax.device_count() == 8
  assert dict(partitioning.make_mesh((2, 2, 2)).shape) == SIZES
  assert tuple(partitioning.make_mesh((-1, 1, 1)).devices.shape) == (8, 1, 1)
  assert tuple(partitioning.make_mesh({"fsdp": -1, "tensor": 2}).devices.shape) == (1, 4, 2)
  assert tuple(partitioning.make_mesh(partitioning.mesh_shape(tensor=4)).devices.shape) == (
      2, 1, 4)
  assert partitioning.make_mesh((2, 2, 1), devices=jax.devices()[:4]).devices.size == 4
  for shape, message in [((2, 2, 1), "needs 4 devices, but 8"), ((-1, 3, 1), "not a multiple")]:
    with pytest.raises(ValueError, match=message):
      partitioning.make_mesh(shape)


def test_meshes_on_8_devices():
  run_with_devices(8, _check_meshes)


def _check_shardings():
  mesh = partitioning.make_mesh((2, 2, 2))
  odd = model_lib.tiny_config(vocab_size=63, num_kv_heads=1)
  specs = _specs(partitioning.model_param_shardings(odd, mesh, RULES))
  assert specs["embedding"] == P(None, "fsdp")
  assert specs["layers"]["attn"]["k"] == P(None, "fsdp", None, None)
  assert specs["layers"]["attn"]["o"] == P(None, "tensor", None, "fsdp")
  assert specs["layers"]["mlp"]["down"] == P(None, "tensor", "fsdp")
  assert specs["layers"]["attn"]["q_norm"]["scale"] == P(None, None)
  assert specs["final_norm"]["scale"] == P("fsdp")

  # Params and a full Adam state placed with these shardings take a jitted update step.
  params = _random_params(odd)
  param_shardings = partitioning.model_param_shardings(odd, mesh, RULES)
  params = jax.device_put(params, param_shardings)
  tx = optax.adam(1e-3)
  state_shardings = partitioning.opt_state_shardings(jax.eval_shape(tx.init, params),
                                                     param_shardings, mesh)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  assert state[0].mu["embedding"].sharding.spec == P(None, "fsdp")
  updates, state = jax.jit(tx.update, out_shardings=(param_shardings, state_shardings))(
      params, state)
  assert int(state[0].count) == 1 and updates["embedding"].sharding.spec == P(None, "fsdp")

  batch = {"tokens": np.arange(24).reshape(8, 3), "weight": np.float32(1.0)}
  assert _specs(partitioning.data_sharding(batch, mesh)) == {
      "tokens": P(("data", "fsdp"), None), "weight": P()}
  with pytest.raises(ValueError, match="not divisible by data \\* fsdp = 4"):
    partitioning.data_sharding({"tokens": np.zeros((6, 3))}, mesh)
  tokens = partitioning.host_local_to_global(batch["tokens"], mesh)
  assert tokens.sharding.spec == P(("data", "fsdp"))
  assert len(tokens.addressable_shards) == 8 and tokens.addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(tokens), batch["tokens"])


def test_shardings_on_8_devices():
  run_with_devices(8, _check_shardings)


def _sharded_forward_matches_one_device(cfg):
  params = _random_params(cfg)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 12), dtype=np.int32)
  positions = np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape)
  forward = jax.jit(lambda p, t, s: model_lib.forward(cfg, p, t, s)[0])
  expected = forward(params, tokens, positions)
  assert len(expected.sharding.device_set) == 1

  mesh = partitioning.make_mesh((2, 2, 2))
  params = jax.device_put(params, partitioning.model_param_shardings(cfg, mesh, RULES))
  tokens, positions = jax.device_put((tokens, positions),
                                     partitioning.data_sharding((tokens, positions), mesh))
  with partitioning.with_mesh_and_rules(mesh, RULES):
    hlo = forward.lower(params, tokens, positions).as_text()
    logits = forward(params, tokens, positions)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)
  return logits, hlo


def _check_forward():
  logits, hlo = _sharded_forward_matches_one_device(model_lib.tiny_config())
  # The model's logical constraints applied: the last one fixes the logits' sharding.
  assert "sharding_constraint" in hlo
  assert logits.sharding.spec == P(("data", "fsdp"), None, "tensor")
  # Odd vocabulary and a single KV head: parameters fall back to replicated dimensions.
  _sharded_forward_matches_one_device(model_lib.tiny_config(vocab_size=63, num_kv_heads=1))


def test_sharded_forward_matches_one_device():
  run_with_devices(8, _check_forward)


def test_run_with_devices_reports_output_and_failures():
  assert run_with_devices(2, "import jax; print(jax.device_count())").strip() == "2"
  with pytest.raises(AssertionError, match="exit 3"):
    run_with_devices(2, "import sys; sys.exit(3)")
  with pytest.raises(ValueError, match="module-level function"):
    run_with_devices(2, lambda: None)
