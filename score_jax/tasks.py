"""Tasks: problems with references, prompt formats and a host-side reward.

A task turns a dataset into `Example`s and scores responses. Everything here is host-side
Python on text; token ids are made by the vocabulary and chat format, not here.
"""

import abc
import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Example:
  """One problem. `prompt` is the attempt-1 user text (task prompt format applied, no chat
  template); `reference` is what the reward checks against (an answer, or test code)."""
  id: str
  prompt: str
  reference: str


class Task(abc.ABC):
  """A source of examples plus the reward that scores a response to one of them."""

  name: str
  # The self-correction instruction appended (as a user turn) after each attempt.
  self_correction_instruction: str

  @abc.abstractmethod
  def examples(self, split: str) -> Sequence[Example]:
    """All examples of `split` ("train" or "test"), in a fixed order."""

  @abc.abstractmethod
  def reward(self, response: str, example: Example) -> float:
    """Reward in [0, 1] for `response` (decoded attempt text). Never raises on garbage."""
