"""The scanned transformer against an unrolled reference; remat; mixed precision; layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax.models import transformer as model_lib

CFG = model_lib.tiny_config(vocab_size=32, num_layers=4, attn_logit_softcap=20.0,
                            final_logit_softcap=30.0, sliding_window=3)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 9)), jnp.int32)
POSITIONS = jnp.broadcast_to(jnp.arange(9), TOKENS.shape)


def unrolled_logits(cfg, params, tokens, positions):
  """Obviously correct: a Python loop applying one `Block` per layer to its slice of the stack."""
  x = jnp.take(params["embedding"], tokens, axis=0)
  if cfg.scale_embeddings:
    x = x * np.sqrt(cfg.embed_dim).astype(np.float32)
  for i in range(cfg.num_layers):
    layer = jax.tree.map(lambda w, i=i: w[i], params["layers"])
    (x, _), _ = model_lib.Block(cfg).apply(
        {"params": layer}, (x, None), (jnp.int32(i), jnp.bool_(cfg.is_global(i))), positions)
  x = model_lib.RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
  return model_lib.logits_of(cfg, params, x)


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(CFG, jax.random.PRNGKey(0))


def test_layers_are_stacked_on_a_leading_layers_axis(params):
  assert params["layers"]["attn"]["q"].shape == (4, CFG.embed_dim, CFG.num_heads, CFG.head_dim)
  axes = model_lib.logical_axes(CFG)
  assert tuple(axes["layers"]["attn"]["q"]) == ("layers", "embed", "heads", "head_dim")
  assert tuple(axes["embedding"]) == ("vocab", "embed")
  assert sum(x.size for x in jax.tree.leaves(params)) == CFG.num_params()


def test_scanned_equals_unrolled(params):
  logits, _ = model_lib.forward(CFG, params, TOKENS, POSITIONS)
  expected = unrolled_logits(CFG, params, TOKENS, POSITIONS)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  # Local and global layers really differ (window 3 < 9 tokens): a model whose layers are
  # all global gives other logits.
  all_global, _ = model_lib.forward(
      model_lib.tiny_config(**{**CFG.__dict__, "global_every": 1}), params, TOKENS, POSITIONS)
  assert float(jnp.abs(all_global - logits).max()) > 1e-3


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_changes_neither_values_nor_gradients(params, remat):
  def loss(cfg, p):
    logits, _ = model_lib.forward(cfg, p, TOKENS, POSITIONS)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * jnp.arange(9.0))

  base = jax.value_and_grad(functools.partial(loss, CFG))(params)
  cfg = model_lib.tiny_config(**{**CFG.__dict__, "remat": remat})
  value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, cfg)))(params)
  np.testing.assert_allclose(value, base[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               grads, base[1])


def test_mixed_precision_computes_in_bfloat16_with_float32_master_weights(params):
  cfg = model_lib.tiny_config(**{**CFG.__dict__, "dtype": jnp.bfloat16})
  assert jax.tree.leaves(model_lib.init_params(cfg, jax.random.PRNGKey(0)))[0].dtype == (
      jnp.float32)
  fn = lambda p: model_lib.forward(cfg, p, TOKENS, POSITIONS)[0]
  logits = fn(params)
  assert logits.dtype == jnp.float32
  reference, _ = model_lib.forward(CFG, params, TOKENS, POSITIONS)
  # bfloat16 rounding only: far closer than the logits' own spread.
  err = float(jnp.abs(logits - reference).max())
  assert 0 < err < 0.15 * float(jnp.std(reference))
  # The matmuls run on bfloat16 operands.
  jaxpr = str(jax.make_jaxpr(fn)(params))
  assert "dot_general" in jaxpr and "bf16[" in jaxpr
  grads = jax.grad(lambda p: jnp.sum(fn(p)))(params)
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_program_size_does_not_grow_with_depth():
  """Scanned layers: 16 layers lower to about the same program as 2 (compile time follows)."""
  def hlo_size(num_layers):
    cfg = model_lib.tiny_config(vocab_size=32, num_layers=num_layers)
    shapes = jax.eval_shape(functools.partial(model_lib.init_params, cfg),
                            jax.random.PRNGKey(0))
    lowered = jax.jit(functools.partial(model_lib.forward, cfg)).lower(shapes, TOKENS,
                                                                        POSITIONS)
    return len(lowered.as_text())

  assert hlo_size(16) < 1.1 * hlo_size(2)


def test_llama3_rope_scaling_matches_its_definition():
  """Frequencies under Llama 3.x scaling, against the published piecewise rule written out
  per frequency in numpy."""
  cfg = model_lib.ModelConfig(vocab_size=8, num_layers=1, embed_dim=16, num_heads=2,
                              num_kv_heads=1, head_dim=64, mlp_dim=8, rope_base=500_000.0,
                              llama3_rope=(8.0, 1.0, 4.0, 8192))
  freq = np.asarray(model_lib.rope_frequencies(cfg, jnp.bool_(True)))
  expected = []
  for i in range(32):
    f = 500_000.0 ** (-2 * i / 64)
    wavelength = 2 * np.pi / f
    if wavelength < 8192 / 4.0:
      expected.append(f)
    elif wavelength > 8192 / 1.0:
      expected.append(f / 8.0)
    else:
      smooth = (8192 / wavelength - 1.0) / (4.0 - 1.0)
      expected.append((1 - smooth) * f / 8.0 + smooth * f)
  np.testing.assert_allclose(freq, expected, rtol=1e-5)
  assert freq[0] == expected[0] and freq[-1] < 500_000.0 ** (-62 / 64)


def test_unrolled_apply_on_unstacked_layers_equals_scanned(params):
  cache = model_lib.init_cache(CFG, 2, 12)
  scanned, cache_a = model_lib.apply(CFG, params, TOKENS, POSITIONS, cache)
  unrolled, cache_b = model_lib.apply(CFG, params, TOKENS, POSITIONS, cache,
                                      layers=model_lib.unstack_layers(CFG, params))
  np.testing.assert_allclose(unrolled, scanned, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cache_b.k, cache_a.k, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(cache_a.k[:, :, :, :9]).min(axis=-1).max()) > 0  # the cache was written
  np.testing.assert_array_equal(cache_b.pos[:, :9], POSITIONS)
  assert int(cache_b.used) == 9 and (np.asarray(cache_b.pos[:, 9:]) == -1).all()


def test_ring_cache_decodes_as_the_whole_cache(params):
  """Sliding-window layers keeping their keys in a ring of `window` slots per row give the
  hidden states of a cache holding every slot, through what the sampler does: a prompt chunk
  longer than the window with padded rows, single tokens (a row sitting steps out, as a
  finished one does), a chunk at each row's own positions, more single tokens."""
  rng = np.random.default_rng(1)
  lengths = np.array([7, 4, 1])
  calls = [np.where(np.arange(7) < lengths[:, None], np.arange(7), -1)]  # positions [B, S]
  nxt = lengths.copy()
  for step in range(10):
    active = np.array([True, step % 4 != 1, step not in (2, 3)])
    calls.append(np.where(active, nxt, -1)[:, None])
    nxt += active
    if step == 5:  # an instruction chunk, each row at its own positions
      calls.append(nxt[:, None] + np.arange(4))
      nxt += 4
  whole = model_lib.init_cache(CFG, 3, sum(c.shape[1] for c in calls), ring=False)
  ring = model_lib.init_cache(CFG, 3, whole.k.shape[3])
  assert ring.k.shape[0] == 2 and ring.ring_k.shape[1] == 2 and ring.ring_k.shape[3] == 3
  apply = jax.jit(model_lib.apply, static_argnums=(0, 5))
  layers = model_lib.unstack_layers(CFG, params)
  unrolled = ring
  for positions in calls:
    tokens = jnp.asarray(rng.integers(0, 32, positions.shape), jnp.int32)
    expected, whole = apply(CFG, params, tokens, positions, whole)
    got, ring = apply(CFG, params, tokens, positions, ring)
    got_unrolled, unrolled = model_lib.apply(CFG, params, tokens, positions, unrolled,
                                             layers=layers)
    valid = positions >= 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_unrolled)[valid], np.asarray(expected)[valid],
                               rtol=1e-5, atol=1e-5)
  assert int(ring.used) == whole.k.shape[3] and nxt.min() > 3 * CFG.sliding_window
  # The ring holds each row's last `window` positions.
  held = np.sort(np.asarray(ring.ring_pos), axis=1)
  np.testing.assert_array_equal(held, nxt[:, None] - np.arange(3, 0, -1))


def test_ring_slots_leave_out_padding_and_keys_a_later_token_takes_the_slot_of():
  positions = jnp.asarray([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, -1, -1, -1, -1]])
  np.testing.assert_array_equal(model_lib.ring_slots(positions, 3),
                                [[3, 3, 3, 3, 1, 2, 0], [0, 1, 2, 3, 3, 3, 3]])


def test_ring_needs_both_kinds_of_layers():
  with pytest.raises(ValueError, match="both sliding-window and global"):
    model_lib.init_cache(model_lib.tiny_config(global_every=1), 1, 20, ring=True)
  assert model_lib.init_cache(model_lib.tiny_config(global_every=1), 1, 20).ring_k is None


@pytest.mark.parametrize("x_shape, w_shape, n_in, transposed, spec", [
    ((2, 3, 4), (4, 5), 1, False, "bsd,df->bsf"),
    ((2, 3, 4), (4, 2, 3), 1, False, "bsd,dnh->bsnh"),
    ((2, 3, 2, 3), (2, 3, 4), 2, False, "bsnh,nhd->bsd"),
    ((2, 3, 4), (7, 4), 1, True, "bsd,vd->bsv"),
])
def test_dense_equals_its_einsum(x_shape, w_shape, n_in, transposed, spec):
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  np.testing.assert_allclose(model_lib.dense(x, w, n_in, transposed), jnp.einsum(spec, x, w),
                             rtol=1e-5, atol=1e-5)


def test_dense_weight_gradient_is_one_2d_dot_over_the_tokens():
  """The weight gradient contracts one merged tokens axis of two 2-D row-major operands (not
  batch and length separately, which XLA:CPU transposes the activations for)."""
  x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
  jaxpr = jax.make_jaxpr(jax.grad(lambda w: model_lib.dense(x, w).sum()))(w)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots, jaxpr
  for e in dots:
    assert [v.aval.ndim for v in e.invars] == [2, 2], e
    (lhs_contract, rhs_contract), _ = e.params["dimension_numbers"]
    assert len(lhs_contract) == len(rhs_contract) == 1, e


@pytest.mark.parametrize("length, blocks", [(512, 4), (256, 2)])
def test_causal_blocks_equal_the_whole_square(monkeypatch, length, blocks):
  """Without a cache, query block i attends key blocks 0..i only; the hidden states and the
  gradient are those of every query against every key, masked (local layers' window, padding
  at the end included)."""
  assert model_lib.causal_blocks(length) == blocks
  assert model_lib.causal_blocks(length - 1) < blocks and model_lib.causal_blocks(100) == 1
  cfg = model_lib.tiny_config(vocab_size=50)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, length), 0, 50)
  slots = jnp.arange(length)
  positions = jnp.stack([slots, jnp.where(slots < length - 40, slots, -1)])

  def loss(p):
    hidden, _ = model_lib.apply(cfg, p, tokens, positions)
    return jnp.sum(hidden.astype(jnp.float32) ** 2), hidden

  (_, blocked), grads = jax.value_and_grad(loss, has_aux=True)(params)
  monkeypatch.setattr(model_lib, "_CAUSAL_BLOCKS_MAX", 1)
  (_, whole), whole_grads = jax.value_and_grad(loss, has_aux=True)(params)
  np.testing.assert_allclose(blocked, whole, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(whole_grads)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
