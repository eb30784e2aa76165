r"""Command line: generate from a model, optionally with self-correction attempts.

    python -m score_jax.decoding.generate --model=smollm2_135m --prompt="What is 7 * 8?"
    python -m score_jax.decoding.generate --model=/work/runs/demo/stage2 --prompt="3+9+4+7" \
        --num_attempts=2 --show_conversation

--model is any source `loading.load` accepts (a shipped name, a GGUF file, a Hugging Face
directory, a `loading.save_params` directory), a trainer work dir holding an `export/`, or such
an export directory itself. With --num_attempts=K >= 2 the model answers, receives the
self-correction instruction, answers again, and so on: the conversation SCoRe trains on. All
attempts come out of one compiled `sampler.Sampler` call. Each attempt stops at the chat
format's stop token or after --max_new_tokens tokens.

Bad input (a missing model, bad flags, text the vocabulary cannot encode) ends with one line
on stderr and exit status 2.
"""

import dataclasses
import os
import sys
from typing import Any, NoReturn, Optional, Sequence, Union

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from score_jax.data import tasks
from score_jax.data import toy
from score_jax.decoding import sampler as sampler_lib
from score_jax.decoding import sampling
from score_jax.models import chat
from score_jax.models import loading
from score_jax.models import transformer as model_lib
from score_jax.models import vocab as vocab_lib

_EXPORT = "export"
_EXPORT_FILES = ("model_config.json", "vocab.json")
_FORMATS = ("auto", "gemma", "chatml", "plain")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model ready to generate.

  Attributes:
    cfg: the architecture.
    params: the parameters (host or device arrays).
    vocab: its vocabulary.
    source: the `loading.load` source of the weights or the vocabulary; None for the toy model.
  """
  cfg: model_lib.ModelConfig
  params: Any
  vocab: vocab_lib.Vocabulary
  source: Optional[str]

  @property
  def is_toy(self) -> bool:
    return self.source is None


@dataclasses.dataclass(frozen=True)
class Attempt:
  """One generated attempt: its text, its token count and whether it ended with the stop token
  (False: cut at the token limit). The stop token is counted but not in the text."""
  text: str
  num_tokens: int
  stopped: bool


def _export_dir(path: str) -> Optional[str]:
  """The export directory `path` is (or holds as export/), or None."""
  for directory in (os.path.join(path, _EXPORT), path):
    if all(os.path.isfile(os.path.join(directory, f)) for f in _EXPORT_FILES):
      return directory
  return None


def load_model(model: str) -> LoadedModel:
  """Loads --model: a trainer export (or work dir holding one), or any `loading.load` source.

  Raises FileNotFoundError for a path that does not exist and is no shipped name, and what
  `loading.load` raises for sources it cannot read.
  """
  if not os.path.exists(model):
    try:
      loading.shipped_gguf(model)
    except ValueError:
      raise FileNotFoundError(f"model {model!r} not found: no such file or directory, and no "
                              "shipped model of that name") from None
  export = _export_dir(model) if os.path.isdir(model) else None
  cfg, params, vocab = loading.load(export or model)
  if export is None:
    return LoadedModel(cfg, params, vocab, model)
  # The toy model's export has a character vocabulary and no source.
  return LoadedModel(cfg, params, vocab, loading.export_vocab_spec(export).get("source"))


def conversation_format(name: str, model: LoadedModel) -> chat.ChatFormat:
  """The format called `name` (one of _FORMATS) for `model`.

  "auto" reads the chat template of a GGUF model (plain when it has none or is no GGUF); the
  toy model takes only its own format, which "auto" selects.
  """
  if model.is_toy:
    if name != "auto":
      raise ValueError("the toy model has its own conversation format: leave "
                       "--chat_format=auto")
    return toy.FORMAT
  return loading.chat_format(name, model.source)


def default_instruction(model: LoadedModel) -> str:
  return toy.INSTRUCTION if model.is_toy else tasks.MATH_SELF_CORRECTION


def conversation_ids(fmt: chat.ChatFormat, vocab: vocab_lib.Vocabulary, prompt: str,
                     instruction: str, num_attempts: int) -> tuple[list[int], list[int]]:
  """Token ids of the first user turn (BOS first when the model takes one) and of the turn
  between attempts (the self-correction instruction in `fmt`)."""
  instruction_ids = chat.next_turn_ids(fmt, vocab, instruction)
  if num_attempts > 1 and not instruction_ids:
    raise ValueError("the self-correction instruction encodes to no tokens")
  return chat.first_turn_ids(fmt, vocab, prompt), instruction_ids


def generate(model: LoadedModel, prompt_ids: Sequence[int], instruction_ids: Sequence[int],
             stop: int, *, num_attempts: int, max_new_tokens: int, method: sampling.Method,
             seed: int) -> list[Attempt]:
  """Generates `num_attempts` attempts (one sampler call) from `conversation_ids`' ids.

  Each attempt ends with token `stop` (the format's: `chat.stop_token_id`, which for "plain"
  is EOS, not necessarily the vocabulary's `eot_id`) or after `max_new_tokens` tokens.
  """
  sampler = sampler_lib.Sampler(
      model.cfg, num_attempts=num_attempts, max_new_tokens=max_new_tokens,
      max_prompt_len=len(prompt_ids), instruction=instruction_ids, eot_id=stop,
      pad_id=model.vocab.pad_id)
  out = sampler(model.params, [prompt_ids], jax.random.PRNGKey(seed), method)
  tokens, lengths = np.asarray(out.attempt_tokens), np.asarray(out.attempt_lengths)
  attempts = []
  for k in range(num_attempts):
    toks = tokens[k, 0, :lengths[k, 0]].tolist()
    stopped = bool(toks) and toks[-1] == stop
    text = model.vocab.decode(toks[:-1] if stopped else toks)
    attempts.append(Attempt(text, len(toks), stopped))
  return attempts


def render_conversation(fmt: chat.ChatFormat, prompt: str, attempts: Sequence[Attempt],
                        instruction: str) -> str:
  """The conversation's text as the model saw it: the stop token is written (when it is text)
  only after attempts that produced it. BOS and EOS are not text."""
  stop_text = fmt.stop_token or ""
  text = fmt.first_turn(prompt)
  for i, attempt in enumerate(attempts):
    if i:
      text += fmt.next_turn(instruction)
    text += attempt.text + (stop_text if attempt.stopped else "")
  return text


def _define_flags() -> None:
  """The command line's flags (defined only when this module runs as the program)."""
  flags.DEFINE_string(
      "model", None, "A shipped model name, GGUF file, Hugging Face directory, trainer work "
      "dir (with export/) or export directory.")
  flags.DEFINE_string("prompt", None, "The first user turn.")
  flags.DEFINE_string("prompt_file", None, "A file holding the first user turn.")
  flags.DEFINE_integer("max_new_tokens", 256, "Tokens per attempt, at most.", lower_bound=1)
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.", lower_bound=0.0)
  flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens only.",
                       lower_bound=1)
  flags.DEFINE_float("top_p", None, "Nucleus sampling: the most likely tokens holding this "
                     "probability.", lower_bound=0.0, upper_bound=1.0)
  flags.DEFINE_float("min_p", None, "Only tokens at least this fraction as likely as the top "
                     "one.", lower_bound=0.0, upper_bound=1.0)
  flags.DEFINE_integer(
      "num_attempts", 1, "1: plain generation; K >= 2: K attempts, the self-correction "
      "instruction after each.", lower_bound=1)
  flags.DEFINE_string(
      "instruction", None, "Self-correction instruction; default: the math one "
      "(the toy task's for the toy model).")
  flags.DEFINE_enum(
      "chat_format", "auto", _FORMATS, "Conversation format; auto: the GGUF's chat template "
      "when it has one, else plain (the toy model has its own).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_bool("show_conversation", False,
                    "Also print the whole conversation as the model saw it.")
  flags.mark_flag_as_required("model")
  flags.mark_flags_as_mutual_exclusive(["prompt", "prompt_file"], required=True)


def _read_prompt(args: flags.FlagValues) -> str:
  if args.prompt_file is None:
    return args.prompt
  with open(args.prompt_file) as f:
    return f.read()


def _fail(message: Union[str, Exception]) -> NoReturn:
  print(f"error: {str(message).strip().splitlines()[0]}", file=sys.stderr)
  sys.exit(2)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  args = flags.FLAGS
  try:
    prompt = _read_prompt(args)
    model = load_model(args.model)
    fmt = conversation_format(args.chat_format, model)
    instruction = default_instruction(model) if args.instruction is None else args.instruction
    ids, instruction_ids = conversation_ids(fmt, model.vocab, prompt, instruction,
                                            args.num_attempts)
    stop = chat.stop_token_id(fmt, model.vocab)
    method = sampling.from_temperature(args.temperature, top_k=args.top_k, top_p=args.top_p,
                                       min_p=args.min_p)
  except (ValueError, OSError, ImportError) as e:
    _fail(e)
  attempts = generate(model, ids, instruction_ids, stop, num_attempts=args.num_attempts,
                      max_new_tokens=args.max_new_tokens, method=method,
                      seed=args.seed)
  for k, attempt in enumerate(attempts, start=1):
    print(f"--- attempt {k} ---\n{attempt.text}")
  if args.show_conversation:
    print(f"--- conversation ---\n{render_conversation(fmt, prompt, attempts, instruction)}")
  sys.stdout.flush()  # The texts before the summary, also when both streams share a terminal.
  print(", ".join(f"attempt {k}: {a.num_tokens} tokens, "
                  f"{'stop token' if a.stopped else 'token limit'}"
                  for k, a in enumerate(attempts, start=1)), file=sys.stderr)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with bad flags reported as one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(e)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
