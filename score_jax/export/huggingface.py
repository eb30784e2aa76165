r"""Hugging Face export: a model as a directory that transformers and vLLM load as they are.

    python -m score_jax.export.huggingface --model=RUN_OR_SOURCE --out=DIR \
        [--dtype=bfloat16|float32] [--max_shard_gb=5] [--chat_format=auto|gemma|chatml|plain] \
        [--overwrite]

RUN_OR_SOURCE is a trainer work dir (its WORKDIR/export is read), an export dir, or any
source `loading.load` accepts (a shipped name such as smollm2_135m or gemma3_270m, a GGUF
file, a Hugging Face directory). DIR receives

  config.json                  the family's transformers config: LlamaForCausalLM (SmolLM2,
                               Llama), Qwen2ForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM,
                               Gemma2ForCausalLM or Gemma3ForCausalLM (model_type gemma3_text);
                               written last, so a directory with it is complete
  model.safetensors            the weights, or model-0000i-of-0000n.safetensors and
                               model.safetensors.index.json above --max_shard_gb
  generation_config.json       BOS, EOS (with the end-of-turn token) and padding ids
  tokenizer.json               the vocabulary as a `tokenizers` tokenizer (vocab.to_tokenizers)
  tokenizer_config.json        special tokens and the chat template: --chat_format=auto, the
                               source's own (GGUF metadata, a Hugging Face tokenizer_config.json
                               or chat_template.jinja), else chat.py's plain format; gemma,
                               chatml or plain: chat.py's format of that name

Weights are written in Hugging Face's layout, the inverse of what `loading` does when it reads
one: [out, in] matrices with heads flattened, flat biases, no lm_head when embeddings are tied.
Gemma norm scales need nothing (transformers stores them as we do, scale with x * (1 + scale));
llama.cpp's q/k row order and 1 + scale norms were undone when the GGUF was read. Tensors are
converted and written one at a time (one layer's slice of the stacked arrays), so the model is
in host memory once. A config that the family's transformers model cannot run exactly (e.g. a
sliding window on Llama) is refused: config.json must read back as the same ModelConfig.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import struct
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from score_jax.models import chat
from score_jax.models import gguf_file
from score_jax.models import loading
from score_jax.models import vocab as vocab_lib
from score_jax.models.transformer import ModelConfig

Params = Any

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_DTYPES = {"float32": "F32", "bfloat16": "BF16"}  # numpy name -> safetensors name
_INDEX = "model.safetensors.index.json"


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# config.json and generation_config.json.


def _model_type(cfg: ModelConfig) -> str:
  """The transformers model_type whose model has `cfg`'s family switches."""
  if cfg.norm_plus_one:
    return "gemma3_text" if cfg.qk_norm else "gemma2" if cfg.post_norms else "gemma"
  return "qwen2" if cfg.qkv_bias else "qwen3" if cfg.qk_norm else "llama"


def _rope_scaling(cfg: ModelConfig) -> Optional[dict[str, Any]]:
  """transformers' rope_scaling of the global layers (one kind at most)."""
  if cfg.llama3_rope is not None:
    factor, low, high, original = cfg.llama3_rope
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}
  if cfg.rope_scale != 1.0:
    return {"rope_type": "linear", "factor": cfg.rope_scale}
  return None


def hf_config(cfg: ModelConfig, special_ids: dict[str, Any], dtype: Any,
              max_position_embeddings: Optional[int] = None) -> dict[str, Any]:
  """config.json of `cfg` (transformers 4 field names, which transformers 5 reads too).

  Args:
    cfg: the architecture.
    special_ids: bos_token_id, eos_token_id (an id or a list), pad_token_id.
    dtype: the weights' dtype (numpy or jax).
    max_position_embeddings: the context length; None leaves the family's default.
  Raises:
    ValueError: when the family's transformers model would not compute what
      models/transformer.py does.
  """
  kind = _model_type(cfg)
  act = "silu" if cfg.activation == "silu" else "gelu_pytorch_tanh"
  hf = dict(
      architectures=[_ARCHITECTURES[kind]], model_type=kind, vocab_size=cfg.vocab_size,
      hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_base,
      torch_dtype=np.dtype(dtype).name, **special_ids)
  hf["hidden_activation" if kind.startswith("gemma") else "hidden_act"] = act
  if _rope_scaling(cfg) is not None:
    hf["rope_scaling"] = _rope_scaling(cfg)
  if max_position_embeddings is not None:
    hf["max_position_embeddings"] = max_position_embeddings
  if kind in ("gemma2", "gemma3_text"):
    hf.update(sliding_window=cfg.sliding_window,
              query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
              attn_logit_softcapping=cfg.attn_logit_softcap,
              final_logit_softcapping=cfg.final_logit_softcap,
              layer_types=["full_attention" if cfg.is_global(i) else "sliding_attention"
                           for i in range(cfg.num_layers)])
  if kind == "gemma3_text":
    hf.update(rope_local_base_freq=cfg.rope_local_base or cfg.rope_base,
              sliding_window_pattern=cfg.global_every)
  ours = dataclasses.replace(cfg, dtype=jnp.float32, param_dtype=jnp.float32, remat="none")
  read_back = loading.config_from_hf(hf)
  differ = [f"{f.name}={getattr(ours, f.name)!r} (as {kind}: {getattr(read_back, f.name)!r})"
            for f in dataclasses.fields(ours)
            if getattr(ours, f.name) != getattr(read_back, f.name)]
  if differ:
    raise ValueError(f"the model has no Hugging Face equivalent: {', '.join(differ)}")
  return hf


def special_token_ids(vocab: vocab_lib.Vocabulary) -> dict[str, Any]:
  """bos/eos/pad ids for config.json and generation_config.json; EOS lists the end-of-turn
  token too, so generation stops at the end of a chat answer."""
  eos = vocab.eos_id if vocab.eot_id == vocab.eos_id else [vocab.eos_id, vocab.eot_id]
  return dict(bos_token_id=vocab.bos_id, eos_token_id=eos, pad_token_id=vocab.pad_id)


# ---------------------------------------------------------------------------------------------
# Weights.


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One Hugging Face tensor: its name, shape and a function computing it (numpy)."""
  name: str
  shape: tuple[int, ...]
  make: Callable[[], np.ndarray]


def _hf_shape(keys: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The Hugging Face shape of our parameter `keys` of `shape`: [out, in] matrices (q/k/v:
  out = heads * head_dim; o: in = heads * head_dim), flat vectors, the embedding as it is."""
  if len(shape) == 1 or keys[-1].endswith("_bias"):
    return (math.prod(shape),)
  if keys == ("embedding",):
    return shape
  out_axes = 2 if keys[-1] in ("q", "k", "v") else 1
  return (math.prod(shape[-out_axes:]), math.prod(shape[:-out_axes]))


def _to_hf(keys: tuple[str, ...], w: np.ndarray, dtype: Any) -> np.ndarray:
  """Our parameter `w` of `keys` in Hugging Face layout (`_hf_shape`) and `dtype`."""
  shape = _hf_shape(keys, w.shape)
  w = w.reshape(shape[::-1]).T if len(shape) == 2 and keys != ("embedding",) else w.reshape(shape)
  return np.ascontiguousarray(w, dtype=dtype)


def hf_tensors(cfg: ModelConfig, params: Params, dtype: Any) -> list[Tensor]:
  """Every tensor of the Hugging Face checkpoint of `params`, in file order: the embedding,
  layer by layer, then the final norm and the output head. Nothing is computed yet."""
  top, layer = [], []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = tuple(k.key for k in path)
    (layer if keys[0] == "layers" else top).append((keys, leaf))

  def tensor(keys, w, i=None):
    return Tensor(loading.hf_tensor_name(cfg, keys, i),
                  _hf_shape(keys, w.shape[1:] if i is not None else w.shape),
                  lambda: _to_hf(keys, w[i] if i is not None else w, dtype))

  top.sort(key=lambda item: item[0] != ("embedding",))
  return ([tensor(*top[0])]
          + [tensor(keys, w, i) for i in range(cfg.num_layers) for keys, w in layer]
          + [tensor(keys, w) for keys, w in top[1:]])


def _shards(tensors: list[Tensor], itemsize: int, max_bytes: int) -> list[list[Tensor]]:
  """`tensors` in order, cut into groups of at most `max_bytes` (a bigger tensor alone)."""
  shards, size = [[]], 0
  for t in tensors:
    nbytes = math.prod(t.shape) * itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  return shards


def _write_safetensors(path: str, tensors: list[Tensor], dtype: Any) -> None:
  """Writes a .safetensors file, computing and writing one tensor at a time.

  The format: an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
  byte range in the data), then the data, each tensor C-contiguous and little-endian.
  """
  dtype = np.dtype(dtype)
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for t in tensors:
    end = offset + math.prod(t.shape) * dtype.itemsize
    header[t.name] = {"dtype": _DTYPES[dtype.name], "shape": list(t.shape),
                      "data_offsets": [offset, end]}
    offset = end
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # The data starts 8-byte aligned.
  with open(path + ".tmp", "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for t in tensors:
      w = t.make()
      if w.shape != t.shape or w.dtype != dtype:
        raise AssertionError(f"{t.name}: made {w.dtype} {w.shape}, declared {dtype} {t.shape}")
      f.write(w.astype(w.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8).data)
  os.replace(path + ".tmp", path)


def write_weights(directory: str, tensors: list[Tensor], dtype: Any,
                  max_shard_bytes: int) -> list[str]:
  """Writes `tensors` as model.safetensors, or as shards with model.safetensors.index.json
  when they are more than `max_shard_bytes`. Returns the file names written."""
  itemsize = np.dtype(dtype).itemsize
  shards = _shards(tensors, itemsize, max_shard_bytes)
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards):
    _write_safetensors(os.path.join(directory, name), shard, dtype)
    gb = sum(math.prod(t.shape) for t in shard) * itemsize / 1e9
    _log(f"  wrote {name} ({len(shard)} tensors, {gb:.2f} GB)")
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(math.prod(t.shape) for t in tensors) * itemsize},
             "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
    _write_json(os.path.join(directory, _INDEX), index)
    names.append(_INDEX)
  return names


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
    f.write("\n")


def write_model(directory: str, cfg: ModelConfig, params: Params, special_ids: dict[str, Any],
                dtype: Any = jnp.bfloat16, max_shard_bytes: int = 5 * 10**9,
                max_position_embeddings: Optional[int] = None) -> None:
  """Writes the weights, generation_config.json and (last) config.json of a model.

  Args:
    directory: an existing directory.
    cfg: the architecture of `params`.
    params: our parameter tree (numpy or jax arrays; layers stacked).
    special_ids: see `hf_config`.
    dtype: the weights' dtype, float32 or bfloat16.
    max_shard_bytes: the size above which the weights are sharded.
    max_position_embeddings: the context length written to config.json, when known.
  """
  dtype = np.dtype(dtype)
  if dtype.name not in _DTYPES:
    raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype.name}")
  config = hf_config(cfg, special_ids, dtype, max_position_embeddings)
  write_weights(directory, hf_tensors(cfg, params, dtype), dtype, max_shard_bytes)
  _write_json(os.path.join(directory, "generation_config.json"),
              special_ids)
  _write_json(os.path.join(directory, "config.json"), config)


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def chat_template(origin: str, chat_format: str, bos: bool) -> str:
  """The chat template to write. For "auto": the source's own (`origin`'s, see
  `source_template`), or when it has none chat.py's plain format; for "gemma", "chatml" or
  "plain": that format of chat.py (`bos`: whether the model takes BOS)."""
  if chat_format == "auto":
    template = source_template(origin)
    if template is not None:
      return template
    chat_format = "plain"
  return chat.jinja_template(chat.get_format(chat_format), bos)


def source_template(origin: str) -> Optional[str]:
  """The chat template written in a GGUF's metadata or beside a Hugging Face tokenizer."""
  if loading.gguf_path(origin) is not None:
    key = "tokenizer.chat_template"
    return gguf_file.read_metadata(origin, {key}).get(key)
  directory = origin if os.path.isdir(origin) else os.path.dirname(origin)
  jinja = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja):
    with open(jinja) as f:
      return f.read()
  config = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(config):
    with open(config) as f:
      template = json.load(f).get("chat_template")
    if isinstance(template, str):
      return template
  return None


def context_length(origin: str) -> Optional[int]:
  """The context length a GGUF's metadata or a Hugging Face config.json states, or None."""
  if loading.gguf_path(origin) is not None:
    arch = gguf_file.read_metadata(origin, {"general.architecture"})["general.architecture"]
    key = f"{arch}.context_length"
    return gguf_file.read_metadata(origin, {key}).get(key)
  directory = origin if os.path.isdir(origin) else os.path.dirname(origin)
  config = os.path.join(directory, "config.json")
  if not os.path.isfile(config):
    return None
  with open(config) as f:
    hf = json.load(f)
  return hf.get("max_position_embeddings", (hf.get("text_config") or {}).get(
      "max_position_embeddings"))


def write_tokenizer(directory: str, vocab: vocab_lib.Vocabulary,
                    template: Optional[str] = None, max_length: Optional[int] = None) -> None:
  """Writes tokenizer.json and tokenizer_config.json for `AutoTokenizer.from_pretrained`.

  The tokenizer encodes as `vocab` does, with BOS first when the model takes one; `template`
  is the chat template, `max_length` the context length.
  """
  tokenizer = vocab_lib.to_tokenizers(vocab)
  tokenizer.save(os.path.join(directory, "tokenizer.json"))
  token = lambda i: None if i is None else tokenizer.id_to_token(i)
  config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=token(vocab.bos_id),
                eos_token=token(vocab.eos_id), pad_token=token(vocab.pad_id),
                add_bos_token=vocab.bos_id is not None, add_eos_token=False,
                clean_up_tokenization_spaces=False)
  if max_length is not None:
    config["model_max_length"] = max_length
  if template is not None:
    config["chat_template"] = template
  _write_json(os.path.join(directory, "tokenizer_config.json"), config)


# ---------------------------------------------------------------------------------------------
# The command.


def model_source(run_or_source: str) -> str:
  """The `loading.load` source of a trainer work dir (its export/) or of a source itself."""
  export_dir = os.path.join(run_or_source, "export")
  if os.path.isfile(os.path.join(export_dir, "model_config.json")):
    return export_dir
  return run_or_source


def _check_out(out: str, source: str, overwrite: bool) -> None:
  """Refuses an `out` that is a file, is not empty (unless `overwrite`) or holds `source`."""
  if os.path.isfile(out):
    raise ValueError(f"--out {out} is a file")
  if not (os.path.isdir(out) and os.listdir(out)):
    return
  if not overwrite:
    raise ValueError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
  inside = os.path.relpath(os.path.abspath(source), os.path.abspath(out))
  if os.path.exists(source) and not inside.startswith(os.pardir):
    raise ValueError(f"--out {out} holds the model being exported; choose another directory")


def export(run_or_source: str, out: str, dtype: Any = jnp.bfloat16,
           max_shard_bytes: int = 5 * 10**9, chat_format: str = "auto",
           overwrite: bool = False) -> None:
  """Writes the Hugging Face directory `out` of a trainer work dir or a `loading.load` source
  (see the module docstring), with the chat template of `chat_format` (see `chat_template`).
  `overwrite` replaces a non-empty `out`."""
  source = model_source(run_or_source)
  _check_out(out, source, overwrite)
  _log(f"Reading {source}")
  cfg, params, vocab = loading.load(source, dtype)
  origin = loading.vocab_origin(source)
  if origin is None:
    raise ValueError(f"{source} has a character vocabulary, which has no Hugging Face "
                     "tokenizer")
  max_length = context_length(origin)
  special_ids = special_token_ids(vocab)
  hf_config(cfg, special_ids, dtype, max_length)  # Refuses an unsupported model before writing.
  if os.path.isdir(out) and overwrite:
    shutil.rmtree(out)
  os.makedirs(out, exist_ok=True)
  _log(f"Writing {cfg.num_params() / 1e6:.1f}M parameters ({_model_type(cfg)}, "
       f"{np.dtype(dtype).name}) to {out}")
  write_tokenizer(out, vocab, chat_template(origin, chat_format, vocab.bos_id is not None),
                  max_length)
  write_model(out, cfg, params, special_ids, dtype, max_shard_bytes, max_length)
  _log(f"Exported {out}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m score_jax.export.huggingface",
      description="Writes a model as a Hugging Face directory (config.json, safetensors, "
                  "tokenizer) for transformers and vLLM.")
  parser.add_argument("--model", required=True, metavar="RUN_OR_SOURCE",
                      help="a trainer work dir, an export dir, a shipped model name "
                           "(smollm2_135m, gemma3_270m), a GGUF file or a Hugging Face dir")
  parser.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
  parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES),
                      help="the weights' dtype (default bfloat16)")
  parser.add_argument("--max_shard_gb", type=float, default=5.0,
                      help="shard the weights above this many GB (default 5)")
  parser.add_argument("--chat_format", default="auto",
                      choices=["auto", "gemma", "chatml", "plain"],
                      help="the chat template: auto (the source's own; plain when it has none) "
                           "or chat.py's format of that name")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  args = parser.parse_args(argv)
  try:
    export(args.model, args.out, jnp.dtype(args.dtype), int(args.max_shard_gb * 1e9),
           args.chat_format, args.overwrite)
  except (ValueError, OSError, ImportError) as e:  # ImportError: a shipped model's package.
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
