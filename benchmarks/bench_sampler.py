"""Two-attempt sampling throughput: our sampler against Hugging Face transformers' `generate`.

    .venv/bin/python benchmarks/bench_sampler.py [--model=smollm2_135m|gemma3_270m]
        [--batch=4] [--prompt_len=64] [--max_new_tokens=32] [--repeats=3] [--torch_threads=0]

Both sides run the same model (one GGUF file, dequantized by each: ours through
`loading.load`, transformers through its GGUF reader; PyTorch on the CPU, float32), the same
batch of prompts of `prompt_len` tokens, the same instruction tokens (the math self-correction
instruction in the model's chat format) and exactly `max_new_tokens` new tokens in each of two
attempts, sampled at temperature 1 without top-k / top-p filtering:

* ours: `sampler.sample`, compiled once (the compile time is printed on its own), with a stop
  id no token has, so no attempt stops early;
* transformers: `generate` for attempt 1, the instruction appended, `generate` for attempt 2
  continuing attempt 1's KV cache; `min_new_tokens = max_new_tokens`, so EOS never stops it.

Throughput is generated tokens (batch * 2 * max_new_tokens) per second of one run, median of
`repeats` runs after one warm-up run. The prompts' content does not change the work done.
"""

import functools
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from transformers import modeling_gguf_pytorch_utils

from score_jax import generate
from score_jax import loading
from score_jax import sampler as sampler_lib
from score_jax import tasks

_MODEL = flags.DEFINE_enum("model", "smollm2_135m", ["smollm2_135m", "gemma3_270m"],
                           "Shipped model to run.")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per batch.", lower_bound=1)
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.", lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "New tokens per attempt.",
                                       lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per side.", lower_bound=1)
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "PyTorch intra-op threads; 0: its default (one per core). On a CPU "
    "that other processes also load, fewer threads can be much faster.", lower_bound=0)
_NUM_ATTEMPTS = 2
_NEVER = -1  # A stop id no token has.


def _prompts(model: generate.LoadedModel, batch: int, length: int) -> np.ndarray:
  """int32 [batch, length]: row b is a different window of a long text's tokens."""
  ids = model.vocab.encode(" ".join([tasks.MATH_SELF_CORRECTION] * (batch + length // 8)))
  if len(ids) < batch + length:
    raise ValueError(f"the text has {len(ids)} tokens, fewer than batch + prompt_len")
  return np.stack([ids[b:b + length] for b in range(batch)]).astype(np.int32)


def _median_seconds(run, repeats: int) -> float:
  run()  # Warm-up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _ours(model: generate.LoadedModel, prompts: np.ndarray, instruction: list[int],
          max_new_tokens: int, repeats: int) -> tuple[float, float]:
  """(compile seconds, median run seconds) of our sampler."""
  fn = jax.jit(functools.partial(
      sampler_lib.sample, model_cfg=model.cfg, num_attempts=_NUM_ATTEMPTS,
      max_new_tokens=max_new_tokens, eot_id=_NEVER, pad_id=model.vocab.pad_id))
  params = jax.device_put(model.params)
  lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
  args = (params, jnp.asarray(prompts), lengths, jnp.asarray(instruction, jnp.int32))
  rng, temperature = jax.random.PRNGKey(0), jnp.float32(1.0)
  start = time.perf_counter()
  compiled = fn.lower(*args, rng, temperature).compile()
  compile_s = time.perf_counter() - start

  def run():
    nonlocal rng
    rng, key = jax.random.split(rng)
    out = jax.block_until_ready(compiled(*args, key, temperature))
    if not np.all(np.asarray(out.attempt_lengths) == max_new_tokens):
      raise AssertionError("an attempt of ours stopped early")

  return compile_s, _median_seconds(run, repeats)


def _hf_model(gguf_path: str) -> torch.nn.Module:
  """transformers' model of a GGUF file, read without `accelerate` (which `from_pretrained`
  needs for GGUF): config from the file, then its dequantized tensors."""
  directory, filename = os.path.split(gguf_path)
  config = transformers.AutoConfig.from_pretrained(directory, gguf_file=filename)
  hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  tensors = modeling_gguf_pytorch_utils.load_gguf_checkpoint(
      gguf_path, return_tensors=True, model_to_load=hf_model)["tensors"]
  missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
  if unexpected or set(missing) - {"lm_head.weight"}:
    raise ValueError(f"transformers read {gguf_path} with missing tensors {missing} and "
                     f"unexpected ones {unexpected}")
  hf_model.tie_weights()  # lm_head is the embedding.
  return hf_model.eval()


def _transformers(hf_model: torch.nn.Module, prompts: np.ndarray, instruction: list[int],
                  max_new_tokens: int, pad_id: int, repeats: int) -> float:
  """Median run seconds of two `generate` calls, the second continuing the first's cache."""
  batch, prompt_len = prompts.shape
  expected = prompt_len + _NUM_ATTEMPTS * max_new_tokens + len(instruction)
  kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                pad_token_id=pad_id, return_dict_in_generate=True)
  first_ids = torch.from_numpy(prompts.astype(np.int64))
  turn = torch.tensor(instruction, dtype=torch.int64).expand(batch, -1)

  def run():
    with torch.inference_mode():
      first = hf_model.generate(first_ids, attention_mask=torch.ones_like(first_ids), **kwargs)
      ids = torch.cat([first.sequences, turn], dim=1)
      second = hf_model.generate(ids, attention_mask=torch.ones_like(ids),
                                 cache=first.cache, **kwargs)
    if second.sequences.shape != (batch, expected):
      raise AssertionError(f"transformers returned {tuple(second.sequences.shape)} tokens, "
                           f"expected {(batch, expected)}")

  return _median_seconds(run, repeats)


def main(argv):
  del argv
  name, batch, new = _MODEL.value, _BATCH.value, _MAX_NEW_TOKENS.value
  if _TORCH_THREADS.value:
    torch.set_num_threads(_TORCH_THREADS.value)
  model = generate.load_model(name)
  fmt = generate.conversation_format("auto", model)
  _, instruction = generate.conversation_ids(fmt, model.vocab, "", tasks.MATH_SELF_CORRECTION,
                                             _NUM_ATTEMPTS)
  prompts = _prompts(model, batch, _PROMPT_LEN.value)
  tokens = batch * _NUM_ATTEMPTS * new
  print(f"{name}: batch {batch}, prompt {_PROMPT_LEN.value} tokens, {_NUM_ATTEMPTS} attempts "
        f"x {new} new tokens, instruction {len(instruction)} tokens ({fmt.name} format), "
        f"{tokens} generated tokens per run; {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}; jax {jax.__version__} {jax.default_backend()}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}")
  compile_s, ours_s = _ours(model, prompts, instruction, new, _REPEATS.value)
  print(f"ours:         compile {compile_s:.1f} s, run {ours_s:.2f} s (median of "
        f"{_REPEATS.value}) -> {tokens / ours_s:.1f} tokens/s")
  pad_id = model.vocab.pad_id
  del model
  transformers.utils.logging.disable_progress_bar()
  hf_model = _hf_model(loading.shipped_gguf(name))
  hf_s = _transformers(hf_model, prompts, instruction, new, pad_id, _REPEATS.value)
  print(f"transformers: run {hf_s:.2f} s (median of {_REPEATS.value}) -> "
        f"{tokens / hf_s:.1f} tokens/s")
  print(f"throughput ratio ours / transformers: {hf_s / ours_s:.2f}x")


if __name__ == "__main__":
  app.run(main)
