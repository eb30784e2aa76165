"""An XLA program's time per operation, from a `jax.profiler` trace (profile_sampler.py)."""

import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from score_jax.decoding import sampler as sampler_lib
from score_jax.decoding import sampling
from score_jax.models import transformer as model_lib


@dataclasses.dataclass
class OpGroup:
  name: str          # "<kind> <result shape> <source op>"
  seconds: float     # total over the profiled call
  calls: int


def _instructions(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> "<kind> <result shape> <source op>" of a compiled program."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name="([^"]*)"', line)
    if m:
      kind = re.sub(r"\.\d+$", "", m.group(1))
      source = re.sub(r"\[\d+\]", "[i]", re.sub(r"^jit\([^)]*\)/", "", m.group(3)))
      out[m.group(1)] = f"{kind} {m.group(2).split('{')[0]} {source}"
  return out


def op_profile(compiled: Any, *args) -> list[OpGroup]:
  """Runs `compiled(*args)` under the profiler; its operations grouped, largest first."""
  names = _instructions(compiled.as_text())
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      jax.block_until_ready(compiled(*args))
    (path,) = glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  seconds, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in names:
      group = names[e["name"]]
      seconds[group] += e.get("dur", 0) / 1e6
      calls[group] += 1
  return [OpGroup(g, s, calls[g]) for g, s in seconds.most_common()]


def compiled_sampler(cfg: model_lib.ModelConfig, batch: int, prompt_len: int,
                     max_new_tokens: int, instruction_len: int):
  """(compiled two-attempt sampler, its arguments): random weights and tokens."""
  params = jax.jit(lambda r: model_lib.init_params(cfg, r))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  high = min(cfg.vocab_size, 1000)
  prompts = jnp.asarray(rng.integers(1, high, (batch, prompt_len)), jnp.int32)
  lengths = jnp.full((batch,), prompt_len, jnp.int32)
  instruction = jnp.asarray(rng.integers(1, high, (instruction_len,)), jnp.int32)
  fn = jax.jit(lambda *a: sampler_lib.sample(
      *a, model_cfg=cfg, method=sampling.Sampling(temperature=1.0), num_attempts=2,
      max_new_tokens=max_new_tokens, eot_id=-1, pad_id=0))
  args = (params, prompts, lengths, instruction, jax.random.PRNGKey(1))
  return fn.lower(*args).compile(), args
