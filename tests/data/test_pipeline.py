"""The grain pipeline: host shards, per-epoch shuffles, exact resume, padded evaluation."""

import numpy as np
import pytest

from balcap.data import pipeline


class FakeSource:
  """Examples shaped like TFDS's: bytes ids, a list of bytes references, a uint8 image."""

  def __init__(self, size):
    self.size = size

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    return {"id": f"ex{index:03d}".encode(), "references": [b"a caption", b"another"],
            "image": np.full((2, 3, 3), index % 256, np.uint8), "number": index}


def ids_of(batch):
  return list(batch["id"])


def take(iterator, n):
  return [ids_of(next(iterator)) for _ in range(n)]


def test_examples_reach_python_as_str_and_stacked_arrays():
  batch = next(pipeline.train_iterator(FakeSource(10), batch_size=4, seed=0))
  assert all(isinstance(i, str) for i in batch["id"])
  assert batch["references"][0] == ["a caption", "another"]
  assert batch["image"].shape == (4, 2, 3, 3) and batch["image"].dtype == np.uint8
  assert batch["number"].shape == (4,)


def test_hosts_read_disjoint_shards_that_cover_the_split():
  shards = []
  for host in range(3):
    iterator = pipeline.train_iterator(FakeSource(30), batch_size=5, seed=0, shard_index=host,
                                       shard_count=3)
    shards.append({i for batch in take(iterator, 2) for i in batch})  # one epoch = 10
  assert all(len(s) == 10 for s in shards)
  assert set.union(*shards) == {f"ex{i:03d}" for i in range(30)}
  assert not shards[0] & shards[1] and not shards[1] & shards[2]


def test_every_epoch_is_a_new_permutation_of_the_shard():
  iterator = pipeline.train_iterator(FakeSource(12), batch_size=4, seed=1)
  epochs = [sum(take(iterator, 3), []) for _ in range(3)]
  assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]


def test_order_depends_on_the_seed_only():
  first = take(pipeline.train_iterator(FakeSource(40), batch_size=4, seed=5), 5)
  assert first == take(pipeline.train_iterator(FakeSource(40), batch_size=4, seed=5,
                                               read_threads=1), 5)
  assert first != take(pipeline.train_iterator(FakeSource(40), batch_size=4, seed=6), 5)


@pytest.mark.parametrize("consumed", [1, 4, 7])  # inside the first epoch, at its end, in the 3rd
def test_resumed_iterator_neither_repeats_nor_skips(consumed):
  reference = take(pipeline.train_iterator(FakeSource(12), batch_size=3, seed=2), 12)
  iterator = pipeline.train_iterator(FakeSource(12), batch_size=3, seed=2)
  take(iterator, consumed)
  state = iterator.get_state()
  resumed = pipeline.train_iterator(FakeSource(12), batch_size=3, seed=2)
  resumed.set_state(state)
  assert take(resumed, 12 - consumed) == reference[consumed:]


def test_lookahead_peeks_without_consuming_and_checkpoints_from_before_the_peek(tmp_path):
  from balcap import checkpoint  # orbax: only this test needs it
  import jax.numpy as jnp
  reference = take(pipeline.train_iterator(FakeSource(12), batch_size=3, seed=2), 8)
  iterator = pipeline.Lookahead(pipeline.train_iterator(FakeSource(12), batch_size=3, seed=2))
  assert take(iterator, 2) == reference[:2]
  assert ids_of(iterator.peek()) == ids_of(iterator.peek()) == reference[2]
  # Saved after a peek, the state is the one before it: a restart reads the peeked batch again.
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(2, {"x": jnp.zeros(1)}, data_iterator=iterator)
    assert take(iterator, 3) == reference[2:5]  # the peeked batch, then on
    assert ids_of(iterator.peek()) == reference[5]
    restored = pipeline.Lookahead(
        pipeline.train_iterator(FakeSource(12), batch_size=3, seed=2))
    ckpt.restore({"x": jnp.zeros(1)}, data_iterator=restored)
  assert take(restored, 6) == reference[2:8]
  # Without a peek outstanding it is the plain iterator's state.
  assert take(iterator, 1) == [reference[5]]
  state = iterator.get_state()
  assert take(iterator, 1) == [reference[6]]
  iterator.set_state(state)
  assert take(iterator, 2) == reference[6:8]


def test_eval_batches_cover_each_example_once_with_equal_batch_counts():
  hosts = [list(pipeline.eval_batches(FakeSource(11), batch_size=2, shard_index=h, shard_count=3))
           for h in range(3)]
  assert [len(b) for b in hosts] == [2, 2, 2]  # ceil(ceil(11 / 3) / 2)
  real = [i for batches in hosts for b in batches for i, m in zip(b["id"], b["mask"]) if m]
  assert sorted(real) == [f"ex{i:03d}" for i in range(11)]
  padded = [b["mask"] for b in hosts[2]]
  assert np.concatenate(padded).tolist() == [True, True, True, False]


def test_a_split_smaller_than_the_host_count_is_refused():
  with pytest.raises(ValueError, match="a split of 2 examples cannot feed 4 hosts"):
    pipeline.train_iterator(FakeSource(2), batch_size=1, seed=0, shard_index=0, shard_count=4)


def test_collate_keeps_ragged_fields_as_lists():
  batch = pipeline.collate([{"image": np.zeros((2, 2, 3)), "n": 1},
                            {"image": np.zeros((4, 2, 3)), "n": 2}])
  assert isinstance(batch["image"], list) and len(batch["image"]) == 2
  assert batch["n"].tolist() == [1, 2]
