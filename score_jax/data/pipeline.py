"""The prompt pipeline: batches of `Example`s for one host, built on grain's MapDataset.

The order is a function of (seed, position) only: epoch e is the examples shuffled with
seed + e, epochs follow each other without a gap (a batch may span two epochs), and host i
of n takes the positions i, i + n, i + 2n, ... of that stream. So the n hosts' batches at one
step are disjoint, together they are the global batch a single host with batch_size * n
would see, and the iterator state (the index of the next batch) is the same on every host.
"""

from typing import Any, Optional, Sequence

import grain
import jax

from score_jax.data import tasks

# State keys that must match between `get_state` and `set_state`.
_CONFIG_KEYS = ("num_examples", "batch_size", "seed", "shuffle", "num_epochs", "shard_count",
                "drop_remainder")


class PromptIterator:
  """Yields lists of `batch_size` Examples (the last one shorter when `num_epochs` is set
  and `drop_remainder` is False).

  Args:
    examples: the examples of one split, in a fixed order.
    batch_size: examples per batch on this host.
    seed: shuffling seed; epoch e uses seed + e.
    shuffle: False keeps the examples' order (evaluation).
    num_epochs: passes over the data; None repeats forever (training).
    shard_index: this host's index; defaults to `jax.process_index()`.
    shard_count: number of hosts; defaults to `jax.process_count()`.
    drop_remainder: drop a last batch shorter than `batch_size`.
  """

  def __init__(self,
               examples: Sequence[tasks.Example],
               batch_size: int,
               *,
               seed: int = 0,
               shuffle: bool = True,
               num_epochs: Optional[int] = None,
               shard_index: Optional[int] = None,
               shard_count: Optional[int] = None,
               drop_remainder: bool = False):
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not examples:
      raise ValueError("no examples to iterate over")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    self._config = dict(num_examples=len(examples), batch_size=batch_size, seed=seed,
                        shuffle=shuffle, num_epochs=num_epochs, shard_count=shard_count,
                        drop_remainder=drop_remainder)
    dataset = grain.MapDataset.source(list(examples))
    if shuffle:
      dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs)[shard_index::shard_count]
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)
    # The examples are in memory: read them on this thread, without prefetching.
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    self._iterator = iter(dataset.to_iter_dataset(read_options))

  def __iter__(self) -> "PromptIterator":
    return self

  def __next__(self) -> list[tasks.Example]:
    return next(self._iterator)

  @property
  def epoch(self) -> float:
    """Global epochs consumed so far (all hosts together)."""
    c = self._config
    consumed = self._iterator.get_state()["next_index"] * c["batch_size"] * c["shard_count"]
    return consumed / c["num_examples"]

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position; the same on every host, so one copy restores them all."""
    return {"grain": self._iterator.get_state(), **self._config}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (from `get_state` of an iterator built the same way)."""
    for key in _CONFIG_KEYS:
      if state.get(key) != self._config[key]:
        raise ValueError(f"iterator state has {key}={state.get(key)!r} but this iterator "
                         f"has {key}={self._config[key]!r}")
    self._iterator.set_state(state["grain"])
