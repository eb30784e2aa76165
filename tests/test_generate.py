"""`python -m score_jax.decoding.generate`: greedy attempts equal a full-recompute decode,
the format's stop token ends an attempt, trainer exports load, bad input is one line and exit
status 2."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from score_jax import checkpoints
from score_jax.data import tasks
from score_jax.data import toy
from score_jax.decoding import generate
from score_jax.decoding import sampling
from score_jax.models import chat
from score_jax.models import loading
from score_jax.models import transformer as model_lib
from score_jax.models import vocab as vocab_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_SPEC = {"kind": "char", "alphabet": toy.ALPHABET}


def start_cli(*args, xla_flags: str = "") -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip())
  return subprocess.Popen([sys.executable, "-m", "score_jax.decoding.generate", *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run_cli(*args) -> subprocess.CompletedProcess:
  proc = start_cli(*args)
  stdout, stderr = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def attempt_texts(stdout: str, num_attempts: int) -> list[str]:
  """The texts under the "--- attempt k ---" headers (each followed by one newline)."""
  rest = stdout.split("--- attempt 1 ---\n", 1)[1]
  texts = []
  for k in range(2, num_attempts + 1):
    text, rest = rest.split(f"\n--- attempt {k} ---\n", 1)
    texts.append(text)
  texts.append(rest.split("\n--- conversation ---\n")[0].removesuffix("\n"))
  return texts


def greedy_full_recompute(cfg, params, ids, max_new_tokens, stop):
  """Greedy tokens after `ids`, each step running model.forward on the whole sequence."""
  buf = np.zeros((1, len(ids) + max_new_tokens), np.int32)
  buf[0, :len(ids)] = ids
  positions = np.arange(buf.shape[1], dtype=np.int32)[None]
  logits_fn = jax.jit(lambda p, t: model_lib.forward(cfg, p, t, positions)[0][0])
  out = []
  for i in range(len(ids), buf.shape[1]):
    token = int(np.argmax(logits_fn(params, buf)[i - 1]))
    buf[0, i] = token
    out.append(token)
    if token == stop:
      break
  return out


@pytest.fixture(scope="module")
def toy_model():
  cfg = toy.model_config(len(toy.ALPHABET) + 3, num_layers=1, embed_dim=32, mlp_dim=64,
                         num_heads=2, num_kv_heads=1, head_dim=16, sliding_window=8)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(3))
  return generate.LoadedModel(cfg, params, vocab_lib.CharVocab(toy.ALPHABET), None)


@pytest.fixture(scope="module")
def toy_workdir(tmp_path_factory, toy_model):
  work = tmp_path_factory.mktemp("toy_work")
  checkpoints.export_params(str(work / "export"), toy_model.cfg, toy_model.params, TOY_SPEC)
  return work


def test_cli_greedy_attempts_on_smollm2_match_a_direct_decode():
  prompt = "What is 7 * 8?"
  # XLA's CPU backend at optimization level 0 compiles the 30-layer sampler ~4x faster, at
  # about the same run time for this program; the direct decode below is compiled as usual.
  proc = start_cli("--model=smollm2_135m", f"--prompt={prompt}", "--num_attempts=2",
                   "--max_new_tokens=8", "--temperature=0",
                   "--show_conversation", xla_flags="--xla_backend_optimization_level=0")
  try:  # The direct decode runs while the CLI loads and compiles.
    cfg, params, vocab = loading.load("smollm2_135m")
    fmt = chat.format_from_gguf(loading.shipped_gguf("smollm2_135m"))
    stop = chat.stop_token_id(fmt, vocab)
    tokens = greedy_full_recompute(cfg, params, chat.first_turn_ids(fmt, vocab, prompt), 8, stop)
    expected = vocab.decode(tokens[:-1] if tokens[-1] == stop else tokens)
  finally:
    stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr
  assert fmt.name == "chatml"
  texts = attempt_texts(stdout, 2)
  assert texts[0] == expected
  assert texts[1]
  conversation = stdout.split("--- conversation ---\n", 1)[1]
  assert conversation.startswith(fmt.first_turn(prompt) + texts[0])
  assert fmt.next_turn(tasks.MATH_SELF_CORRECTION) + texts[1] in conversation


def test_attempts_equal_full_recompute_of_the_whole_conversation(toy_workdir):
  model = generate.load_model(str(toy_workdir))
  assert model.is_toy
  fmt = generate.conversation_format("auto", model)
  instruction = generate.default_instruction(model)
  assert instruction == toy.INSTRUCTION
  ids, instruction_ids = generate.conversation_ids(fmt, model.vocab, "3+9+4", instruction, 2)
  assert ids == [model.vocab.bos_id] + model.vocab.encode("3+9+4\n")
  stop = chat.stop_token_id(fmt, model.vocab)
  attempts = generate.generate(model, ids, instruction_ids, stop, num_attempts=2,
                               max_new_tokens=12, method=sampling.Greedy(), seed=0)
  first = greedy_full_recompute(model.cfg, model.params, ids, 12, stop)
  second = greedy_full_recompute(model.cfg, model.params, ids + first + instruction_ids, 12,
                                 stop)
  for attempt, tokens in zip(attempts, (first, second)):
    assert attempt.num_tokens == len(tokens)
    assert attempt.stopped == (tokens[-1] == stop)
    assert attempt.text == model.vocab.decode(tokens)


def test_an_attempt_ends_at_the_formats_stop_token(toy_model):
  vocab = toy_model.vocab
  ids, instruction_ids = vocab.encode("1+2\n"), vocab.encode("check:\n")
  # Sampled (a fixed seed draws the same tokens up to the stop), so the tokens vary.
  sample = lambda stop, k, seed: generate.generate(
      toy_model, ids, instruction_ids, stop, num_attempts=k, max_new_tokens=16,
      method=sampling.Sampling(1.0), seed=seed)
  # The first seed whose free run (-1: no token stops it) draws 16 characters: the random
  # model also draws its special tokens, which decode to no text.
  for seed in range(64):
    free = sample(-1, 1, seed)[0]
    tokens = vocab.encode(free.text)
    if len(tokens) == 16:
      break
  assert free.num_tokens == 16 and not free.stopped
  # Stop on a token that the free run first emits after its first position.
  cut = next(i for i, t in enumerate(tokens) if i > 0 and t not in tokens[:i])
  fmt = chat.ChatFormat(name="test", user_turn="{text}\n", after_answer="",
                        stop_token=vocab.decode([tokens[cut]]))
  stop = chat.stop_token_id(fmt, vocab)
  assert stop == tokens[cut] != vocab.eot_id
  attempts = sample(stop, 2, seed)
  assert attempts[0] == generate.Attempt(vocab.decode(tokens[:cut]), cut + 1, True)
  rendered = generate.render_conversation(fmt, "1+2", attempts, "check:")
  second = attempts[1].text + (fmt.stop_token if attempts[1].stopped else "")
  assert rendered == "1+2\n" + attempts[0].text + fmt.stop_token + "check:\n" + second


def test_render_writes_the_stop_token_only_after_stopped_attempts():
  fmt = chat.get_format("gemma")
  attempts = [generate.Attempt("cut", 4, False), generate.Attempt("done", 2, True)]
  assert generate.render_conversation(fmt, "Q", attempts, "Fix.") == (
      "<start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\ncut\n"
      "<start_of_turn>user\nFix.<end_of_turn>\n<start_of_turn>model\ndone<end_of_turn>")


def test_export_directory_and_toy_format_rules(toy_workdir):
  model = generate.load_model(str(toy_workdir / "export"))
  assert model.is_toy and model.cfg.num_layers == 1
  with pytest.raises(ValueError, match="toy model"):
    generate.conversation_format("plain", model)


@pytest.mark.parametrize("args, message", [
    (["--model=/no/such/model", "--prompt=hi"], "not found"),
    (["--model=smollm2_135m", "--prompt=hi", "--num_attempts=0"], "num_attempts"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
  proc = run_cli(*args)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
  assert not proc.stdout
