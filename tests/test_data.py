"""Tests of the prompt pipeline (score_jax/data/pipeline.py)."""

import json

import pytest

from score_jax.data import pipeline as data
from score_jax.data import tasks

EXAMPLES = [tasks.Example(id=str(i), prompt=f"p{i}", reference=f"r{i}") for i in range(10)]


def ids(batches):
  return [[e.id for e in batch] for batch in batches]


def take(iterator, n):
  return ids(next(iterator) for _ in range(n))


def flat(batches):
  return [i for batch in batches for i in batch]


def test_batches_are_lists_of_examples():
  batch = next(data.PromptIterator(EXAMPLES, 4, shard_index=0, shard_count=1))
  assert isinstance(batch, list) and len(batch) == 4
  assert all(isinstance(e, tasks.Example) for e in batch)


def test_same_seed_same_order_other_seed_other_order():
  a = take(data.PromptIterator(EXAMPLES, 5, seed=7, shard_index=0, shard_count=1), 6)
  b = take(data.PromptIterator(EXAMPLES, 5, seed=7, shard_index=0, shard_count=1), 6)
  c = take(data.PromptIterator(EXAMPLES, 5, seed=8, shard_index=0, shard_count=1), 6)
  assert a == b
  assert a != c


def test_each_epoch_is_a_new_permutation():
  stream = flat(take(data.PromptIterator(EXAMPLES, 5, seed=3, shard_index=0, shard_count=1), 8))
  epochs = [stream[i:i + 10] for i in range(0, 40, 10)]
  for epoch in epochs:
    assert sorted(epoch, key=int) == [e.id for e in EXAMPLES]
  assert len({tuple(epoch) for epoch in epochs}) == 4
  assert epochs[0] != [e.id for e in EXAMPLES]


def test_batches_span_epoch_boundaries():
  iterator = data.PromptIterator(EXAMPLES, 4, seed=1, shard_index=0, shard_count=1)
  batches = take(iterator, 5)
  first_epoch = flat(ids(data.PromptIterator(EXAMPLES, 10, seed=1, num_epochs=1,
                                             shard_index=0, shard_count=1)))
  assert all(len(batch) == 4 for batch in batches)
  # Batch 2 ends epoch 0 and starts epoch 1, which is a different permutation.
  assert batches[2][:2] == first_epoch[8:]
  stream = flat(batches)
  assert stream[:10] == first_epoch
  assert sorted(stream[10:20]) == sorted(first_epoch) and stream[10:20] != first_epoch
  assert iterator.epoch == 2.0


def test_one_ordered_pass_with_remainder():
  iterator = data.PromptIterator(EXAMPLES, 4, shuffle=False, num_epochs=1, shard_index=0,
                                 shard_count=1)
  assert ids(iterator) == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["8", "9"]]
  dropped = data.PromptIterator(EXAMPLES, 4, shuffle=False, num_epochs=1, shard_index=0,
                                shard_count=1, drop_remainder=True)
  assert len(list(dropped)) == 2


def test_shards_are_disjoint_and_cover_one_epoch():
  shards = [flat(ids(data.PromptIterator(EXAMPLES, 2, seed=5, num_epochs=1, shard_index=i,
                                         shard_count=3)))
            for i in range(3)]
  assert sorted(map(len, shards)) == [3, 3, 4]
  assert sorted(flat(shards), key=int) == [e.id for e in EXAMPLES]


def test_hosts_together_see_the_single_host_global_batch():
  single = take(data.PromptIterator(EXAMPLES, 6, seed=2, shard_index=0, shard_count=1), 5)
  hosts = [take(data.PromptIterator(EXAMPLES, 2, seed=2, shard_index=i, shard_count=3), 5)
           for i in range(3)]
  for step in range(5):
    per_host = [set(host[step]) for host in hosts]
    assert not (per_host[0] & per_host[1] or per_host[0] & per_host[2]
                or per_host[1] & per_host[2])
    assert set.union(*per_host) == set(single[step])


@pytest.mark.parametrize("consumed", [1, 3, 7])
def test_state_restore_continues_identically(consumed):
  def make():
    return data.PromptIterator(EXAMPLES, 3, seed=11, shard_index=1, shard_count=2)

  iterator = make()
  take(iterator, consumed)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = take(iterator, 6)
  restored = make()
  restored.set_state(state)
  assert take(restored, 6) == expected


def test_state_from_another_configuration_is_refused():
  state = data.PromptIterator(EXAMPLES, 3, shard_index=0, shard_count=1).get_state()
  other = data.PromptIterator(EXAMPLES, 4, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="batch_size"):
    other.set_state(state)


def test_state_is_the_same_on_every_host():
  states = []
  for shard in range(2):
    iterator = data.PromptIterator(EXAMPLES, 2, seed=4, shard_index=shard, shard_count=2)
    take(iterator, 3)
    states.append(iterator.get_state())
  assert states[0] == states[1]


@pytest.mark.parametrize("kwargs", [
    dict(examples=[], batch_size=2),
    dict(examples=EXAMPLES, batch_size=0),
    dict(examples=EXAMPLES, batch_size=2, num_epochs=0),
    dict(examples=EXAMPLES, batch_size=2, shard_index=2, shard_count=2),
    dict(examples=EXAMPLES, batch_size=2, seed=-1),
])
def test_bad_arguments(kwargs):
  kwargs.setdefault("shard_index", 0)
  kwargs.setdefault("shard_count", 1)
  with pytest.raises(ValueError):
    data.PromptIterator(**kwargs)


def test_default_shard_is_this_process():
  iterator = data.PromptIterator(EXAMPLES, 10, shuffle=False, num_epochs=1)
  assert ids(iterator) == [[e.id for e in EXAMPLES]]
