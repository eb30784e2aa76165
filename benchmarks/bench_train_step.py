"""Stage II train step throughput: achieved model FLOP/s next to a plain matmul's, same run.

    make bench-train-step     # or:
    .venv/bin/python benchmarks/bench_train_step.py [--model=smollm2_135m] [--batch=16] \\
        [--seq_len=512] [--num_micro_batches=4] [--remat=none|full|save_dots] \\
        [--dtype=float32|bfloat16] [--chunk_len=256] [--repeats=3] [--op_profile=25]
    .venv/bin/python benchmarks/bench_train_step.py --breakdown [--breakdown_steps=4]

Default mode. One jitted Stage II train step (`train_step.policy_loss` with the SCoRe Stage II
objective: forward, log-probs under the sampling distribution, loss, gradient, clipped AdamW
update, state donated) on a synthetic batch of `batch` conversations of `seq_len` tokens:
random token ids, a prompt, attempt 1, an instruction and attempt 2 marked in `attempt`,
random 0/1 rewards, `samples_per_prompt` rows per prompt (the RLOO groups), and reference
log-probs from the jitted `train_step.reference_logprobs` (timed too: the forward alone).
Parameters are float32 master weights; `--dtype` is the compute dtype.

Reported: compile time; step time (median of `repeats` after a warm-up); achieved model
FLOP/s = model FLOPs / step time with

    model FLOPs = 6 * P * B * T + 12 * L * H * d_head * c * T^2 * B

(P: weights in matmuls, the tied embedding once as the output head; L layers, H query heads
of d_head; see yardsticks.py: the attention term is the score and mix matmuls, 2 * 2 * c *
T^2 * H * d_head per layer and sequence forward, twice that backward, over the part c of the
T x T square the model computes: its causal query blocks, c = 5/8 at T = 512); and a
float32 2048^3 and 4096^3 `jnp.dot`'s FLOP/s measured in the same process before and after
the steps (median of repeats; the best of the two times is taken, as
other work on a shared machine can only slow a measurement). The step's fraction is of the
larger matmul figure. Remat and the chunked log-probs' recomputation are real work that this
count leaves out (it is model FLOPs, not hardware FLOPs). `--op_profile=N` then runs one more
step under `jax.profiler` and prints its N largest groups of XLA operations (dots, fusions,
copies, by kind, result shape and source op): where the step's time goes when it falls short.

--breakdown. A few real Stage II steps of the trainer (`python -m score_jax.main`, SmolLM2 +
GSM8K, 2 prompts x 2 samples, 2 x 32 new tokens, from the base model, prompts padded to 320
tokens: `prompt_bucket` None, so that every step has the shapes timed alone) in a temporary
work dir; the mean over the steps after the first (which compiles) of its metrics.jsonl times:
sample_s, reward_wait_s, reward_s, step_time_s. The trainer dispatches the reference forward before
waiting for the rewards and does not time it, nor the train step alone; both are timed here
alone on a batch of the same shape.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

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
from score_jax.rl import objectives
from score_jax.rl import train_step as ts
from score_jax.rl import trainer

import op_profile  # benchmarks/op_profile.py, next to this file.
import yardsticks  # benchmarks/yardsticks.py, next to this file.

_MODEL = flags.DEFINE_enum("model", "smollm2_135m", ["smollm2_135m", "gemma3_270m"],
                           "Shipped model to train.")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per step.", lower_bound=1)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.", lower_bound=8)
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 4, "Rows per prompt (RLOO group).",
                                lower_bound=1)
_MICRO = flags.DEFINE_integer("num_micro_batches", 4, "Micro-batches per step (gradients "
                             "summed over them; less activation memory).", lower_bound=1)
_REMAT = flags.DEFINE_enum("remat", "none", sorted(model_lib.REMAT_POLICIES),
                           "Rematerialisation of the scanned layers.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_CHUNK_LEN = flags.DEFINE_integer("chunk_len", None, "Positions per log-prob chunk; default: "
                                  "logprobs.DEFAULT_CHUNK_LEN.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps (after one warm-up).", lower_bound=1)
_MATMUL_REPEATS = flags.DEFINE_integer("matmul_repeats", 5, "Timed runs of each matmul.",
                                       lower_bound=1)
_OP_PROFILE = flags.DEFINE_integer(
    "op_profile", 0, "N > 0: after the timed steps, profile one more step (jax.profiler) and "
    "print its N largest groups of XLA operations (op_profile.py).", lower_bound=0)
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Per-step time breakdown of real RL steps.")
_BREAKDOWN_STEPS = flags.DEFINE_integer("breakdown_steps", 4, "Trainer steps to run.",
                                        lower_bound=2)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_METHOD = sampling.Sampling(temperature=1.0)
# The breakdown's trainer settings (tiny, for a CPU).
_BD_PROMPTS, _BD_SAMPLES, _BD_NEW_TOKENS, _BD_PROMPT_LEN = 2, 2, 32, 320


def synthetic_batch(vocab_size: int, batch: int, seq_len: int, samples_per_prompt: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A two-attempt training batch: random ids; per row a prompt (1/4 of the slots), attempt 1
  (3/8), an instruction (1/16) and attempt 2 (the rest, ending 1/16 before the end: padding);
  random 0/1 rewards [B, 2]. Rows of one prompt are contiguous groups of `samples_per_prompt`."""
  if batch % samples_per_prompt:
    raise ValueError(f"batch {batch} is not a multiple of samples_per_prompt "
                     f"{samples_per_prompt}")
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, (batch, seq_len), dtype=np.int32)
  bounds = np.cumsum([seq_len // 4, 3 * seq_len // 8, seq_len // 16])
  end = seq_len - seq_len // 16
  slots = np.arange(seq_len)
  attempt = np.where(slots < bounds[0], 0, np.where(slots < bounds[1], 1, np.where(
      slots < bounds[2], 0, np.where(slots < end, 2, 0))))
  return {"tokens": tokens, "attempt": np.broadcast_to(attempt, (batch, seq_len)).astype(
              np.int32),
          "rewards": rng.integers(0, 2, (batch, 2)).astype(np.float32)}


def _matmul_peaks() -> dict[int, float]:
  return {n: yardsticks.matmul_flops_per_s(n, _MATMUL_REPEATS.value) for n in (2048, 4096)}


def _step_setup(cfg: model_lib.ModelConfig, params: Any, batch: dict[str, np.ndarray],
                num_micro_batches: int, chunk_len, samples_per_prompt: int):
  """(the jitted train step, the initial state, the device batch with ref_logp, the jitted
  reference function)."""
  optimizer = trainer.make_optimizer(trainer.RunConfig(learning_rate=1e-6))
  objective = objectives.ObjectiveConfig(kind="stage2", n=samples_per_prompt)
  loss_fn = functools.partial(ts.policy_loss, model_cfg=cfg, objective=objective,
                              method=_METHOD, chunk_len=chunk_len)
  step = jax.jit(ts.make_train_step(loss_fn, optimizer, num_micro_batches), donate_argnums=0)
  reference = jax.jit(functools.partial(ts.reference_logprobs, model_cfg=cfg, method=_METHOD,
                                        chunk_len=chunk_len))
  params = jax.device_put(params)
  state = jax.jit(lambda p: ts.init_state(p, optimizer, p))(params)
  device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
  device_batch["ref_logp"] = reference(state.ref_params, device_batch["tokens"])
  return step, state, device_batch, reference


def _time_steps(step, state, batch, repeats: int
                ) -> tuple[float, float, list[float], Any, Any]:
  """(compile s, median step s, step times, the compiled step, the last state) of `repeats`
  steps after one warm-up step."""
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  if not np.isfinite(float(metrics["loss"])):
    raise AssertionError(f"the train step's loss is {float(metrics['loss'])}")
  return compile_s, float(np.median(times)), times, compiled, state


def _throughput() -> None:
  cfg, params, _ = loading.load(_MODEL.value)
  cfg = dataclasses.replace(cfg, dtype=jnp.dtype(_DTYPE.value).type, param_dtype=jnp.float32,
                            remat=_REMAT.value)
  batch_size, seq_len = _BATCH.value, _SEQ_LEN.value
  if (batch_size // _MICRO.value) % _SAMPLES.value or batch_size % _MICRO.value:
    raise app.UsageError(f"batch {batch_size} must split into {_MICRO.value} micro-batches of "
                         f"whole groups of {_SAMPLES.value} rows")
  flops = yardsticks.train_flops(cfg, batch_size, seq_len)
  attention = 3 * batch_size * yardsticks.self_attention_flops(cfg, seq_len)
  print(f"{_MODEL.value}: {cfg.num_params() / 1e6:.1f}M parameters, "
        f"{yardsticks.matmul_params(cfg) / 1e6:.1f}M in matmuls; batch {batch_size} x "
        f"{seq_len} tokens, {_SAMPLES.value} samples per prompt, {_MICRO.value} micro-batch(es), "
        f"remat {_REMAT.value}, compute {_DTYPE.value} (float32 master weights), log-prob "
        f"chunk {_CHUNK_LEN.value or 'default'}; {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, jax {jax.__version__} "
        f"({jax.default_backend()})", flush=True)
  print(f"model FLOPs per step: {flops / 1e12:.3f} T (attention {attention / 1e12:.3f} T)",
        flush=True)
  before = _matmul_peaks()
  print("matmul before: " + ", ".join(f"{n}^3 {v / 1e9:.1f} GFLOP/s" for n, v in before.items()),
        flush=True)
  step, state, batch, reference = _step_setup(
      cfg, params, synthetic_batch(cfg.vocab_size, batch_size, seq_len, _SAMPLES.value),
      _MICRO.value, _CHUNK_LEN.value, _SAMPLES.value)
  del params
  ref_s = yardsticks.median_seconds(lambda: reference(state.ref_params, batch["tokens"]),
                                    _REPEATS.value)
  ref_flops = flops // 3
  print(f"reference forward: {ref_s:.2f} s -> {ref_flops / ref_s / 1e9:.1f} GFLOP/s",
        flush=True)
  compile_s, step_s, times, compiled, state = _time_steps(step, state, batch, _REPEATS.value)
  after = _matmul_peaks()
  print("matmul after:  " + ", ".join(f"{n}^3 {v / 1e9:.1f} GFLOP/s" for n, v in after.items()),
        flush=True)
  peak = {n: max(before[n], after[n]) for n in before}
  best = max(peak.values())
  achieved = flops / step_s
  print(f"train step: compile {compile_s:.1f} s, step {step_s:.2f} s (median of "
        f"{_REPEATS.value}: {', '.join(f'{t:.2f}' for t in times)}) -> "
        f"{batch_size * seq_len / step_s:.0f} tokens/s")
  print(f"achieved model FLOP/s: {achieved / 1e9:.1f} G = {achieved / best:.0%} of the larger "
        f"matmul figure ({best / 1e9:.1f} GFLOP/s; 2048^3 {peak[2048] / 1e9:.1f}, 4096^3 "
        f"{peak[4096] / 1e9:.1f})")
  if _OP_PROFILE.value:
    groups = op_profile.op_profile(compiled, state, batch)
    print(f"one step under the profiler, its {_OP_PROFILE.value} largest groups of operations "
          "(seconds, calls, kind, result shape, source op):")
    for g in groups[:_OP_PROFILE.value]:
      print(f"  {g.seconds:7.3f} s  x{g.calls:<4d} {g.name[:140]}")
    print(f"  sum of all operations {sum(g.seconds for g in groups):.2f} s (they overlap on "
          f"the cores); the step took {step_s:.2f} s unprofiled")
  print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def _trainer_metrics(workdir: str, steps: int) -> list[dict[str, Any]]:
  args = ["--gin_file=stage2.gin", "--gin_file=tasks/gsm8k.gin",
          "--gin_file=models/smollm2_135m.gin", f"--gin.WORKDIR='{workdir}'",
          "--gin.WITHOUT_STAGE1=True", "--gin.RunConfig.prompt_bucket=None",
          f"--gin.stage2/RunConfig.steps={steps}",
          f"--gin.RunConfig.batch_prompts={_BD_PROMPTS}",
          f"--gin.RunConfig.samples_per_prompt={_BD_SAMPLES}",
          f"--gin.RunConfig.max_new_tokens={_BD_NEW_TOKENS}",
          f"--gin.RunConfig.max_prompt_len={_BD_PROMPT_LEN}",
          "--gin.RunConfig.checkpoint_every=1000", "--gin.RunConfig.reward_workers=1",
          "--gin.RunConfig.log_every=1"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  proc = subprocess.run([sys.executable, "-m", "score_jax.main", *args], cwd=_ROOT, env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"the trainer failed:\n{proc.stderr[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _breakdown() -> None:
  steps = _BREAKDOWN_STEPS.value
  print(f"Stage II on smollm2_135m + GSM8K: {steps} trainer steps, {_BD_PROMPTS} prompts x "
        f"{_BD_SAMPLES} samples, 2 attempts x {_BD_NEW_TOKENS} new tokens, prompts padded to "
        f"{_BD_PROMPT_LEN}; {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
  with tempfile.TemporaryDirectory() as workdir:
    metrics = _trainer_metrics(workdir, steps)
  later = metrics[1:]
  mean = lambda key: float(np.mean([m[key] for m in later]))
  step_s, sample_s, wait_s = mean("step_time_s"), mean("sample_s"), mean("reward_wait_s")
  print(f"trainer metrics, mean of steps 2..{steps} (step 1, which compiles: "
        f"{metrics[0]['step_time_s']:.1f} s):")
  print(f"  step_time_s    {step_s:7.2f} s")
  print(f"  sample_s       {sample_s:7.2f} s  (both attempts, on the device)")
  print(f"  reward_wait_s  {wait_s:7.2f} s  (host still checking answers after the reference "
        f"forward was dispatched; reward_s {mean('reward_s'):.2f} s of checking in all)")
  print(f"  the rest       {step_s - sample_s - wait_s:7.2f} s  (train step, whatever of the "
        "reference forward the reward wait did not hide, host work)")

  # The same shapes alone: B rows of the sampler's buffer length.
  cfg, params, vocab = loading.load("smollm2_135m")
  task = tasks.make_task("gsm8k")
  instruction = chat.next_turn_ids(loading.chat_format("auto", "smollm2_135m"), vocab,
                                   task.self_correction_instruction)
  seq_len = sampler_lib.buffer_length(_BD_PROMPT_LEN, 2, _BD_NEW_TOKENS, len(instruction))
  rows = _BD_PROMPTS * _BD_SAMPLES
  step, state, batch, reference = _step_setup(
      cfg, params, synthetic_batch(cfg.vocab_size, rows, seq_len, _BD_SAMPLES), 1, None,
      _BD_SAMPLES)
  del params
  ref_s = yardsticks.median_seconds(lambda: reference(state.ref_params, batch["tokens"]), 3)
  train_s = _time_steps(step, state, batch, 3)[1]
  print(f"timed alone here on {rows} x {seq_len} tokens (the trainer's shapes):")
  print(f"  reference forward {ref_s:7.2f} s")
  print(f"  train step        {train_s:7.2f} s")
  print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _BREAKDOWN.value:
    _breakdown()
  else:
    _throughput()


if __name__ == "__main__":
  app.run(main)
