"""The grain input pipeline: per-host shard, seeded per-epoch shuffle, batches, exact resume.

Training reads an endless stream: this host's examples (`process_index`-th of every
`process_count`), shuffled with the run's seed and reshuffled every epoch, mapped by the model's
processor, batched to the per-host batch. The iterator's state (how many batches were taken)
goes into every checkpoint, so a resumed run continues with exactly the next batch.
Evaluation reads each example once, in a fixed order, padded so every host runs the same
number of batches; padding rows have `mask == False`.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np

Example = dict[str, Any]
Batch = dict[str, Any]


def decode_strings(example: Example) -> Example:
  """TFDS text features arrive as bytes; give the rest of balcap str (nested lists too)."""
  def decode(value):
    if isinstance(value, bytes):
      return value.decode("utf-8")
    if isinstance(value, (list, tuple)):
      return [decode(v) for v in value]
    if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
      return [decode(v) for v in value.tolist()]
    return value
  return {key: decode(value) for key, value in example.items()}


def collate(examples: Sequence[Example]) -> Batch:
  """Stacks each field over the batch where it can, else keeps a list.

  Numbers and same-shaped numeric arrays become one array `[B, ...]`; strings, lists and
  differently sized images stay Python lists of length B (the model's processor pads them).
  """
  batch = {}
  for key in examples[0]:
    values = [example[key] for example in examples]
    arrays = [np.asarray(v) for v in values]
    numeric = all(a.dtype.kind in "biuf" for a in arrays)
    if numeric and len({a.shape for a in arrays}) == 1:
      batch[key] = np.stack(arrays)
    else:
      batch[key] = values
  return batch


def _host_shard(source, shard_index: int | None, shard_count: int | None) -> grain.MapDataset:
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
  dataset = grain.MapDataset.source(source)
  if len(dataset) < shard_count:
    raise ValueError(f"a split of {len(dataset)} examples cannot feed {shard_count} hosts")
  # Strided, so every host's shard has the same size up to one example.
  return dataset[shard_index::shard_count].map(decode_strings)


def train_iterator(source, *, batch_size: int, seed: int,
                   transform: Callable[[Example], Example] | None = None,
                   shard_index: int | None = None, shard_count: int | None = None,
                   read_threads: int = 4, prefetch_batches: int = 2) -> grain.DatasetIterator:
  """An endless iterator of this host's `batch_size` batches; checkpoint it with its state.

  Every epoch of the host's shard is a new permutation drawn from `seed`. `get_state()` /
  `set_state()` (or the Checkpointer) resume it exactly: no example repeated or skipped.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  dataset = _host_shard(source, shard_index, shard_count)
  dataset = dataset.shuffle(seed=seed).repeat(None, reseed_each_epoch=True)
  if transform is not None:
    dataset = dataset.map(transform)
  dataset = dataset.batch(batch_size, drop_remainder=True, batch_fn=collate)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
  return iter(dataset.to_iter_dataset(options))


class Lookahead:
  """An iterator that can show its next batch early (`peek`) without losing it on a restart.

  The asynchronous RL step samples step t+1's rollouts during step t, so it needs step t+1's
  batch before the loop asks for it. A checkpoint written after a peek holds the state from
  BEFORE the peeked batch: a resumed run reads that batch again (and re-makes what was in
  flight from it). Checkpoints like any iterator (`get_state` / `set_state` as JSON bytes).
  """

  def __init__(self, iterator):
    self._iterator = iterator
    self._peeked = None          # the batch `peek` took, not yet returned by `next`
    self._state_before = None    # the iterator's state before that batch

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self._peeked is not None:
      batch, self._peeked, self._state_before = self._peeked, None, None
      return batch
    return next(self._iterator)

  def peek(self) -> Batch:
    """The batch the next `next()` returns."""
    if self._peeked is None:
      self._state_before = self._iterator.get_state()
      self._peeked = next(self._iterator)
    return self._peeked

  def get_state(self) -> bytes:
    state = self._state_before if self._peeked is not None else self._iterator.get_state()
    return json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    self._peeked, self._state_before = None, None
    self._iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:  # grain's checkpoint handler calls it after a restore
    if hasattr(self._iterator, "start_prefetch"):
      self._iterator.start_prefetch()


def eval_batches(source, *, batch_size: int,
                 transform: Callable[[Example], Example] | None = None,
                 shard_index: int | None = None,
                 shard_count: int | None = None) -> Iterator[Batch]:
  """This host's share of a split, once, in order, as batches with a boolean `mask`.

  Hosts get the same number of batches (ceil(len / hosts / batch_size)): short shards are
  padded with copies of their first example marked `mask == False`, so collective evaluation
  steps never wait on a host that has run out.
  """
  shard = _host_shard(source, shard_index, shard_count)
  if transform is not None:
    shard = shard.map(transform)
  shard_count = jax.process_count() if shard_count is None else shard_count
  per_host = -(-len(source) // shard_count)
  num_batches = -(-per_host // batch_size)
  for start in range(0, num_batches * batch_size, batch_size):
    rows = [(shard[i], True) if i < len(shard) else (shard[0], False)
            for i in range(start, start + batch_size)]
    batch = collate([example for example, _ in rows])
    batch["mask"] = np.array([real for _, real in rows])
    yield batch
