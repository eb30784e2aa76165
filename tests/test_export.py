"""Tests for score_jax.export.huggingface: what transformers reads from an exported directory.

* Tiny random models of every family: transformers' logits of the exported directory against
  ours, and `loading.load` of it returning the same config and parameters.
* Sharded bfloat16 weights: the index, and both readers.
* Tokenizers: ids of `AutoTokenizer.from_pretrained` against our vocabulary on 200 texts, for
  the shipped ones (SmolLM2's byte-level BPE; Gemma 3's SentencePiece, slow) and a small
  SentencePiece model trained here; the chat template against chat.py.
* The command on a trainer work dir, and its one-line errors.
"""

import dataclasses
import functools
import io
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from score_jax import checkpoints
from score_jax.export import huggingface as export
from score_jax.models import chat
from score_jax.models import loading
from score_jax.models import transformer as model
from score_jax.models import vocab as vocab_lib
from score_jax.models.transformer import ModelConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
GEMMA = dict(activation="gelu_tanh", norm_plus_one=True, scale_embeddings=True)
LLAMA = ModelConfig(vocab_size=96, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
                    head_dim=16, mlp_dim=96, norm_eps=1e-5, rope_base=50_000.0,
                    tie_embeddings=False)
FAMILIES = {
    "llama": LLAMA,
    "llama3": dataclasses.replace(LLAMA, tie_embeddings=True, rope_base=10_000.0,
                                  llama3_rope=(8.0, 1.0, 4.0, 16)),
    "qwen2": dataclasses.replace(LLAMA, qkv_bias=True, tie_embeddings=True),
    "qwen3": dataclasses.replace(LLAMA, qk_norm=True),
    "gemma": dataclasses.replace(LLAMA, tie_embeddings=True, **GEMMA),
    "gemma2": dataclasses.replace(
        LLAMA, tie_embeddings=True, post_norms=True, sliding_window=6, global_every=2,
        attn_logit_softcap=50.0, final_logit_softcap=30.0, query_pre_attn_scalar=24, **GEMMA),
    "gemma3": model.tiny_config(vocab_size=96, num_layers=6, mlp_dim=96, sliding_window=6,
                                global_every=3, rope_scale=4.0, query_pre_attn_scalar=24),
}


def random_params(cfg, seed: int = 0):
  """Random numpy parameters of `cfg`, large enough that every weight matters."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@functools.lru_cache
def jitted_forward(cfg):
  return jax.jit(functools.partial(model.forward, cfg))


def ours_logits(cfg, params, ids):
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  logits, _ = jitted_forward(cfg)(params, ids, positions)
  return np.asarray(logits)


def hf_logits(directory, ids):
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    return hf_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


@pytest.fixture(scope="module")
def token_ids():
  return np.random.default_rng(0).integers(0, 96, size=(2, 20)).astype(np.int32)


def assert_same_params(got, expected):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


# Gemma 1 and 2 share everything but a few switches with Gemma 3: slow, to keep the default
# run short.
@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.slow) if f in ("gemma", "gemma2") else f
    for f in sorted(FAMILIES)])
def test_exported_model_matches_transformers_and_reads_back(family, token_ids, tmp_path):
  cfg = FAMILIES[family]
  params = random_params(cfg)
  export.write_model(str(tmp_path), cfg, params, IDS, dtype=jnp.float32)
  assert not os.path.exists(tmp_path / "model.safetensors.index.json")
  np.testing.assert_allclose(hf_logits(str(tmp_path), token_ids),
                             ours_logits(cfg, params, token_ids), atol=1e-3, rtol=0)
  got_cfg, got = loading._load_model(str(tmp_path), jnp.float32)
  assert got_cfg == cfg
  assert_same_params(got, params)


def test_sharded_bfloat16_weights(token_ids, tmp_path):
  cfg = FAMILIES["gemma3"]
  params = random_params(cfg)
  export.write_model(str(tmp_path), cfg, params, IDS, dtype=jnp.bfloat16,
                     max_shard_bytes=40_000)
  with open(tmp_path / "model.safetensors.index.json") as f:
    weight_map = json.load(f)["weight_map"]
  shards = sorted(set(weight_map.values()))
  assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == shards
  assert not os.path.exists(tmp_path / "model.safetensors")
  rounded = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  got_cfg, got = loading._load_model(str(tmp_path), jnp.bfloat16)
  assert got_cfg == dataclasses.replace(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert_same_params(got, rounded)
  as_f32 = jax.tree_util.tree_map(lambda x: x.astype(np.float32), rounded)
  np.testing.assert_allclose(hf_logits(str(tmp_path), token_ids),
                             ours_logits(cfg, as_f32, token_ids), atol=1e-3, rtol=0)


@pytest.mark.parametrize("change,message", [
    (dict(sliding_window=8), "sliding_window=8"),
    (dict(attn_logit_softcap=50.0), "attn_logit_softcap"),
    (dict(qkv_bias=True, qk_norm=True), "qk_norm=True"),
    (dict(rope_scale=2.0, llama3_rope=(8.0, 1.0, 4.0, 16)), "rope_scale"),
])
def test_models_without_a_transformers_equivalent_are_refused(change, message):
  with pytest.raises(ValueError, match=f"no Hugging Face equivalent.*{message}"):
    export.hf_config(dataclasses.replace(LLAMA, **change), IDS, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Tokenizers.

_FRAGMENTS = [
    "Hello, world!", "The quick brown fox", "naïve café résumé", "Grüße aus Köln", "日本語の文章",
    "中文测试", "Привет, мир", "مرحبا", "emoji 🙂🚀👍🏽", "Ω≈ç√∫", "x² + y² = z²", "def f(x):",
    "    return x ** 2", "\tif a != b:\n\t\tpass", "for (int i = 0; i < n; ++i) {}",
    "<div class=\"a\">b</div>", "12345", "3.14159", "-0.001", "1e-9", "1,000,000", "2024-01-31",
    "$48 + $24 = $72", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n ", "'s 're 'll",
    "CamelCaseWord", "snake_case_word", "ALL CAPS", "a" * 30, "\u00a0nbsp", "zero\u200bwidth",
    "<end_of_turn>", "<|im_end|>",
]


def tokenizer_texts(n: int = 200) -> list[str]:
  """`n` texts of mixed ASCII, unicode, code, numbers and whitespace (deterministic)."""
  rng = random.Random(0)
  return [rng.choice(["", " ", "\n"]).join(rng.choices(_FRAGMENTS, k=rng.randint(1, 6)))
          for _ in range(n)]


def assert_same_ids(directory, vocab, texts):
  """AutoTokenizer of `directory` encodes `texts` as `vocab` does (with BOS when it has one)."""
  tok = transformers.AutoTokenizer.from_pretrained(directory)
  bos = [] if vocab.bos_id is None else [vocab.bos_id]
  for text in texts:
    assert tok(text).input_ids == bos + vocab.encode(text), text
  return tok


def test_sentencepiece_model_as_tokenizer_json(tmp_path):
  # A small SentencePiece BPE model trained here, set up as Gemma's (identity normalizer, no
  # dummy prefix, byte fallback, digits split, user-defined and control pieces).
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(tokenizer_texts(2000)), model_writer=model, model_type="bpe",
      vocab_size=800, byte_fallback=True, normalization_rule_name="identity",
      add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
      allow_whitespace_only_pieces=True, character_coverage=0.98,
      user_defined_symbols=["\n\n", "\u2581\u2581", "<h1>"],
      control_symbols=["<start_of_turn>", "<end_of_turn>"],
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
  vocab = vocab_lib.SentencePieceVocab(model.getvalue())
  export.write_tokenizer(str(tmp_path), vocab)
  assert_same_ids(str(tmp_path), vocab, tokenizer_texts() + [
      "<h1>x</h1>\n\n\n  a   b", "<start_of_turn>user\n hi<end_of_turn>", "\u0f00\u0f01"])


@pytest.mark.parametrize("name,chat_format", [
    ("smollm2_135m", "auto"),  # The GGUF's own template (ChatML with a system turn).
    # The GGUF has no template: chat.py's. Slow (~30 s): 262k pieces.
    pytest.param("gemma3_270m", "gemma", marks=pytest.mark.slow),
])
def test_shipped_tokenizer_and_chat_template(name, chat_format, tmp_path):
  vocab = loading._vocab(name)
  template = export.chat_template(loading.vocab_origin(name), chat_format,
                                  vocab.bos_id is not None)
  export.write_tokenizer(str(tmp_path), vocab, template)
  tok = assert_same_ids(str(tmp_path), vocab, tokenizer_texts())
  assert tok.decode(tok("Grüße 🙂\n  x").input_ids, skip_special_tokens=True) == "Grüße 🙂\n  x"

  fmt = loading.chat_format(chat_format, name)
  prompt, attempt, instruction = " What is 6 * 7?\n", "It is 42.", "Check your answer."

  def template_ids(messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids

  first = chat.first_turn_ids(fmt, vocab, prompt)
  assert template_ids([{"role": "user", "content": prompt}]) == first
  assert template_ids([{"role": "user", "content": prompt},
                       {"role": "assistant", "content": attempt},
                       {"role": "user", "content": instruction}]) == (
      first + vocab.encode(attempt) + [chat.stop_token_id(fmt, vocab)]
      + chat.next_turn_ids(fmt, vocab, instruction))


# ---------------------------------------------------------------------------------------------
# The command.


def test_command_exports_a_trainer_work_dir(tmp_path, capsys):
  cfg = dataclasses.replace(LLAMA, vocab_size=49_152, embed_dim=32, head_dim=8,
                            tie_embeddings=True)
  params = random_params(cfg, seed=1)
  run = tmp_path / "run"
  loading.save_params(str(run / "export"), cfg, params, vocab_source="smollm2_135m")
  out = tmp_path / "hf"
  out.mkdir()
  (out / "stale.txt").write_text("from an earlier export")
  for argv, message in [
      (["--model", str(run), "--out", str(out)], "not empty (pass --overwrite"),
      (["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "cannot load"),
      (["--model", str(run), "--out", str(run), "--overwrite"], "holds the model"),
  ]:
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if not line.startswith("Reading ")] == [
        f"error: {err.split('error: ', 1)[-1].strip()}"] and message in err, err

  argv = ["--model", str(run), "--out", str(out), "--dtype", "float32", "--overwrite"]
  assert export.main(argv) == 0
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                     "model.safetensors", "tokenizer.json",
                                     "tokenizer_config.json"]
  with open(out / "config.json") as f:
    config = json.load(f)
  assert config["architectures"] == ["LlamaForCausalLM"]
  assert config["max_position_embeddings"] == 8192  # From the vocabulary's GGUF.
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  ids = np.array([tok("Natalia sold 48 clips.").input_ids], np.int32)
  np.testing.assert_allclose(hf_logits(str(out), ids), ours_logits(cfg, params, ids),
                             atol=1e-3, rtol=0)
  # And back: the same model and vocabulary.
  got_cfg, got, vocab = loading.load(str(out))
  assert got_cfg == cfg
  assert_same_params(got, params)
  assert vocab.encode("Natalia sold 48 clips.") == ids[0].tolist()
  assert (vocab.bos_id, vocab.eos_id, vocab.eot_id) == (None, 2, 2)


def test_command_refuses_a_character_vocabulary(tmp_path, capsys):
  cfg = dataclasses.replace(LLAMA, vocab_size=8)
  checkpoints.export_params(str(tmp_path / "run" / "export"), cfg, random_params(cfg),
                            {"kind": "char", "alphabet": "abcde"})
  assert export.main(["--model", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
  assert "character vocabulary" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", [chat.get_format("gemma"), chat.get_format("chatml"),
                                 chat.get_format("chatml", system="Be brief. ✓")])
def test_chat_templates_of_chat_formats_render_the_formats(fmt):
  assert chat.format_from_template(chat.jinja_template(fmt, bos=True)) == fmt


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2_135m", "gemma3_270m"])
def test_shipped_model_export_matches_transformers(name, tmp_path):
  assert export.main(["--model", name, "--out", str(tmp_path), "--dtype", "float32"]) == 0
  cfg, params, _ = loading.load(name)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  text = " ".join(tokenizer_texts(40))
  ids = np.array([tok(text).input_ids[:128]], np.int32)
  diff = np.abs(hf_logits(str(tmp_path), ids) - ours_logits(cfg, params, ids)).max()
  assert diff < 1e-3, diff
