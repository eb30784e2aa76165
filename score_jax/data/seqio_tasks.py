"""Optional seqio integration: our tasks as seqio Tasks, and math prompts from TFDS.

Needs the `seqio` extra (seqio, tensorflow, tensorflow-datasets):
  pip install 'score_jax[seqio]'
Importing this module does not need them; calling its functions does.

  * `register_seqio_tasks` adds seqio Tasks named "<prefix><task name>" whose examples are
    our `Example`s as string features ("id", "prompt", "reference", "solution_prefix").
  * `TfdsMathTask` is a score_jax math task whose problems come from a TFDS builder (by name,
    through `seqio.TfdsDataSource`); `tasks.get("tfds", builder_name=...)` builds one.
"""

import dataclasses
import functools
from typing import Any, Mapping, Optional

from score_jax.data import tasks

_FEATURES = tuple(field.name for field in dataclasses.fields(tasks.Example))

DEFAULT_SEQIO_TASKS: Mapping[str, Mapping[str, Any]] = {
    "math": {},
    "gsm8k": {},
    "humaneval": {},
}


def _import_seqio():
  """(seqio, tensorflow), or an ImportError that says how to install them."""
  try:
    import seqio  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "score_jax.data.seqio_tasks needs seqio, tensorflow and tensorflow-datasets; install "
        f"them with: pip install 'score_jax[seqio]' (import failed: {e})") from e
  return seqio, tf


def output_features() -> dict[str, Any]:
  """seqio features of an Example: untokenized scalar strings (our vocabulary tokenizes)."""
  seqio, tf = _import_seqio()
  text = seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, required=True,
                       dtype=tf.string, rank=0)
  return {name: text for name in _FEATURES}


def _examples_dataset(task: tasks.Task, split: str, shuffle_files: bool, seed=None):
  """A tf.data.Dataset of `task`'s examples of `split` (one source file: nothing to shuffle
  at the file level; seqio's Task shuffles examples)."""
  del shuffle_files, seed
  _, tf = _import_seqio()
  examples = task.examples(split)
  return tf.data.Dataset.from_tensor_slices(
      {name: [getattr(e, name) for e in examples] for name in _FEATURES})


def register_seqio_tasks(
    task_kwargs: Mapping[str, Mapping[str, Any]] = DEFAULT_SEQIO_TASKS,
    prefix: str = "score_jax_") -> list[str]:
  """Registers each of our tasks as the seqio Task "<prefix><name>" and returns the names.

  Args:
    task_kwargs: our task name -> its constructor arguments (`tasks.get(name, **kwargs)`);
      e.g. add {"mbpp": {"path": "/data/mbpp.jsonl"}}.
    prefix: prefix of the seqio names. A name already registered is replaced.
  """
  seqio, _ = _import_seqio()
  features = output_features()
  registered = []
  for name, kwargs in task_kwargs.items():
    task = tasks.get(name, **kwargs)
    seqio_name = prefix + name
    source = seqio.FunctionDataSource(
        dataset_fn=functools.partial(_examples_dataset, task), splits=task.splits)
    seqio.TaskRegistry.remove(seqio_name)
    seqio.TaskRegistry.add(seqio_name, source=source, output_features=features)
    registered.append(seqio_name)
  return registered


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsMathTask(tasks.MathTaskBase):
  """Math problems read from a TFDS dataset.

  Args:
    builder_name: the TFDS name, with config and version where needed
      (e.g. "gsm8k/main:1.0.0"; seqio may require the version).
    problem_key, answer_key: top-level features holding the problem and the answer.
    answer_format: how the answer feature is read (see `tasks.ANSWER_FORMATS`).
    splits: our split name -> TFDS split (e.g. {"train": "train[:90%]"}).
    data_dir: TFDS data directory; None uses the TFDS default.
  """

  def __init__(self,
               builder_name: str,
               problem_key: str = "problem",
               answer_key: str = "answer",
               answer_format: str = "plain",
               splits: Optional[Mapping[str, str]] = None,
               data_dir: Optional[str] = None,
               prompt_template: str = tasks.MATH_PROMPT,
               self_correction_instruction: str = tasks.MATH_SELF_CORRECTION):
    super().__init__(prompt_template, self_correction_instruction)
    if answer_format not in tasks.ANSWER_FORMATS:
      raise ValueError(f"answer_format must be one of {sorted(tasks.ANSWER_FORMATS)}, "
                       f"got {answer_format!r}")
    seqio, _ = _import_seqio()
    splits = dict(splits or {"train": "train", "test": "test"})
    self.name = builder_name
    self.splits = tuple(splits)
    self.problem_key = problem_key
    self.answer_key = answer_key
    self.answer_format = answer_format
    self._source = seqio.TfdsDataSource(tfds_name=builder_name, tfds_data_dir=data_dir,
                                        splits=splits)

  def _load(self, split: str) -> list[tasks.Example]:
    parse_answer = tasks.ANSWER_FORMATS[self.answer_format]
    records = self._source.get_dataset(split=split, shuffle=False).as_numpy_iterator()
    examples = []
    for index, record in enumerate(records):
      for key in (self.problem_key, self.answer_key):
        if key not in record:
          raise ValueError(f"{self.name} has no feature {key!r} (it has {sorted(record)})")
      examples.append(self.make_example(f"{self.name}/{split}/{index}",
                                        _text(record[self.problem_key]),
                                        parse_answer(_text(record[self.answer_key]))))
    return examples
