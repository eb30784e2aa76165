"""The task files' defaults: prompt lengths that hold every prompt of the task's data, new-token
lengths that hold its reference solutions, the paper's hyperparameters per task.

Lengths are measured with the real tokenizers and chat formats of SmolLM2 and Gemma 3 (the
shipped GGUFs; no weights are loaded), through the same `Conversation.prompt_ids` as training.
"""

import os

import gin
import numpy as np
import pytest

from score_jax import experiment
from score_jax import main
from score_jax.data import tasks
from score_jax.models import loading
from score_jax.models import vocab as vocab_lib
from score_jax.rl import rollout
from score_jax.rl import trainer

MBPP_PATH = "/work/shared/data/mbpp/mbpp.jsonl"


@pytest.fixture(scope="module", params=["smollm2_135m", "gemma3_270m"])
def model(request):
  """(vocabulary, chat format) of a shipped model."""
  return (vocab_lib.from_gguf(loading.shipped_gguf(request.param)),
          loading.chat_format("auto", request.param))


def task_file(name: str, scope: str = "") -> tuple[tasks.Task, trainer.RunConfig, dict]:
  """The task, RunConfig (in gin scope `scope`) and objective that tasks/NAME.gin sets."""
  gin.clear_config()
  try:
    bindings = [f"MBPP_PATH = '{MBPP_PATH}'"] if name == "mbpp" else []
    main.parse_gin([f"tasks/{name}.gin"], bindings + ["experiment.mode = 'eval'",
                                                      "WORKDIR = 'w'", "MODEL_WORKDIR = 'm'"])
  except experiment.UserError:
    pass  # Only the task file's own bindings are read below.
  try:
    with gin.config_scope(scope):
      cfg = trainer.RunConfig()
    objective = experiment.objectives.objective()
    task = tasks.make_task()
  finally:
    gin.clear_config()
  return task, cfg, objective


def _max_prompt(task, split, vocab, fmt):
  conv = rollout.Conversation(task, vocab, fmt)
  return max(len(conv.prompt_ids(e)) for e in task.examples(split))


def test_paper_hyperparameters_per_task():
  for name, lr, beta2 in (("math", 5e-6, 0.1), ("gsm8k", 5e-6, 0.1), ("mbpp", 1e-5, 0.25)):
    if name == "mbpp" and not os.path.exists(MBPP_PATH):
      continue
    _, cfg, objective = task_file(name)
    assert (cfg.learning_rate, objective.beta2) == (lr, beta2), name
    assert (objective.alpha, objective.beta1) == (10.0, 0.01)


@pytest.mark.parametrize("name", ["gsm8k", "humaneval"])
def test_every_prompt_fits(model, name):
  task, cfg, _ = task_file(name)
  for split in task.splits:
    trainer.check_prompt_lengths(rollout.Conversation(task, *model), task.examples(split),
                                 cfg.max_prompt_len)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["math", "mbpp"])
def test_every_prompt_fits_long_tasks(model, name):
  if name == "mbpp" and not os.path.exists(MBPP_PATH):
    pytest.skip("no MBPP file")
  task, cfg, _ = task_file(name)
  _, eval_cfg, _ = task_file(name, "eval")
  for split in task.splits:
    limit = cfg.max_prompt_len if split in ("train", "prompt") else eval_cfg.max_prompt_len
    trainer.check_prompt_lengths(rollout.Conversation(task, *model), task.examples(split), limit)


def _reference_solutions(name, task):
  if name == "gsm8k":
    return [r["answer"] for p in task._paths.values() for r in tasks.read_jsonl(p)]
  if name == "math":
    return [r["solution"] for p in (task.train_path, task.test_path)
            for r in tasks.read_jsonl(p)]
  if name == "mbpp":
    return [r["code"] for r in tasks.read_jsonl(MBPP_PATH)]
  return [r["prompt"] + r["canonical_solution"] for r in tasks.read_jsonl(task.path)]


@pytest.mark.slow
@pytest.mark.parametrize("name, fraction", [
    ("gsm8k", 1.0), ("math", 0.99), ("mbpp", 1.0), ("humaneval", 1.0)])
def test_new_tokens_hold_reference_solutions(model, name, fraction):
  if name == "mbpp" and not os.path.exists(MBPP_PATH):
    pytest.skip("no MBPP file")
  task, cfg, _ = task_file(name)
  vocab, _ = model
  lengths = np.array([len(vocab.encode(s)) for s in _reference_solutions(name, task)])
  assert np.mean(lengths <= cfg.max_new_tokens) >= fraction, np.max(lengths)
