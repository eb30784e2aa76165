"""Two-attempt sampling throughput: ours, Hugging Face transformers and Tunix, side by side.

    make bench-sampler        # builds .venv and .venv-peers (Tunix) first, then runs:
    .venv/bin/python benchmarks/bench_sampler.py --tunix_python=.venv-peers/bin/python \\
        [--models=smollm2_135m,gemma3_270m] [--batches=1,8,32] [--max_new_tokens=128] \\
        [--prompt_len=64] [--repeats=3] [--sides=ours,transformers,tunix]

The workload, the same on every side: B prompts of `prompt_len` tokens (BOS, then windows of
a math text), attempt 1 of exactly N new tokens, the self-correction instruction in the
model's chat format appended, attempt 2 of exactly N new tokens continuing the conversation;
temperature 1, no top-k / top-p; float32 weights and compute. Every side runs the same weights:
the shipped GGUF file dequantized (ours and Tunix through `loading.load`, transformers through
its own GGUF reader).

* ours: `sampler.sample`, one compiled program for both attempts, compiled ahead of time (the
  compile time is exact); a stop id no token has, so no attempt ends early. Its decode layers
  are scanned over their stack (the default): one layer's code, and no copy of the layers'
  weights held through the call, at the price of a copy of each layer's weights out of the
  stack at every step (XLA:CPU's). Its decode loops per attempt are the default's
  (`sampler.auto_attend_spans`: 4 on SmolLM2 at batch 32, else 1). Its XLA buffers
  (arguments, temporaries) are printed too.
* ours_unrolled: the same with the decode layers unrolled on weight slices taken once per
  call (`RunConfig.unroll_decode = True`): one layer's code per layer and attempt, a copy of
  the layers' weights held through the call.
* transformers: `generate` for attempt 1, the instruction appended, `generate` for attempt 2
  continuing attempt 1's KV cache; `min_new_tokens = N`, so EOS never stops it. Eager PyTorch:
  nothing to compile.
* Tunix (google-tunix 0.1.7, `tunix.generate.sampler.Sampler` over its Gemma 3 model): our
  parameters mapped onto its parameter tree; one `Sampler` per attempt with a KV cache of
  exactly that attempt's length, token ids passed through (no text round trip), a stop id no
  token has. Attempt 2 is a new call on the whole conversation (its sampler keeps no cache
  across calls). Gemma 3 only: Tunix 0.1.7's Llama model ignores the config's `rope_theta`
  (it always rotates with base 1e6), so its SmolLM2 logits do not match transformers'. Its
  compile time is its first run minus its median run (it compiles inside the first call).

Each (side, model, batch) runs in its own process, so that peak resident memory is per side:
"peak RSS" is the process's whole-life peak (loading the weights included); "sampling" is the
peak after the weights are loaded (compile and runs only). The processes are started one at a
time (each loads, compiles and makes one warm-up run with the machine to itself) and are then
kept alive while their timed runs alternate: round r runs every side once, starting one side
further along each round. A slow or fast moment of the machine (its speed drifts ~10% within
a run) then lands on every side alike instead of on whichever side ran then. Throughput is
generated tokens (B * 2 * N) per second of one run, median of `repeats` runs; the ratio lines
also print each round's ratio.

Before timing, a greedy run of each side on two prompts (`greedy_tokens` per attempt) checks
that the sides compute the same thing: the printed agreement counts, per row and attempt, the
tokens equal to ours before the first difference.

For each model and batch the script prints `ratio ours/transformers: 2.31x` and
`ratio ours/tunix: 1.52x` lines (throughput ratios; `ratio ours_unrolled/...` lines likewise),
then a profile of our decode step (its parts timed alone: the layers, the output head, the
choice of the token) next to its bound on this machine, measured in the same run: weight and
KV-cache bytes / read bandwidth, and matmul FLOPs / float32 matmul FLOP/s (see yardsticks.py);
the larger of the two is the step's floor, and "floor / step" how close the step comes to it
(over 100%: the measured peaks, taken while other work shares the machine, understate what
the step's own kernels got).
At the end, a markdown table of everything.
"""

import functools
import json
import os
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from score_jax.data import tasks
from score_jax.decoding import sampler as sampler_lib
from score_jax.decoding import sampling
from score_jax.models import chat
from score_jax.models import loading
from score_jax.models import transformer as model_lib
from score_jax.models import vocab as vocab_lib

import yardsticks  # benchmarks/yardsticks.py, next to this file.

_MODELS = flags.DEFINE_list("models", ["smollm2_135m", "gemma3_270m"], "Shipped models to run.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes to run.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.", lower_bound=2)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "New tokens per attempt.",
                                       lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per side (after one warm-up).",
                                lower_bound=1)
_SIDES = flags.DEFINE_list("sides", ["ours", "ours_unrolled", "transformers", "tunix"],
                           "Sides to run.")
_TUNIX_PYTHON = flags.DEFINE_string(
    "tunix_python", "", "Python of the venv with Tunix (`make bench-peers-venv`: "
    ".venv-peers/bin/python); empty: the Tunix side is skipped.")
_GREEDY_TOKENS = flags.DEFINE_integer("greedy_tokens", 8, "New tokens per attempt of the "
                                      "greedy agreement check; 0: no check.", lower_bound=0)
_PROFILE = flags.DEFINE_bool("profile", True, "Profile our decode step against its bound.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "PyTorch intra-op threads; 0: its default (one per core).",
    lower_bound=0)
_TIMEOUT = flags.DEFINE_integer("timeout", 3600, "Seconds allowed to one answer of a side's "
                                "process: its setup and warm-up run, or one timed run.")
# Internal: run one side in this process (the driver starts these).
_WORKER = flags.DEFINE_enum("worker", None, ["ours", "ours_unrolled", "transformers", "tunix",
                                              "profile"],
                            "Internal: the side this process runs.")
_JOB = flags.DEFINE_string("job", None, "Internal: the worker's job file (JSON).")

_NUM_ATTEMPTS = 2
_NEVER = -1  # A stop id no token has.
# A worker's answers, one line each: ready (after setup and warm-up), one timed run, the end.
_READY, _TIME, _RESULT = "READY ", "TIME ", "RESULT "
_TUNIX_MODELS = ("gemma3_270m",)
_TUNIX_SKIPPED = ("n/a (Tunix 0.1.7's Llama model ignores rope_theta, so its SmolLM2 logits do "
                  "not match transformers'; compared on Gemma 3 only)")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The workload.


def make_prompts(vocab: vocab_lib.Vocabulary, batch: int, length: int) -> np.ndarray:
  """int32 [batch, length]: BOS (when the vocabulary has one), then row b's own window of a
  long text's tokens. No pad anywhere, so every side sees the same unpadded prompts."""
  bos = [] if vocab.bos_id is None else [vocab.bos_id]
  body = length - len(bos)
  ids = vocab.encode(" ".join([tasks.MATH_SELF_CORRECTION] * (batch + body // 8)))
  if len(ids) < batch + body:
    raise ValueError(f"the text has {len(ids)} tokens, fewer than batch + prompt_len")
  return np.stack([bos + ids[b:b + body] for b in range(batch)]).astype(np.int32)


def leading_agreement(ours: np.ndarray, theirs: np.ndarray) -> int:
  """Tokens equal before the first difference, summed over rows: ours, theirs [..., N]."""
  same = np.asarray(ours) == np.asarray(theirs)
  return int(np.sum(np.cumprod(same, axis=-1)))


def _job_inputs(job: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(job["prompts"], np.int32), np.asarray(job["instruction"], np.int32)


# ---------------------------------------------------------------------------------------------
# Per-process memory.


def _reset_peak_rss() -> None:
  """Resets the kernel's peak-RSS mark of this process (VmHWM) where Linux allows it."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def _current_peak_rss() -> Optional[int]:
  """VmHWM in bytes: the peak since the last `_reset_peak_rss` (None where unreadable)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


# ---------------------------------------------------------------------------------------------
# The sides. Each loads its model and returns {"run": run(i) -> tokens [K, B, N] of run i
# (seeded by i), "compile_s": seconds, None (eager) or _IN_FIRST_RUN} and any other fields
# to report.

_IN_FIRST_RUN = "in first run"  # Compiles inside its first call: first run minus median run.


def _ours(job: dict[str, Any], unroll_decode: bool = False) -> dict[str, Any]:
  cfg, params, _ = loading.load(job["model"])
  params = jax.device_put(params)
  _reset_peak_rss()
  prompts, instruction = _job_inputs(job)
  batch, prompt_len = prompts.shape
  new = job["max_new_tokens"]
  method = sampling.Greedy() if job["greedy"] else sampling.Sampling(temperature=1.0)
  args = (params, jnp.asarray(prompts), jnp.full((batch,), prompt_len, jnp.int32),
          jnp.asarray(instruction))
  rng = jax.random.PRNGKey(0)

  fn = jax.jit(functools.partial(
      sampler_lib.sample, model_cfg=cfg, method=method, num_attempts=_NUM_ATTEMPTS,
      max_new_tokens=new, eot_id=_NEVER, pad_id=job["pad_id"], unroll_decode=unroll_decode))
  start = time.perf_counter()
  compiled = fn.lower(*args, rng).compile()
  compile_s = time.perf_counter() - start

  def run(i):
    out = jax.block_until_ready(compiled(*args, jax.random.fold_in(rng, i)))
    if not np.all(np.asarray(out.attempt_lengths) == new):
      raise AssertionError("an attempt of ours stopped early")
    return np.asarray(out.attempt_tokens)

  return {"run": run, "compile_s": compile_s, "buffers": xla_buffers(compiled)}


def xla_buffers(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Bytes XLA plans for a compiled program: its arguments and its temporaries."""
  memory = compiled.memory_analysis()
  return {"arguments": memory.argument_size_in_bytes, "temporaries": memory.temp_size_in_bytes}


def _hf_model(gguf_path: str):
  """transformers' model of a GGUF file, read without `accelerate` (which `from_pretrained`
  needs for GGUF): config from the file, then its dequantized tensors."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers import modeling_gguf_pytorch_utils  # pylint: disable=g-import-not-at-top
  transformers.utils.logging.disable_progress_bar()
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


def _transformers(job: dict[str, Any]) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  if job["torch_threads"]:
    torch.set_num_threads(job["torch_threads"])
  hf_model = _hf_model(loading.shipped_gguf(job["model"]))
  _reset_peak_rss()
  prompts, instruction = _job_inputs(job)
  batch, prompt_len = prompts.shape
  new = job["max_new_tokens"]
  expected = (batch, prompt_len + _NUM_ATTEMPTS * new + len(instruction))
  if job["greedy"]:
    kwargs = dict(do_sample=False)
  else:
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
  kwargs.update(max_new_tokens=new, min_new_tokens=new, pad_token_id=job["pad_id"],
                return_dict_in_generate=True)
  first_ids = torch.from_numpy(prompts.astype(np.int64))
  turn = torch.from_numpy(instruction.astype(np.int64)).expand(batch, -1)

  def run(i):
    torch.manual_seed(i)
    with torch.inference_mode():
      first = hf_model.generate(first_ids, attention_mask=torch.ones_like(first_ids), **kwargs)
      ids = torch.cat([first.sequences, turn], dim=1)
      second = hf_model.generate(ids, attention_mask=torch.ones_like(ids),
                                 cache=first.cache, **kwargs)
    if tuple(second.sequences.shape) != expected:
      raise AssertionError(f"transformers returned {tuple(second.sequences.shape)} tokens, "
                           f"expected {expected}")
    seq = second.sequences.numpy()
    return np.stack([seq[:, prompt_len:prompt_len + new], seq[:, -new:]])

  return {"run": run, "compile_s": None}


class _IdTokenizer:
  """The tokenizer interface Tunix's sampler calls, over token ids written as text ("2 818
  1437"): the benchmark hands Tunix exactly the ids the other sides get. BOS is already in the
  ids, so `bos_id` is None (Tunix adds none)."""

  def __init__(self, pad_id: int):
    self._pad_id = pad_id

  def encode(self, text: str, **unused_kwargs) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids: Sequence[int], **unused_kwargs) -> str:
    return " ".join(str(int(t)) for t in ids)

  def bos_id(self) -> None:
    return None

  def eos_id(self) -> int:
    return _NEVER

  def pad_id(self) -> int:
    return self._pad_id


def tunix_gemma3_params(cfg: model_lib.ModelConfig, params: Any) -> dict[str, Any]:
  """Our Gemma 3 parameters (numpy) as Tunix 0.1.7's Gemma 3 parameter tree (its `nnx.state`
  as a pure dict). Layouts (ours -> Tunix): q [D, N, H] -> [N, D, H]; k, v [D, K, H] -> kv
  [2, K, D, H]; o [N, H, D] as is; MLP matrices [in, out] as is; norm scales as is (both use
  the (1 + scale) convention)."""
  layers = params["layers"]
  d_nh = lambda w: np.transpose(w, (1, 0, 2))
  tree = {"embedder": {"input_embedding": params["embedding"]},
          "final_norm": {"scale": params["final_norm"]["scale"]}, "layers": {}}
  for i in range(cfg.num_layers):
    at = lambda x: x[i]  # pylint: disable=cell-var-from-loop
    attn, mlp = layers["attn"], layers["mlp"]
    tree["layers"][i] = {
        "attn": {
            "q_einsum": {"w": d_nh(at(attn["q"]))},
            "kv_einsum": {"w": np.stack([d_nh(at(attn["k"])), d_nh(at(attn["v"]))])},
            "attn_vec_einsum": {"w": at(attn["o"])},
            "_query_norm": {"scale": at(attn["q_norm"]["scale"])},
            "_key_norm": {"scale": at(attn["k_norm"]["scale"])},
        },
        "mlp": {name: {"kernel": at(mlp[ours])}
                for name, ours in (("gate_proj", "gate"), ("up_proj", "up"),
                                   ("down_proj", "down"))},
        "pre_attention_norm": {"scale": at(layers["pre_attn_norm"]["scale"])},
        "post_attention_norm": {"scale": at(layers["post_attn_norm"]["scale"])},
        "pre_ffw_norm": {"scale": at(layers["pre_mlp_norm"]["scale"])},
        "post_ffw_norm": {"scale": at(layers["post_mlp_norm"]["scale"])},
    }
  return tree


def _tunix_model(cfg: model_lib.ModelConfig, params: Any):
  """Tunix's Gemma 3 module holding our weights (float32)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tunix.models.gemma3 import model as gemma3  # pylint: disable=g-import-not-at-top
  fixed = dict(activation="gelu_tanh", norm_plus_one=True, scale_embeddings=True,
               tie_embeddings=True, qk_norm=True, post_norms=True, global_every=6,
               query_pre_attn_scalar=None, attn_logit_softcap=None, final_logit_softcap=None,
               rope_scale=1.0, norm_eps=1e-6)
  differs = {k: getattr(cfg, k) for k, v in fixed.items() if getattr(cfg, k) != v}
  if differs:
    raise ValueError(f"Tunix's Gemma 3 model cannot express this config: {differs}")
  tunix_cfg = gemma3.ModelConfig(
      num_layers=cfg.num_layers, num_embed=cfg.vocab_size, embed_dim=cfg.embed_dim,
      hidden_dim=cfg.mlp_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
      num_kv_heads=cfg.num_kv_heads, sliding_window_size=cfg.sliding_window,
      local_base_frequency=int(cfg.rope_local_base), global_base_frequency=int(cfg.rope_base),
      param_dtype=jnp.float32,
      shd_config=gemma3.ShardingConfig.get_default_sharding(is_sampling=True))
  module = nnx.eval_shape(lambda: gemma3.Gemma3(tunix_cfg, rngs=nnx.Rngs(0)))
  tree = jax.tree.map(jnp.asarray, tunix_gemma3_params(cfg, params))
  nnx.update(module, tree)
  return module


def _tunix(job: dict[str, Any]) -> dict[str, Any]:
  from tunix.generate import sampler as tunix_sampler  # pylint: disable=g-import-not-at-top
  if job["model"] not in _TUNIX_MODELS:
    raise ValueError(f"Tunix side runs {_TUNIX_MODELS} only")
  cfg, params, _ = loading.load(job["model"])
  module = _tunix_model(cfg, params)
  del params
  _reset_peak_rss()
  prompts, instruction = _job_inputs(job)
  batch, prompt_len = prompts.shape
  new = job["max_new_tokens"]
  tokenizer = _IdTokenizer(job["pad_id"])
  lengths = (prompt_len, prompt_len + new + len(instruction))  # Each attempt's prompt.

  def make(prompt_tokens: int):
    cache = tunix_sampler.CacheConfig(cache_size=prompt_tokens + new,
                                      num_layers=cfg.num_layers,
                                      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    return tunix_sampler.Sampler(module, tokenizer, cache)

  samplers = [make(n) for n in lengths]
  if job["greedy"]:
    kwargs = dict(temperature=0.0)
  else:
    kwargs = dict(temperature=1.0, top_p=1.0, top_k=None)
  kwargs.update(max_generation_steps=new, eos_tokens=[_NEVER], echo=False)

  def attempt(k: int, rows: Sequence[np.ndarray], seed) -> np.ndarray:
    out = samplers[k](input_strings=[tokenizer.decode(r) for r in rows],
                      max_prompt_length=lengths[k], seed=seed, **kwargs)
    tokens = np.stack([np.asarray(t) for t in out.tokens])
    if tokens.shape != (batch, new):
      raise AssertionError(f"Tunix returned attempt tokens {tokens.shape}, expected "
                           f"{(batch, new)}")
    return tokens

  def run(i):
    key = jax.random.PRNGKey(i)
    first = attempt(0, prompts, jax.random.fold_in(key, 0))
    context = np.concatenate([prompts, first, np.broadcast_to(instruction, (batch,
                                                                            len(instruction)))],
                             axis=1)
    second = attempt(1, context, jax.random.fold_in(key, 1))
    return np.stack([first, second])

  return {"run": run, "compile_s": _IN_FIRST_RUN}


_FEW_SLOTS = 8  # The profile's second span: the layers' cost without attention's.


def _profile(job: dict[str, Any]) -> dict[str, Any]:
  """Our decode step, its parts timed alone, and this machine's peaks, at each batch."""
  cfg, params, _ = loading.load(job["model"])
  params = jax.device_put(params)
  span = job["buffer_len"]  # Attempt 2's attention span: the whole buffer.
  pos_value = job["prompt_len"] + job["max_new_tokens"]
  method = sampling.Sampling(temperature=1.0)
  out = {"bandwidth": yardsticks.memory_bandwidth(),
         "matmul_flops": yardsticks.matmul_flops_per_s(2048), "span": span, "batches": {}}

  # The decode step as the sampler runs it by default: the layers scanned over their stack.
  def layers(p, tok, pos, cache):
    return model_lib.apply(cfg, p, tok, pos, cache)  # all its slots

  def step(p, tok, pos, cache, key):
    hidden, cache = layers(p, tok, pos, cache)
    return method.choose(model_lib.logits_of(cfg, p, hidden[:, 0]), key)[0], cache

  layers_fn = jax.jit(layers, donate_argnums=3)
  head_fn = jax.jit(lambda p, h: model_lib.logits_of(cfg, p, h))
  choose_fn = jax.jit(lambda logits, key: method.choose(logits, key)[0])
  step_fn = jax.jit(step, donate_argnums=3)
  key = sampler_lib.token_key(jax.random.PRNGKey(0))  # The decode loop's kind of key.
  for batch in job["batches"]:
    tok = jnp.zeros((batch, 1), jnp.int32)
    pos = jnp.full((batch, 1), pos_value, jnp.int32)
    state = {"cache": model_lib.init_cache(cfg, batch, span)}

    def with_cache(fn):
      def call():
        out, state["cache"] = fn(params, tok, pos, state["cache"])
        return out
      return call

    short = {"cache": model_lib.init_cache(cfg, batch, _FEW_SLOTS)}

    def layers_short():  # The same layers attending only a few slots: attention ~free.
      out, short["cache"] = layers_fn(  # pylint: disable=cell-var-from-loop
          params, tok, pos, short["cache"])
      return out

    hidden, state["cache"] = layers_fn(params, tok, pos, state["cache"])
    last = hidden[:, 0]
    logits = head_fn(params, last)
    repeats = job["repeats"]
    out["batches"][batch] = {
        "layers": yardsticks.median_seconds(with_cache(layers_fn), repeats),
        "layers_short": yardsticks.median_seconds(layers_short, repeats),
        "head": yardsticks.median_seconds(
            lambda: head_fn(params, last), repeats),  # pylint: disable=cell-var-from-loop
        "choose": yardsticks.median_seconds(lambda: choose_fn(logits, key), repeats),
        "step": yardsticks.median_seconds(
            with_cache(lambda p, t, q, c: step_fn(p, t, q, c, key)), repeats),
        "flops": yardsticks.decode_step_flops(cfg, batch, span),
        "bytes": yardsticks.decode_step_bytes(cfg, batch, span),
    }
  return out


_SIDES_FNS = {"ours": _ours, "ours_unrolled": functools.partial(_ours, unroll_decode=True),
              "transformers": _transformers, "tunix": _tunix}
_OURS = ("ours", "ours_unrolled")


def _answer(prefix: str, payload: dict[str, Any]) -> None:
  print(prefix + json.dumps(payload), flush=True)


def _with_peaks(result: dict[str, Any]) -> dict[str, Any]:
  return dict(result, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              sampling_peak_rss=_current_peak_rss())


def _worker_main(side: str, job_path: str) -> None:
  """Prepares `side`, makes its warm-up run and answers READY; then runs once per `run` line
  on stdin (answering TIME) until `end`, answered with RESULT (the last run's tokens and the
  process's memory peaks). The profile answers RESULT at once."""
  try:  # On a shared machine, let the kernel's OOM killer pick this process first.
    with open("/proc/self/oom_score_adj", "w") as f:
      f.write("1000")
  except OSError:
    pass
  with open(job_path) as f:
    job = json.load(f)
  if side == "profile":
    _answer(_RESULT, _with_peaks(_profile(job)))
    return
  prepared = _SIDES_FNS[side](job)
  run = prepared.pop("run")
  start = time.perf_counter()
  tokens = run(0)
  _answer(_READY, {"first_s": time.perf_counter() - start})
  runs = 0
  for command in sys.stdin:
    if command.strip() != "run":
      break
    runs += 1
    started_at, start = time.time(), time.perf_counter()
    tokens = run(runs)
    _answer(_TIME, {"seconds": time.perf_counter() - start, "started_at": started_at})
  _answer(_RESULT, _with_peaks(dict(prepared, tokens=np.asarray(tokens).tolist())))


# ---------------------------------------------------------------------------------------------
# The driver.


class _WorkerFailed(Exception):
  pass


class _Worker:
  """One side's process, started with its job and then driven one request at a time."""

  def __init__(self, python: str, side: str, job: dict[str, Any], workdir: str,
               timeout_s: float):
    self._timeout_s = timeout_s
    path = os.path.join(workdir, f"{side}.json")
    with open(path, "w") as f:
      json.dump(job, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # Its stderr (logs) to a file, read back on failure: a pipe nobody reads could fill up.
    self._stderr = open(  # pylint: disable=consider-using-with
        os.path.join(workdir, f"{side}.stderr"), "w+")
    try:
      self._proc = subprocess.Popen(  # pylint: disable=consider-using-with
          [python, os.path.abspath(__file__), f"--worker={side}", f"--job={path}"],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
          env=env)
    except OSError as e:
      self._stderr.close()
      raise _WorkerFailed(f"could not start {python}: {e}") from None
    self._lines = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self._proc.stdout:
      self._lines.put(line)
    self._lines.put(None)  # The process closed its output: it has ended.

  def request(self, command: Optional[str], prefix: str) -> dict[str, Any]:
    """Sends `command` (if any) and waits for the answer line starting with `prefix`."""
    try:
      if command is not None:
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
    except OSError:
      pass  # It has ended; what it wrote says why.
    deadline = time.monotonic() + self._timeout_s
    while True:
      try:
        line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        self.close()
        raise _WorkerFailed(f"no answer within {self._timeout_s} s") from None
      if line is None:
        status = self._proc.wait()
        self._stderr.seek(0)
        tail = "\n    ".join(self._stderr.read().strip().splitlines()[-8:])
        self.close()
        raise _WorkerFailed(f"failed (exit status {status}):\n    {tail}")
      if line.startswith(prefix):
        return json.loads(line[len(prefix):])

  def close(self, kill: bool = True) -> None:
    """Waits for the process to end (killing it first if `kill`)."""
    if kill and self._proc.poll() is None:
      self._proc.kill()
    self._proc.wait()
    self._stderr.close()


def round_order(sides: Sequence[str], round_index: int) -> list[str]:
  """The sides in the order round `round_index` runs them: each round starts one further."""
  k = round_index % len(sides) if sides else 0
  return list(sides[k:]) + list(sides[:k])


def measure(python_of, sides: Sequence[str], job: dict[str, Any], workdir: str, repeats: int,
            timeout_s: float) -> dict[str, dict[str, Any]]:
  """Each side's result ({"compile_s", "first_s", "run_s", "runs_s", "runs_started_at" (wall
  clock), "tokens", peaks, ...}): the sides started one at a time (each ready, i.e. warmed up,
  before the next starts), then `repeats` rounds of one timed run each (`round_order`). A side
  that fails (or takes more than `timeout_s` to answer) is printed and left out.
  `python_of(side)`: the interpreter to run it. With repeats 0: the warm-up run's tokens only."""
  workers, results = {}, {}
  try:
    for side in sides:
      try:
        worker = _Worker(python_of(side), side, job, workdir, timeout_s)
        results[side] = dict(worker.request(None, _READY), runs_s=[], runs_started_at=[])
        workers[side] = worker
      except _WorkerFailed as e:
        print(f"  {side}: {e}", flush=True)
    for r in range(repeats):
      for side in round_order(list(workers), r):
        try:
          timed = workers[side].request("run", _TIME)
          results[side]["runs_s"].append(timed["seconds"])
          results[side]["runs_started_at"].append(timed["started_at"])
        except _WorkerFailed as e:
          del workers[side], results[side]
          print(f"  {side}: {e}", flush=True)
    for side in list(workers):
      worker = workers.pop(side)
      try:
        results[side].update(worker.request("end", _RESULT))
        worker.close(kill=False)
      except _WorkerFailed as e:
        del results[side]
        print(f"  {side}: {e}", flush=True)
  finally:
    for worker in workers.values():
      worker.close()
  for r in results.values():
    if r["runs_s"]:
      r["run_s"] = statistics.median(r["runs_s"])
      if r["compile_s"] == _IN_FIRST_RUN:
        r["compile_s"] = r["first_s"] - r["run_s"]
  return results


def _gb(num_bytes: Optional[float]) -> str:
  return "?" if num_bytes is None else f"{num_bytes / 1e9:.2f} GB"


def _side_line(side: str, r: dict[str, Any], tokens: int) -> str:
  compile_s = r["compile_s"]
  compile_text = ("none (eager)" if compile_s is None else
                  f"{'~' if side == 'tunix' else ''}{compile_s:.1f} s")
  line = (f"  {side:<13} compile {compile_text:<12} first run {r['first_s']:7.2f} s  run "
          f"{r['run_s']:7.2f} s -> {tokens / r['run_s']:7.1f} tokens/s  peak RSS "
          f"{_gb(r['peak_rss'])} (sampling {_gb(r['sampling_peak_rss'])})")
  if "buffers" in r:
    line += (f"\n  {side:<13} XLA buffers: arguments {_gb(r['buffers']['arguments'])}, "
             f"temporaries {_gb(r['buffers']['temporaries'])}")
  return line


def _python_of(side: str) -> str:
  return _TUNIX_PYTHON.value if side == "tunix" else sys.executable


def _sides_for(model: str) -> list[str]:
  sides = [s for s in _SIDES.value if s != "tunix" or _TUNIX_PYTHON.value]
  return [s for s in sides if s != "tunix" or model in _TUNIX_MODELS]


def ratio_lines(results: dict[str, dict[str, Any]], model: str, sides: Sequence[str]
                ) -> list[str]:
  """`ratio ours/transformers: 2.31x` and the like, for each of our `sides` and each peer."""
  lines = []
  for ours in (s for s in _OURS if s in sides):
    for peer in ("transformers", "tunix"):
      name = f"ratio {ours}/{peer}:"
      if peer == "tunix" and model not in _TUNIX_MODELS:
        lines.append(f"{name} {_TUNIX_SKIPPED}")
      elif ours in results and peer in results:
        mine, theirs = results[ours], results[peer]
        line = f"{name} {theirs['run_s'] / mine['run_s']:.2f}x"
        rounds = list(zip(theirs.get("runs_s", []), mine.get("runs_s", [])))
        if len(rounds) > 1:
          line += f" (rounds: {' '.join(f'{t / m:.2f}x' for t, m in rounds)})"
        lines.append(line)
      elif peer in sides:
        lines.append(f"{name} n/a (a side did not run)")
  return lines


def _greedy_check(model: str, base_job: dict[str, Any], workdir: str) -> None:
  job = dict(base_job, prompts=base_job["prompts"][:2], greedy=True,
             max_new_tokens=_GREEDY_TOKENS.value)
  results = measure(_python_of, _sides_for(model), job, workdir, 0, _TIMEOUT.value)
  if "ours" not in results:
    return
  ours = np.asarray(results["ours"]["tokens"])
  parts = [f"ours/{side} {leading_agreement(ours, r['tokens'])}/{ours.size} tokens"
           for side, r in results.items() if side != "ours"]
  print(f"greedy agreement (2 prompts, {_NUM_ATTEMPTS} x {_GREEDY_TOKENS.value} tokens, equal "
        f"before the first difference): {', '.join(parts) or 'no peer ran'}", flush=True)


def _print_profile(p: dict[str, Any], batches: Sequence[int]) -> None:
  print(f"profile of our decode step ({p['span']} attended slots; measured now: read bandwidth "
        f"{p['bandwidth'] / 1e9:.1f} GB/s, float32 2048^3 matmul "
        f"{p['matmul_flops'] / 1e9:.1f} GFLOP/s):")
  for batch in batches:
    b = p["batches"][str(batch)]
    memory_s, compute_s = b["bytes"] / p["bandwidth"], b["flops"] / p["matmul_flops"]
    bound = max(memory_s, compute_s)
    print(f"  batch {batch}: step {b['step'] * 1e3:.1f} ms; alone: layers "
          f"{b['layers'] * 1e3:.1f} ms (attending {_FEW_SLOTS} slots: "
          f"{b['layers_short'] * 1e3:.1f} ms), output head {b['head'] * 1e3:.1f} ms, token choice "
          f"{b['choose'] * 1e3:.1f} ms; floor {bound * 1e3:.1f} ms "
          f"(bytes {b['bytes'] / 1e9:.2f} GB / bandwidth = {memory_s * 1e3:.1f} ms, "
          f"FLOPs {b['flops'] / 1e9:.1f} G / matmul peak = {compute_s * 1e3:.1f} ms): "
          f"floor / step = {bound / b['step']:.0%}", flush=True)


def table(rows: list[tuple[str, int, dict[str, dict[str, Any]]]], tokens_of) -> str:
  """Markdown table of every (model, batch): throughput, ratios, compile time, peak RSS."""
  out = ["| model | batch | tokens/s ours | ours unrolled | transformers | Tunix | "
         "ours/transformers | unrolled/transformers | ours/Tunix | unrolled/Tunix | compile ours "
         "/ unrolled / Tunix (s) | peak RSS ours / unrolled / transformers / Tunix (GB) |",
         "|" + "---|" * 12]
  for model, batch, res in rows:
    def cell(side, fmt, res=res):
      return fmt(res[side]) if side in res else "-"

    def ratio(ours, peer, res=res):
      if peer not in res or ours not in res:
        return "-"
      return f"{res[peer]['run_s'] / res[ours]['run_s']:.2f}x"

    speed = lambda r, batch=batch: f"{tokens_of(batch) / r['run_s']:.1f}"
    memory = " / ".join(cell(s, lambda r: f"{r['peak_rss'] / 1e9:.2f}")
                        for s in (*_OURS, "transformers", "tunix"))
    compile_s = " / ".join([*(cell(s, lambda r: f"{r['compile_s']:.1f}") for s in _OURS),
                            cell("tunix", lambda r: f"~{r['compile_s']:.1f}")])
    ratios = " | ".join(ratio(ours, peer) for peer in ("transformers", "tunix") for ours in _OURS)
    out.append(f"| {model} | {batch} | {' | '.join(cell(s, speed) for s in _OURS)} | "
               f"{cell('transformers', speed)} | {cell('tunix', speed)} | {ratios} | "
               f"{compile_s} | {memory} |")
  return "\n".join(out)


def main(argv):
  del argv
  if _WORKER.value:
    _worker_main(_WORKER.value, _JOB.value)
    return
  batches = [int(b) for b in _BATCHES.value]
  new, prompt_len = _MAX_NEW_TOKENS.value, _PROMPT_LEN.value
  tokens_of = lambda batch: batch * _NUM_ATTEMPTS * new
  print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"jax {jax.__version__} ({jax.default_backend()}); sides {', '.join(_SIDES.value)}; "
        f"Tunix python: {_TUNIX_PYTHON.value or 'none (Tunix skipped)'}", flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for model in _MODELS.value:
      path = loading.shipped_gguf(model)
      vocab = vocab_lib.from_gguf(path)
      fmt = loading.chat_format("auto", model)
      instruction = chat.next_turn_ids(fmt, vocab, tasks.MATH_SELF_CORRECTION)
      prompts = make_prompts(vocab, max(batches + [2]), prompt_len)
      base_job = dict(model=model, instruction=instruction, pad_id=vocab.pad_id,
                      max_new_tokens=new, greedy=False, torch_threads=_TORCH_THREADS.value)
      print(f"\n== {model}: prompts of {prompt_len} tokens, {_NUM_ATTEMPTS} attempts x {new} "
            f"new tokens, instruction of {len(instruction)} tokens ({fmt.name} format), "
            "temperature 1, float32 ==", flush=True)
      if model not in _TUNIX_MODELS and "tunix" in _SIDES.value:
        print(f"Tunix: {_TUNIX_SKIPPED}")
      if _GREEDY_TOKENS.value:
        _greedy_check(model, dict(base_job, prompts=prompts.tolist()), workdir)
      for batch in batches:
        print(f"batch {batch}: {tokens_of(batch)} generated tokens per run, median of "
              f"{_REPEATS.value} runs after a warm-up, the sides' runs alternating",
              flush=True)
        job = dict(base_job, prompts=prompts[:batch].tolist())
        results = measure(_python_of, _sides_for(model), job, workdir, _REPEATS.value,
                          _TIMEOUT.value)
        for side, r in results.items():
          print(_side_line(side, r, tokens_of(batch)), flush=True)
        for line in ratio_lines(results, model, _SIDES.value):
          print(line, flush=True)
        rows.append((model, batch, results))
      if _PROFILE.value:
        job = dict(base_job, batches=batches, prompt_len=prompt_len, repeats=5,
                   buffer_len=sampler_lib.buffer_length(prompt_len, _NUM_ATTEMPTS, new,
                                                        len(instruction)))
        try:
          worker = _Worker(sys.executable, "profile", job, workdir, _TIMEOUT.value)
          _print_profile(worker.request(None, _RESULT), batches)
          worker.close(kill=False)
        except _WorkerFailed as e:
          print(f"  profile: {e}", flush=True)
  print("\n" + table(rows, tokens_of))
  print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  app.run(main)
