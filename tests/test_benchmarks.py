"""The benchmarks' pure parts: work counts (benchmarks/yardsticks.py) and the sampler
benchmark's helpers.

The reference for the work counts is the program itself: every `dot_general` of the jaxpr of a
tiny model's forward (or forward + backward), 2 * output size * contracted size FLOPs each,
with the bodies of scans counted once per iteration.
"""

import math
import os
import statistics
import sys

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import checkpoints
from score_jax.models import transformer as model_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import bench_sampler  # pylint: disable=g-import-not-at-top,wrong-import-position
import op_profile  # pylint: disable=g-import-not-at-top,wrong-import-position
import yardsticks  # pylint: disable=g-import-not-at-top,wrong-import-position


def _dot_flops(jaxpr: jex.core.Jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("while", "cond"):
      raise ValueError(f"cannot count FLOPs through {eqn.primitive.name}")
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for sub in jex.core.jaxprs_in_params(eqn.params):
      total += times * _dot_flops(sub)
  return total


def _abstract_params(cfg: model_lib.ModelConfig):
  """Parameter shapes only: tracing needs no values."""
  return jax.eval_shape(lambda key: model_lib.init_params(cfg, key), jax.random.PRNGKey(0))


# Llama-like (untied head, GQA) and Gemma-3-like (tied embedding, MQA, sliding window).
_CONFIGS = {
    "llama": model_lib.ModelConfig(vocab_size=96, num_layers=3, embed_dim=32, num_heads=4,
                                   num_kv_heads=2, head_dim=8, mlp_dim=48,
                                   tie_embeddings=False),
    "gemma3": model_lib.tiny_config(vocab_size=80, num_kv_heads=1),
}


@pytest.mark.parametrize("name", sorted(_CONFIGS))
@pytest.mark.parametrize("length", [12, 512])  # one query block; four (5/8 of the square)
def test_train_flops_equal_traced_matmuls_of_forward_and_backward(name, length):
  cfg = _CONFIGS[name]
  params = _abstract_params(cfg)
  batch = 2
  tokens = jnp.zeros((batch, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)

  def loss(p):
    logits, _ = model_lib.forward(cfg, p, tokens, positions)
    return jnp.sum(logits**2)

  traced = _dot_flops(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  assert yardsticks.train_flops(cfg, batch, length) == traced
  forward = _dot_flops(jax.make_jaxpr(loss)(params).jaxpr)
  assert 3 * forward == traced


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_decode_step_flops_equal_traced_matmuls(name):
  cfg = _CONFIGS[name]
  params = _abstract_params(cfg)
  batch, slots, attend_len = 3, 20, 14
  cache = model_lib.init_cache(cfg, batch, slots)
  tok = jnp.zeros((batch, 1), jnp.int32)
  pos = jnp.full((batch, 1), 9, jnp.int32)

  def step(p, c):  # Layers unrolled: a scanned layer's kind is a `cond` on data.
    hidden, c = model_lib.apply(cfg, p, tok, pos, c, attend_len,
                                layers=model_lib.unstack_layers(cfg, p))
    return model_lib.logits_of(cfg, p, hidden[:, 0]), c

  traced = _dot_flops(jax.make_jaxpr(step)(params, cache).jaxpr)
  assert yardsticks.decode_step_flops(cfg, batch, attend_len) == traced


def test_matmul_params_are_the_matmul_weights():
  for cfg in _CONFIGS.values():
    params = _abstract_params(cfg)
    if not cfg.tie_embeddings:  # The input embedding is a lookup, the head a matmul.
      params = dict(params, embedding=np.zeros(0))
    matrices = [x for path, x in jax.tree_util.tree_leaves_with_path(params)
                if "norm" not in jax.tree_util.keystr(path)]
    assert yardsticks.matmul_params(cfg) == sum(x.size for x in matrices)


def test_decode_step_bytes_count_weights_and_the_attended_cache():
  cfg = _CONFIGS["gemma3"]
  weights = yardsticks.matmul_params(cfg) * 4
  cache = model_lib.init_cache(cfg, 2, 10)  # float32, as cfg.dtype; window 8 < 10 slots:
  shared = (cache.k.nbytes + cache.v.nbytes) // 10  # the global layer's 10 slots,
  ring = (cache.ring_k.nbytes + cache.ring_v.nbytes) // 8  # the local one's ring of 8.
  assert yardsticks.decode_step_bytes(cfg, 2, 10) == weights + 10 * shared + 8 * ring
  assert yardsticks.decode_step_bytes(cfg, 2, 3) == weights + 3 * (shared + ring)


def test_peaks_are_positive_and_finite():
  assert 0 < yardsticks.matmul_flops_per_s(64, repeats=2) < np.inf
  assert 0 < yardsticks.memory_bandwidth(1 << 20, repeats=2) < np.inf



def test_leading_agreement_counts_tokens_before_the_first_difference():
  ours = np.array([[[1, 2, 3, 4], [5, 6, 7, 8]]])  # [K=1, B=2, N=4]
  cases = [([[1, 2, 3, 4], [5, 6, 7, 8]], 8),
           ([[1, 2, 0, 4], [5, 6, 7, 8]], 6),  # tokens after a difference do not count
           ([[0, 2, 3, 4], [5, 6, 7, 0]], 3),
           ([[0, 0, 0, 0], [0, 0, 0, 0]], 0)]
  for theirs, expected in cases:
    assert bench_sampler.leading_agreement(ours, np.array([theirs])) == expected


def _side(run_s: float, peak_gb: float, compile_s=None) -> dict:
  return {"run_s": run_s, "peak_rss": peak_gb * 1e9, "compile_s": compile_s}


def test_ratio_lines_and_table_put_each_of_our_programs_against_each_peer():
  results = {"ours": _side(2.0, 2.5, 8.0), "ours_unrolled": _side(4.0, 1.5, 2.0),
             "transformers": _side(6.0, 1.9), "tunix": _side(3.0, 4.0, 10.0)}
  sides = ["ours", "ours_unrolled", "transformers", "tunix"]
  assert bench_sampler.ratio_lines(results, "gemma3_270m", sides) == [
      "ratio ours/transformers: 3.00x", "ratio ours/tunix: 1.50x",
      "ratio ours_unrolled/transformers: 1.50x", "ratio ours_unrolled/tunix: 0.75x"]
  # A peer that ran but failed, a side not asked for, Tunix not compared on SmolLM2.
  del results["transformers"]
  lines = bench_sampler.ratio_lines(results, "smollm2_135m", ["ours", "transformers", "tunix"])
  assert lines[0] == "ratio ours/transformers: n/a (a side did not run)"
  assert lines[1].startswith("ratio ours/tunix: n/a (Tunix 0.1.7's Llama model")
  assert len(lines) == 2
  row = bench_sampler.table([("gemma3_270m", 8, results)], lambda batch: batch * 100)
  assert row.splitlines()[-1] == (
      "| gemma3_270m | 8 | 400.0 | 200.0 | - | 266.7 | - | - | 1.50x | 0.75x "
      "| 8.0 / 2.0 / ~10.0 | 2.50 / 1.50 / - / 4.00 |")
  header, rule = row.splitlines()[:2]
  assert header.count("|") == rule.count("|") == row.splitlines()[-1].count("|")


def test_ratio_lines_print_each_rounds_ratio():
  results = {"ours": dict(_side(2.0, 1.0), runs_s=[2.0, 1.0, 4.0]),
             "transformers": dict(_side(6.0, 1.0), runs_s=[6.0, 3.0, 4.0])}
  assert bench_sampler.ratio_lines(results, "gemma3_270m", ["ours", "transformers"]) == [
      "ratio ours/transformers: 3.00x (rounds: 3.00x 3.00x 1.00x)"]


def test_round_order_starts_each_round_one_side_further():
  sides = ["ours", "transformers", "tunix"]
  assert [bench_sampler.round_order(sides, r) for r in range(4)] == [
      ["ours", "transformers", "tunix"], ["transformers", "tunix", "ours"],
      ["tunix", "ours", "transformers"], ["ours", "transformers", "tunix"]]
  assert not bench_sampler.round_order([], 3)


def test_measure_drives_live_workers_and_leaves_out_sides_that_fail(tmp_path, capsys):
  """Real worker processes of our two programs on a tiny exported model, next to a side whose
  interpreter exits at once and one that never answers."""
  cfg = model_lib.tiny_config(vocab_size=8)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        _abstract_params(cfg))
  checkpoints.export_params(str(tmp_path / "model"), cfg, params,
                            {"kind": "char", "alphabet": "abcde"})
  hangs = tmp_path / "hangs"
  hangs.write_text("#!/bin/sh\nexec sleep 60\n")
  hangs.chmod(0o755)
  pythons = {"ours": sys.executable, "ours_unrolled": sys.executable,
             "transformers": "/bin/false", "tunix": str(hangs)}
  job = dict(model=str(tmp_path / "model"), prompts=[[1, 2, 3], [2, 3, 4]], instruction=[5, 6],
             pad_id=0, max_new_tokens=3, greedy=False, torch_threads=0)
  results = bench_sampler.measure(pythons.get, ["ours", "transformers", "ours_unrolled"], job,
                                  str(tmp_path), repeats=2, timeout_s=300)
  assert sorted(results) == ["ours", "ours_unrolled"]
  runs = sorted((at, side) for side, r in results.items() for at in r["runs_started_at"])
  assert [side for _, side in runs] == ["ours", "ours_unrolled", "ours_unrolled", "ours"]
  for r in results.values():
    assert len(r["runs_s"]) == 2 and r["run_s"] == statistics.median(r["runs_s"])
    assert r["compile_s"] > 0 and r["first_s"] > 0 and r["peak_rss"] > 0
    assert np.asarray(r["tokens"]).shape == (2, 2, 3)  # [attempts, rows, new tokens]
  # The same run index seeds both programs, which compute the same thing.
  np.testing.assert_array_equal(results["ours"]["tokens"], results["ours_unrolled"]["tokens"])
  assert "transformers: failed (exit status 1)" in capsys.readouterr().out
  assert not bench_sampler.measure(pythons.get, ["tunix"], job, str(tmp_path), repeats=2,
                                   timeout_s=1)
  assert "tunix: no answer within 1 s" in capsys.readouterr().out


def test_tunix_gemma3_params_compute_our_projections():
  """Tunix's einsums (its Gemma 3 model: 'BTD,NDH->BTNH', 'BSD,CKDH->CBSKH', 'BTNH,NHD->BTD',
  nnx.Linear kernels [in, out]) over the mapped weights give our model's projections."""
  cfg = _CONFIGS["gemma3"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        _abstract_params(cfg))
  tree = bench_sampler.tunix_gemma3_params(cfg, params)
  assert sorted(tree["layers"]) == list(range(cfg.num_layers))
  x = rng.standard_normal((5, cfg.embed_dim)).astype(np.float32)
  for i in range(cfg.num_layers):
    ours = jax.tree.map(lambda w: w[i], params["layers"])  # pylint: disable=cell-var-from-loop
    theirs = tree["layers"][i]
    q = np.einsum("td,ndh->tnh", x, theirs["attn"]["q_einsum"]["w"])
    np.testing.assert_allclose(q, np.einsum("td,dnh->tnh", x, ours["attn"]["q"]), rtol=1e-5)
    k, v = np.einsum("td,ckdh->ctkh", x, theirs["attn"]["kv_einsum"]["w"])
    np.testing.assert_allclose(k, np.einsum("td,dkh->tkh", x, ours["attn"]["k"]), rtol=1e-5)
    np.testing.assert_allclose(v, np.einsum("td,dkh->tkh", x, ours["attn"]["v"]), rtol=1e-5)
    np.testing.assert_array_equal(theirs["attn"]["attn_vec_einsum"]["w"], ours["attn"]["o"])
    for name, our_name in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
      np.testing.assert_array_equal(theirs["mlp"][name]["kernel"], ours["mlp"][our_name])
    for name, our_name in (("pre_attention_norm", "pre_attn_norm"),
                           ("post_attention_norm", "post_attn_norm"),
                           ("pre_ffw_norm", "pre_mlp_norm"), ("post_ffw_norm", "post_mlp_norm")):
      np.testing.assert_array_equal(theirs[name]["scale"], ours[our_name]["scale"])
    np.testing.assert_array_equal(theirs["attn"]["_query_norm"]["scale"],
                                  ours["attn"]["q_norm"]["scale"])
    np.testing.assert_array_equal(theirs["attn"]["_key_norm"]["scale"],
                                  ours["attn"]["k_norm"]["scale"])
  np.testing.assert_array_equal(tree["embedder"]["input_embedding"], params["embedding"])
  np.testing.assert_array_equal(tree["final_norm"]["scale"], params["final_norm"]["scale"])


def test_op_profile_of_the_sampler_names_its_dots():
  compiled, args = op_profile.compiled_sampler(model_lib.tiny_config(), batch=2, prompt_len=4,
                                               max_new_tokens=3, instruction_len=2)
  groups = op_profile.op_profile(compiled, *args)
  assert groups and all(g.seconds >= 0 and g.calls >= 1 for g in groups)
  assert [g.seconds for g in groups] == sorted((g.seconds for g in groups), reverse=True)
  assert any("dot_general" in g.name for g in groups), [g.name for g in groups]


def test_unrolled_decode_plans_a_copy_of_the_layer_weights():
  """What the sampler benchmark prints about unrolling: the unrolled program's temporaries
  hold each layer's weights sliced off the stack, the scanned one's do not."""
  from score_jax.decoding import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from score_jax.decoding import sampling  # pylint: disable=g-import-not-at-top
  # A window longer than the 14-slot buffer: no ring, as in the benchmark's programs.
  cfg = model_lib.tiny_config(vocab_size=80, num_layers=4, embed_dim=64, mlp_dim=256,
                              sliding_window=16)
  params = _abstract_params(cfg)
  temporaries = {}
  for unroll in (True, False):
    sampler = sampler_lib.Sampler(cfg, num_attempts=2, max_new_tokens=4, max_prompt_len=4,
                                  instruction=[3, 4], eot_id=1, pad_id=0, unroll_decode=unroll)
    compiled = sampler.lower(params, 2, sampling.Greedy()).compile()
    buffers = bench_sampler.xla_buffers(compiled)
    assert buffers["arguments"] > 0
    temporaries[unroll] = buffers["temporaries"]
  layer_bytes = sum(w.size * w.dtype.itemsize for w in jax.tree.leaves(params["layers"]))
  assert temporaries[True] - temporaries[False] >= layer_bytes
