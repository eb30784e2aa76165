"""Tests for score_jax.models.configs: parameter counts against published sizes, gin entry point."""

import functools
import math
import os

import gin
import jax
import jax.numpy as jnp
import pytest

from score_jax import experiment
from score_jax.models import configs
from score_jax.models import transformer as model

# Published parameter counts. Exact: keras-team/keras-hub presets ("params" of gemma_2b_en,
# gemma_7b_en, gemma2_2b_en, gemma3_1b, gemma3_4b_text, gemma3_12b_text, gemma3_27b_text).
# Rounded: the model cards of
# google/gemma-3-270m ("268M") and HuggingFaceTB/SmolLM2-135M ("135M").
EXACT = {
    "gemma_2b": 2_506_172_416,
    "gemma_7b": 8_537_680_896,
    "gemma2_2b": 2_614_341_888,
    "gemma3_1b": 999_885_952,
    "gemma3_4b": 3_880_099_328,
    "gemma3_12b": 11_765_788_416,
    "gemma3_27b": 27_009_002_240,
}
ROUNDED = {"gemma3_270m": 268e6, "smollm2_135m": 135e6}
ROUNDED_TOLERANCE = 0.005  # The cards round to 3 significant digits.

GIN_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "gin", "models")


def test_every_config_has_a_published_size():
  assert set(configs.names()) == set(EXACT) | set(ROUNDED)


@pytest.mark.parametrize("name", sorted(EXACT))
def test_num_params_is_the_published_count(name):
  assert configs.get(name).num_params() == EXACT[name]


@pytest.mark.parametrize("name", sorted(ROUNDED))
def test_num_params_is_near_the_model_card(name):
  assert configs.get(name).num_params() == pytest.approx(ROUNDED[name], rel=ROUNDED_TOLERANCE)


@pytest.mark.parametrize("name", ["gemma3_270m", "smollm2_135m", "gemma2_2b"])
def test_num_params_counts_the_initialised_tree(name):
  cfg = configs.get(name)
  shapes = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.PRNGKey(0))
  assert sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) == cfg.num_params()


def test_layer_patterns():
  # Gemma 3: 5 local layers then 1 global; Gemma 2: local, global, ...; Gemma 1: all global.
  assert [configs.get("gemma3_1b").is_global(i) for i in range(12)] == ([False] * 5 + [True]) * 2
  assert [configs.get("gemma2_2b").is_global(i) for i in range(4)] == [False, True] * 2
  assert all(configs.get("gemma_7b").is_global(i) for i in range(28))


def test_get_applies_overrides_and_rejects_unknowns():
  cfg = configs.get("gemma3_1b", dtype="bfloat16", num_layers=2)
  assert cfg.dtype == jnp.bfloat16 and cfg.num_layers == 2
  with pytest.raises(ValueError, match="unknown model config"):
    configs.get("gemma9_1t")
  with pytest.raises(ValueError, match="unknown ModelConfig field"):
    configs.get("gemma3_1b", num_layer=2)


SHIPPED = ("gemma3_270m", "smollm2_135m")


@pytest.mark.parametrize("name", configs.names())
def test_gin_file_selects_its_config_and_weights(name):
  gin.clear_config()
  try:
    gin.parse_config_file(os.path.join(GIN_DIR, f"{name}.gin"))
    if name not in SHIPPED:
      gin.parse_config("WEIGHTS = '/weights/of/the/user'")
    assert configs.model_config() == configs.get(name)
    source, _ = experiment.policy_source()
    assert source == (name if name in SHIPPED else "/weights/of/the/user")
  finally:
    gin.clear_config()


def test_gin_file_of_a_tpu_model_needs_weights():
  gin.clear_config()
  try:
    gin.parse_config_file(os.path.join(GIN_DIR, "gemma3_1b.gin"))
    with pytest.raises(TypeError, match="WEIGHTS"):
      experiment.policy_source()
  finally:
    gin.clear_config()


def test_model_settings_from_a_model_file_change_how_the_model_computes():
  gin.clear_config()
  try:
    gin.parse_config_file(os.path.join(GIN_DIR, "gemma3_4b.gin"))
    cfg = experiment.model_settings(configs.get("gemma3_4b"))
  finally:
    gin.clear_config()
  assert (cfg.dtype, cfg.param_dtype, cfg.remat) == (jnp.bfloat16, jnp.float32, "full")
  with pytest.raises(experiment.UserError, match="remat"):
    experiment.model_settings(cfg, remat="all")
