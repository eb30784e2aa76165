"""Chat formats: how the turns of a self-correction conversation are written for a model family.

The conversation is: the problem (user), attempt 1 (model), the self-correction instruction
(user), attempt 2 (model). A `ChatFormat` gives the text around the model's answers:

    [BOS] first_turn(problem) attempt_1 <stop> next_turn(instruction) attempt_2 <stop>

BOS is not text: the caller puts `vocab.bos_id` first (when not None). The model ends each
answer with the stop token itself; `next_turn` is the text that follows it. Families:

* "gemma": `<start_of_turn>user ... <end_of_turn>` turns; the model's turn is "model". User
  text is stripped of surrounding whitespace, as Gemma's chat template does.
* "chatml": `<|im_start|>user ... <|im_end|>` turns (SmolLM2, Qwen2), with an optional system
  turn first (SmolLM2's and Qwen2's templates add a default one: see `format_from_template`).
* "plain": for base models without a template: "User: {text}\\nAssistant:" turns separated by a
  blank line. The answer ends with the vocabulary's EOS (a base model may instead run on to the
  length limit). EOS is not text, so `conversation` writes nothing for it.

Token sequences should be built turn by turn (`first_turn_ids`, the sampled answer with its stop
id, `next_turn_ids`, ...), which is what a chat template's tokenization gives for Gemma and
ChatML since every turn boundary is a special token.
"""

import dataclasses
import json
import os
from typing import Optional, Sequence, Union

from score_jax.models import gguf_file
from score_jax.models import vocab as vocab_lib

_TEXT = "{text}"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """The text around the model's answers in one family's conversations.

  Attributes:
    name: the family ("gemma", "chatml", "plain").
    user_turn: a user turn followed by the opening of the model's turn; "{text}" stands for the
      user text (exactly once).
    after_answer: text between the model's stop token and the next user turn.
    stop_token: text of the token that ends a model answer; None: the vocabulary's EOS.
    preamble: text before the first user turn (e.g. a system turn).
    strip_user_text: strip whitespace around user text (Gemma's template does).
  """
  name: str
  user_turn: str
  after_answer: str
  stop_token: Optional[str]
  preamble: str = ""
  strip_user_text: bool = False

  def __post_init__(self):
    if self.user_turn.count(_TEXT) != 1:
      raise ValueError(f"user_turn must contain {_TEXT} exactly once: {self.user_turn!r}")

  def _user(self, text: str) -> str:
    before, after = self.user_turn.split(_TEXT)
    return before + (text.strip() if self.strip_user_text else text) + after

  def first_turn(self, user_text: str) -> str:
    """Everything before the model's first answer (without BOS)."""
    return self.preamble + self._user(user_text)

  def next_turn(self, user_text: str) -> str:
    """Text after a model answer and its stop token, up to the start of the next answer."""
    return self.after_answer + self._user(user_text)


def get_format(name: str, system: Optional[str] = None) -> ChatFormat:
  """The chat format of a family: "gemma", "chatml" or "plain".

  Args:
    name: the family.
    system: a system prompt (ChatML only), written as a system turn before the first user turn.
  """
  if system is not None and name != "chatml":
    raise ValueError(f"format {name!r} has no system turn; put the text in the prompt")
  if name == "gemma":
    return ChatFormat(
        name="gemma",
        user_turn="<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n",
        after_answer="\n", stop_token="<end_of_turn>", strip_user_text=True)
  if name == "chatml":
    return ChatFormat(
        name="chatml",
        user_turn="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
        after_answer="\n", stop_token="<|im_end|>",
        preamble="" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n")
  if name == "plain":
    return ChatFormat(name="plain", user_turn="User: {text}\nAssistant:", after_answer="\n\n",
                      stop_token=None)
  raise ValueError(f"unknown chat format {name!r}; choose from 'gemma', 'chatml', 'plain'")


def conversation(fmt: ChatFormat, prompt: str, attempts: Sequence[str],
                 instruction: str) -> str:
  """The text of a conversation: `prompt`, then each attempt with its stop token, the
  self-correction `instruction` between attempts. With no attempts: the attempt-1 prompt."""
  text = fmt.first_turn(prompt)
  for i, attempt in enumerate(attempts):
    if i:
      text += fmt.next_turn(instruction)
    text += attempt + (fmt.stop_token or "")
  return text


def stop_token_id(fmt: ChatFormat, vocab: vocab_lib.Vocabulary) -> int:
  """The id that ends a model answer in `fmt` (the sampler stops on it)."""
  if fmt.stop_token is None:
    return vocab.eos_id
  ids = vocab.encode(fmt.stop_token)
  if len(ids) != 1:
    raise ValueError(f"stop token {fmt.stop_token!r} is not a single token in this vocabulary")
  return ids[0]


def first_turn_ids(fmt: ChatFormat, vocab: vocab_lib.Vocabulary, user_text: str) -> list[int]:
  """Token ids before the model's first answer: BOS (if the model takes one) and `first_turn`."""
  bos = [] if vocab.bos_id is None else [vocab.bos_id]
  return bos + vocab.encode(fmt.first_turn(user_text))


def next_turn_ids(fmt: ChatFormat, vocab: vocab_lib.Vocabulary, user_text: str) -> list[int]:
  """Token ids of `next_turn`: after an answer's stop id, up to the next answer."""
  return vocab.encode(fmt.next_turn(user_text))


def jinja_template(fmt: ChatFormat, bos: bool) -> str:
  """A Hugging Face chat template (Jinja) that renders conversations as `fmt` does.

  Rendered and tokenized, a conversation gives the ids chat.py builds: BOS (when `bos`),
  `first_turn`, each answer with its stop token (EOS for the plain format), `next_turn`. A user
  message opens the model's turn, as `user_turn` does, so the generation prompt adds nothing.
  Only "user" and "assistant" messages are accepted; the system turn is the format's preamble.
  """
  literal = lambda text: json.dumps(text, ensure_ascii=False)  # A valid Jinja string literal.
  before, after = fmt.user_turn.split(_TEXT)
  user_text = "message['content'] | trim" if fmt.strip_user_text else "message['content']"
  stop = "eos_token" if fmt.stop_token is None else literal(fmt.stop_token)
  return (("{{ bos_token }}" if bos else "") + "{{ " + literal(fmt.preamble) + " }}"
          "{% for message in messages %}"
          "{% if message['role'] == 'user' %}"
          "{{ " + literal(before) + " }}{{ " + user_text + " }}{{ " + literal(after) + " }}"
          "{% elif message['role'] == 'assistant' %}"
          "{{ message['content'] }}{{ " + stop + " }}{{ " + literal(fmt.after_answer) + " }}"
          "{% else %}{{ raise_exception('only user and assistant messages are supported') }}"
          "{% endif %}{% endfor %}")


# Stand-ins for the texts of a conversation, to render a template and compare it with a format.
_PROBE_PROMPT, _PROBE_ATTEMPTS, _PROBE_INSTRUCTION = "P", ("A1", "A2"), "I"


def format_from_template(template: str) -> ChatFormat:
  """The format a Jinja chat template (e.g. a GGUF's `tokenizer.chat_template`) writes.

  Recognises Gemma and ChatML templates; for ChatML, the system turn the template adds to a
  conversation that has none becomes the format's system prompt. Raises ValueError unless the
  template renders a two-attempt conversation exactly as the returned format does.
  """
  messages = [{"role": "user", "content": _PROBE_PROMPT}]
  for i, attempt in enumerate(_PROBE_ATTEMPTS):
    if i:
      messages.append({"role": "user", "content": _PROBE_INSTRUCTION})
    messages.append({"role": "assistant", "content": attempt})
  rendered = _render(template, messages)
  if "<start_of_turn>" in rendered:
    fmt = get_format("gemma")
  elif "<|im_start|>" in rendered:
    head = "<|im_start|>system\n"
    system = (rendered[len(head):rendered.index("<|im_end|>")]
              if rendered.startswith(head) else None)
    fmt = get_format("chatml", system=system)
  else:
    raise ValueError(f"chat template is neither Gemma nor ChatML; it renders {rendered!r}")
  expected = conversation(fmt, _PROBE_PROMPT, _PROBE_ATTEMPTS, _PROBE_INSTRUCTION)
  if rendered != expected + fmt.after_answer:
    raise ValueError(f"chat template renders {rendered!r}, not the {fmt.name!r} format's "
                     f"{expected + fmt.after_answer!r}")
  return fmt


def format_from_gguf(path: Union[str, os.PathLike]) -> ChatFormat:
  """The format of a GGUF model's chat template (see `format_from_template`)."""
  key = "tokenizer.chat_template"
  template = gguf_file.read_metadata(path, {key}).get(key)
  if template is None:
    raise ValueError(f"{path} has no chat template; pick a format by name "
                     "('gemma', 'chatml', 'plain')")
  return format_from_template(template)


def _render(template: str, messages: list[dict[str, str]]) -> str:
  """Renders a chat template as HF tokenizers do (BOS/EOS as empty text: they are ids here)."""
  try:
    from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("reading a chat template needs jinja2: pip install jinja2") from None

  def raise_exception(message: str):
    raise ValueError(f"chat template: {message}")

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template).render(
      messages=messages, add_generation_prompt=False, bos_token="", eos_token="")
