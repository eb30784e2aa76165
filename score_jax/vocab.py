"""Vocabularies: one interface (encode, decode, special ids) over every tokenizer we use."""

import abc
from typing import Optional, Sequence


class Vocabulary(abc.ABC):
  """Text <-> token ids. `eot_id` ends a model turn (the sampler stops on it)."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def bos_id(self) -> Optional[int]:
    ...

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    ...

  @property
  def eot_id(self) -> int:
    """End of a model turn; defaults to end of sequence."""
    return self.eos_id

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special tokens are dropped."""


class CharVocab(Vocabulary):
  """One token per character of a fixed alphabet, plus <pad>=0, <bos>=1, <eos>=2.

  The toy task's vocabulary: tiny, so the demo model trains in minutes on a CPU.
  """

  def __init__(self, alphabet: str):
    if len(set(alphabet)) != len(alphabet):
      raise ValueError("alphabet has repeated characters")
    self._chars = alphabet
    self._index = {c: i + 3 for i, c in enumerate(alphabet)}

  @property
  def vocab_size(self) -> int:
    return len(self._chars) + 3

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def bos_id(self) -> int:
    return 1

  @property
  def eos_id(self) -> int:
    return 2

  def encode(self, text: str) -> list[int]:
    try:
      return [self._index[c] for c in text]
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(self._chars[i - 3] for i in ids if 3 <= i < self.vocab_size)
