r"""Per-device memory of a run's device programs, planned on a laptop.

    python benchmarks/memory_plan.py --model=gemma2_2b --devices=16 --device_gb=16 \
        --batch=512 --prompt_len=512 --max_new_tokens=1024 [--mesh=fsdp:16] \
        [--topology=v5e:4x4]

compiles, ahead of time, the three programs of an RL step (the Stage II train step, the frozen
reference forward and the two-attempt sampler) for a named model config (`score_jax.models.configs`)
with abstract inputs (`jax.ShapeDtypeStruct`s carrying their `NamedSharding`s from the
logical-axis rules): nothing is allocated, so a multi-billion parameter model plans on a CPU.
For each program it prints the per-device bytes from the compiled program's memory analysis
(arguments, outputs, temporaries; an argument donated to an output is counted once) against
the budget (`--device_gb` minus `--reserve_gb` for the runtime), and exits with status 1 if a
program does not fit.

Two compilers can plan:
* `--topology=v5e:4x4` (or any TPU topology name): the TPU compiler itself, from libtpu
  (`pip install 'libtpu==0.0.42.*'`, the version jax 0.10.2 pins; no TPU needed), compiles
  for that slice's devices: the figures are the TPU's own buffer assignment.
* otherwise `--devices=N` fake CPU devices. The CPU compiler runs bfloat16 matmuls in float32,
  so it adds float32 copies of bfloat16 operands (weights, KV cache) to the temporaries: its
  figures over-estimate an accelerator's for bfloat16 programs.

What is planned is what the trainer runs: the train step of `train_step.make_train_step` with
the Stage II loss (chunked log-probs), micro-batched to `--micro_batch` sequences (default: one
per data-parallel device), float32 master weights and Adam moments, the frozen reference in the
compute dtype, activations in `--dtype` with `--remat` layers; the reference forward
micro-batched alike; the sampler with a `--cache_dtype` KV cache over prompt + K attempts +
instructions, on parameters in the compute dtype, decoding with the layers scanned (as on an
accelerator; on a CPU backend the sampler unrolls them by default).

The CPU compiler's buffer assignment is not a TPU's or a GPU's: take the figures as a plan
(within tens of percent), not as a measurement of the accelerator.
"""

import os
import sys


def _set_device_count(argv) -> None:
  """Fake CPU devices must be requested before jax is imported (not for a TPU topology)."""
  if any(a.startswith("--topology=") for a in argv):
    return
  devices = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "16")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={int(devices)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


_set_device_count(sys.argv)

# The rest imports jax, after the device count is set.
# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import functools
import math
import re
import time
from typing import Iterator

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

from score_jax import partitioning
from score_jax.decoding import sampler as sampler_lib
from score_jax.decoding import sampling
from score_jax.models import configs
from score_jax.models import transformer as model_lib
from score_jax.rl import objectives
from score_jax.rl import train_step as ts
# pylint: enable=g-import-not-at-top,wrong-import-position

_MODEL = flags.DEFINE_string("model", "gemma2_2b", f"Named config: {configs.names()}.")
_DEVICES = flags.DEFINE_integer("devices", 16, "Number of fake CPU devices (without "
                                "--topology).", lower_bound=1)
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU topology to compile for with libtpu, "
                                "e.g. v5e:4x4 (16 chips) or v5p:2x2x2.")
_DEVICE_GB = flags.DEFINE_float("device_gb", 16.0, "Memory of one device, GB (1e9 bytes).")
_RESERVE_GB = flags.DEFINE_float("reserve_gb", 2.0, "Kept free for the runtime, GB.")
_MESH = flags.DEFINE_string("mesh", None, "Mesh sizes, e.g. 'fsdp:16' or 'data:2,fsdp:8'; "
                            "default: fsdp over all devices.")
_BATCH = flags.DEFINE_integer("batch", 512, "Sequences per RL step (prompts x samples).")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 4, "n of the RLOO baseline.")
_MICRO_BATCH = flags.DEFINE_integer("micro_batch", None, "Sequences per micro-batch of the "
                                    "train step and the reference; default: one per "
                                    "data-parallel device (at least samples_per_prompt).")
_SAMPLER_BATCH = flags.DEFINE_integer("sampler_batch", None, "Sequences per sampler call; "
                                      "default: --batch.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 512, "Prompt slots.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 1024, "New tokens per attempt.")
_INSTRUCTION_LEN = flags.DEFINE_integer("instruction_len", 64, "Instruction tokens.")
_NUM_ATTEMPTS = flags.DEFINE_integer("num_attempts", 2, "Attempts per sequence.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
_CACHE_DTYPE = flags.DEFINE_string("cache_dtype", "bfloat16", "KV cache dtype.")
_REMAT = flags.DEFINE_enum("remat", "full", sorted(model_lib.REMAT_POLICIES),
                           "Layer rematerialisation in the train step.")
_CHUNK_LEN = flags.DEFINE_integer("chunk_len", 256, "Positions per log-prob chunk.")
_PROGRAMS = flags.DEFINE_list("programs", ["train_step", "reference", "sampler"],
                              "Which programs to plan.")

GB = 1e9


def parse_mesh(text, devices: int) -> dict[str, int]:
  if not text:
    return {"fsdp": devices}
  sizes = {}
  for part in text.split(","):
    name, _, size = part.partition(":")
    sizes[name.strip()] = int(size)
  return sizes


def _abstract(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


@dataclasses.dataclass
class Plan:
  """One program's per-device bytes."""
  name: str
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  compile_s: float

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries

  def line(self, budget: float) -> str:
    verdict = "fits" if self.total <= budget else "DOES NOT FIT"
    return (f"{self.name:<11} {self.total / GB:6.2f} GB per device ({verdict} in "
            f"{budget / GB:.1f}): arguments {self.arguments / GB:.2f}, outputs "
            f"{self.outputs / GB:.2f} (donated {self.aliased / GB:.2f}), temporaries "
            f"{self.temporaries / GB:.2f}; compiled in {self.compile_s:.0f} s")


def _per_device_bytes(tree) -> int:
  """Bytes of one device's shards of abstract arrays (with shardings)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct))


def _plan(name: str, fn, *args, **kwargs) -> Plan:
  """The memory of `fn` (jitted) compiled for abstract `args`. A TPU compiler refuses a
  program that does not fit its device, naming the temporaries it needed: that is the plan
  then (outputs unknown, counted as 0)."""
  start = time.perf_counter()
  try:
    stats = fn.lower(*args, **kwargs).compile().memory_analysis()
  except jax.errors.JaxRuntimeError as e:
    needed = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
    if needed is None:
      raise
    return Plan(name, _per_device_bytes(args), 0, 0, int(float(needed.group(1)) * 2**30),
                time.perf_counter() - start)
  return Plan(name, stats.argument_size_in_bytes, stats.output_size_in_bytes,
              stats.alias_size_in_bytes, stats.temp_size_in_bytes,
              time.perf_counter() - start)


def plan_programs(model_cfg: model_lib.ModelConfig, mesh, *, batch: int, samples: int,
                  micro_batch: int, sampler_batch: int, prompt_len: int,
                  max_new_tokens: int, instruction_len: int, num_attempts: int,
                  cache_dtype, chunk_len: int, programs) -> Iterator[Plan]:
  """Compiles the selected programs for abstract inputs on `mesh`; yields their plans."""
  rules = partitioning.DEFAULT_RULES
  total_len = sampler_lib.buffer_length(prompt_len, num_attempts, max_new_tokens,
                                        instruction_len)
  method = sampling.Sampling(1.0)
  param_sh = partitioning.model_param_shardings(model_cfg, mesh, rules)
  master = jax.eval_shape(functools.partial(model_lib.init_params, model_cfg),
                          jax.random.PRNGKey(0))
  compute = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, model_cfg.dtype), master)
  if batch % micro_batch or micro_batch % samples:
    raise ValueError(f"micro_batch={micro_batch} must divide batch={batch} and be a multiple "
                     f"of samples_per_prompt={samples}")
  num_micro = batch // micro_batch
  with partitioning.with_mesh_and_rules(mesh, rules):
    if "train_step" in programs:
      optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6))
      state_shapes = jax.eval_shape(lambda p, r: ts.init_state(p, optimizer, r), master,
                                    compute)
      state_sh = ts.TrainState(
          step=partitioning.batch_sharding(mesh, 0), params=param_sh,
          opt_state=partitioning.opt_state_shardings(state_shapes.opt_state, param_sh, mesh),
          ref_params=param_sh)
      seq = jax.ShapeDtypeStruct((batch, total_len), jnp.int32)
      batch_shapes = {"tokens": seq, "attempt": seq,
                      "rewards": jax.ShapeDtypeStruct((batch, num_attempts), jnp.float32),
                      "ref_logp": jax.ShapeDtypeStruct((batch, total_len - 1), jnp.float32)}
      batch_sh = partitioning.data_sharding(batch_shapes, mesh)
      objective = objectives.ObjectiveConfig(kind="stage2", n=samples)
      loss_fn = functools.partial(ts.policy_loss, model_cfg=model_cfg, objective=objective,
                                  method=method, chunk_len=chunk_len)
      step = jax.jit(ts.make_train_step(loss_fn, optimizer, num_micro, samples),
                     in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                     donate_argnums=0)
      yield _plan("train_step", step, _abstract(state_shapes, state_sh),
                  _abstract(batch_shapes, batch_sh))
    if "reference" in programs:
      tokens = jax.ShapeDtypeStruct((batch, total_len), jnp.int32,
                                    sharding=partitioning.batch_sharding(mesh, 2))
      reference = jax.jit(functools.partial(
          ts.reference_logprobs, model_cfg=model_cfg, method=method, chunk_len=chunk_len,
          num_micro_batches=num_micro))
      yield _plan("reference", reference, _abstract(compute, param_sh), tokens)
    if "sampler" in programs:
      sampler = sampler_lib.Sampler(
          model_cfg, num_attempts=num_attempts, max_new_tokens=max_new_tokens,
          max_prompt_len=prompt_len, instruction=[1] * instruction_len, eot_id=1, pad_id=0,
          mesh=mesh, cache_dtype=cache_dtype, unroll_decode=False)  # as on accelerators
      yield _plan("sampler", sampler, _abstract(compute, param_sh), sampler_batch, method)


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  model_cfg = configs.get(_MODEL.value, dtype=dtype, param_dtype=jnp.float32,
                          remat=_REMAT.value)
  if _TOPOLOGY.value:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    devices = topologies.get_topology_desc(topology_name=_TOPOLOGY.value,
                                           platform="tpu").devices
  else:
    devices = jax.devices()
  mesh = partitioning.make_mesh(parse_mesh(_MESH.value, len(devices)), devices=devices)
  parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  micro_batch = _MICRO_BATCH.value or max(parallel, _SAMPLES.value)
  budget = (_DEVICE_GB.value - _RESERVE_GB.value) * GB
  total_len = sampler_lib.buffer_length(_PROMPT_LEN.value, _NUM_ATTEMPTS.value, _MAX_NEW.value,
                                        _INSTRUCTION_LEN.value)
  target = (f"TPU {_TOPOLOGY.value} ({len(devices)} chips, libtpu compiler)" if _TOPOLOGY.value
            else f"{len(devices)} CPU devices (CPU compiler)")
  print(f"{_MODEL.value} on {target}: {model_cfg.num_params() / 1e9:.2f}B parameters, "
        f"{dtype.name} "
        f"compute, float32 master weights, remat {_REMAT.value}; mesh {dict(mesh.shape)}; "
        f"batch {_BATCH.value} sequences of {total_len} slots (prompt {_PROMPT_LEN.value} + "
        f"{_NUM_ATTEMPTS.value} x {_MAX_NEW.value} new + instruction "
        f"{_INSTRUCTION_LEN.value}), micro-batches of {micro_batch}, sampler calls of "
        f"{_SAMPLER_BATCH.value or _BATCH.value}, {_CACHE_DTYPE.value} KV cache; budget "
        f"{budget / GB:.1f} GB per device", flush=True)
  fits = True
  for plan in plan_programs(
      model_cfg, mesh, batch=_BATCH.value, samples=_SAMPLES.value, micro_batch=micro_batch,
      sampler_batch=_SAMPLER_BATCH.value or _BATCH.value, prompt_len=_PROMPT_LEN.value,
      max_new_tokens=_MAX_NEW.value, instruction_len=_INSTRUCTION_LEN.value,
      num_attempts=_NUM_ATTEMPTS.value, cache_dtype=jnp.dtype(_CACHE_DTYPE.value),
      chunk_len=_CHUNK_LEN.value, programs=_PROGRAMS.value):
    print(plan.line(budget), flush=True)
    fits &= plan.total <= budget
  if not fits:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
