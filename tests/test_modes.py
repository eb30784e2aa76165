"""The training modes of modes.py: STaR's filter and Pair-SFT's pairs on tables of cases, the
transcript batches, and two steps of every mode beyond SCoRe's own through the command line
(in this process, on a 1-layer toy model)."""

import json
import shutil

import jax
from jax.experimental.compilation_cache import compilation_cache as cc
import numpy as np
import pytest

from cli import run_cli
from score_jax.data import toy
from score_jax.rl import modes
from score_jax.rl import rollout as rollout_lib

TOY = ["--gin_file=tasks/toy.gin", "--gin.toy.model_config.num_layers=1",
       "--gin.RunConfig.batch_prompts=2", "--gin.RunConfig.samples_per_prompt=2",
       "--gin.RunConfig.log_every=1", "--gin.RunConfig.reward_workers=1",
       "--gin.eval_config.num_problems=4", "--gin.eval_config.batch_size=4"]


@pytest.mark.parametrize("rewards, only_corrections, expected", [
    # rows: (r1, r2)
    ([[0, 1], [1, 1], [1, 0], [0, 0]], False, [True, True, False, False]),
    ([[0, 1], [1, 1], [1, 0], [0, 0]], True, [True, False, False, False]),
    ([[0, 0, 1], [0, 1, 0]], False, [True, False]),  # The final attempt decides.
    ([[0.4, 0.6]], True, [True]),                      # Rewards are right from 0.5.
])
def test_star_keep(rewards, only_corrections, expected):
  keep = modes.star_keep(np.array(rewards, np.float32), only_corrections)
  assert keep.tolist() == expected


@pytest.mark.parametrize("attempts, rewards, reference, expected", [
    (["a", "b", "c"], [0, 1, 1], None, ("a", "b")),        # first wrong, first right
    (["a", "b", "c"], [1, 0, 0], None, ("b", "a")),        # the right one may come first
    (["a", "b"], [0, 0], "ref", ("a", "ref")),             # none right: the reference
    (["a", "b"], [0, 0], None, None),                      # none right, no reference
    (["a", "b"], [1, 1], "ref", None),                     # nothing to correct
    ([], [], "ref", None),                                 # no attempt at all
])
def test_make_pair(attempts, rewards, reference, expected):
  assert modes.make_pair(attempts, rewards, reference) == expected


def test_transcript_batch_trains_only_the_chosen_attempts():
  task = toy.ToyArithmetic(num_train=3, num_test=1)
  conv = rollout_lib.Conversation(task, task.vocab, toy.FORMAT)
  examples = task.examples("train")[:3]
  batch = modes.transcript_batch(conv, examples, [("#### 1", "#### 2"), None, ("#### 3",)],
                                 60, trained=(2,))
  prompt = len(conv.prompt_ids(examples[0]))
  attempt = batch["attempt"]
  assert (attempt[0, :prompt + 7] == 0).all()  # Prompt and attempt 1 ("#### 1" + stop).
  assert (attempt[0] == 2).sum() == 7 and (attempt[0] == 1).sum() == 0
  assert (attempt[1] == 0).all() and (attempt[2] == 0).all()  # Nothing trained.
  assert batch["tokens"][1, len(conv.prompt_ids(examples[1]))] == task.vocab.pad_id


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for this module's runs: the modes share most programs
  (sampler, reference log-probs, SFT step) and compile each once."""
  cc.set_cache_dir(str(tmp_path_factory.mktemp("xla")))
  cc.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", None)
  cc.reset_cache()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, compile_cache):
  """A 2-step toy SFT base model."""
  del compile_cache
  workdir = tmp_path_factory.mktemp("base")
  code, stderr = run_cli("--gin_file=sft.gin", *TOY, f"--gin.WORKDIR='{workdir}'",
                         "--gin.sft/RunConfig.steps=2")
  assert code == 0, stderr
  return workdir


# mode -> (mode file, extra flags). Stage II variants start from the base (WITHOUT_STAGE1).
CASES = {
    "star": ("stage1.gin", ["--gin.experiment.mode='star'"]),
    "pair_sft": ("stage1.gin", ["--gin.experiment.mode='pair_sft'"]),
    "stage2_star": ("stage2.gin", ["--gin.experiment.mode='stage2_star'",
                                   "--gin.WITHOUT_STAGE1=True"]),
    "stage2_offline": ("stage2.gin", ["--gin.WITHOUT_STAGE1=True",
                                      "--gin.mode_options.offline_fraction=0.5"]),
    "self_refine": ("eval.gin", ["--gin.experiment.mode='self_refine'",
                                 "--gin.eval_config.num_attempts=3"]),
    "inference_scaling": ("eval.gin", ["--gin.experiment.mode='inference_scaling'",
                                       "--gin.scaling_config.budgets=[2, 4]"]),
    "ablations": ("ablations.gin", ["--gin.ablations_config.rows=['self_refine', 'stage1_only']",
                                    "--gin.ablations_config.seeds=[0]",
                                    "--gin.ablations_config.steps=4",
                                    "--gin.ablations_config.stage1_share=0.25"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_new_mode_runs_two_steps(base_dir, tmp_path, case):
  gin_file, extra = CASES[case]
  work = tmp_path / "w"
  if case == "ablations":  # Its base model: the finished one, not trained again.
    shutil.copytree(base_dir, work / "base")
  code, stderr = run_cli(f"--gin_file={gin_file}", *TOY, f"--gin.WORKDIR='{work}'",
                         f"--gin.BASE_WORKDIR='{base_dir}'", f"--gin.MODEL_WORKDIR='{base_dir}'",
                         "--gin.RunConfig.steps=2", *extra)
  assert code == 0, stderr
  if case == "self_refine":
    results = json.loads((work / "results.json").read_text())
    assert results["n"] == 4 and "delta_i2c_t2_t3" in results
  elif case == "inference_scaling":
    results = json.loads((work / "results.json").read_text())
    assert results["budgets"] == [2, 4] and len(results["self_corrected"]) == 2
  elif case == "ablations":
    table = (work / "ablations.md").read_text()
    assert "Self-Refine" in table and "Stage I only" in table and "±" in table
    assert len((work / "per_seed.jsonl").read_text().splitlines()) == 2
    # Stage I got its share of the 4-step budget: 1 step.
    assert len((work / "seed0" / "stage1" / "metrics.jsonl").read_text().splitlines()) == 1
  else:
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and "reward_t2" in metrics[-1]
    assert (work / "export" / "model_config.json").exists()
