"""A small run of the shared step loop, imported by tests and by the subprocesses they kill.

Its step consumes one global batch of example ids and folds them into an order-sensitive digest
on the mesh, so two runs end with equal digests only if they read the same examples in the same
order: the loop's resume, preemption and per-host data state are checked without a model.
"""

import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from balcap import configs, loop, parallel
from balcap.data import pipeline

_DIGEST_BASE = np.uint32(1_000_003)  # polynomial rolling hash of the id sequence, mod 2**32


def id_hashes(ids):
  return np.array([zlib.crc32(i.encode("utf-8")) for i in ids], dtype=np.uint32)


def fold_digest(digest, hashes):
  """digest * BASE**B + sum_i hashes[i] * BASE**(B-1-i) in wrapping uint32 arithmetic:
  order-sensitive, and associative over batches (splitting the stream does not matter)."""
  size = hashes.shape[0]
  powers = jnp.cumprod(jnp.full((size,), _DIGEST_BASE, jnp.uint32))  # BASE**1 .. BASE**B
  weights = jnp.concatenate([jnp.ones((1,), jnp.uint32), powers[:-1]])[::-1]
  return digest * powers[-1] + jnp.sum(hashes * weights, dtype=jnp.uint32)


def data_pass_state(mesh):
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.device_put({"examples_seen": jnp.zeros((), jnp.int32),
                         "ids_digest": jnp.zeros((), jnp.uint32)}, replicated)


def make_data_pass_step(mesh):
  @jax.jit
  def update(state, batch):
    hashes = batch["id_hash"]
    new_state = {"examples_seen": state["examples_seen"] + hashes.shape[0],
                 "ids_digest": fold_digest(state["ids_digest"], hashes)}
    return new_state, {"data/examples_seen": new_state["examples_seen"]}

  def step_fn(state, batch, step):
    del step
    ids = [i.decode() if isinstance(i, bytes) else i for i in batch["id"]]
    return update(state, parallel.make_global_batch({"id_hash": id_hashes(ids)}, mesh))

  return step_fn


class Source:
  """37 examples shaped like TFDS's, so epochs end inside batches of 8."""

  def __len__(self):
    return 37

  def __getitem__(self, i):
    return {"id": f"ex{i}".encode(), "references": [("w " * (i % 7 + 1)).encode()]}


def run(workdir, num_steps, step_delay=0.0, extra_state=None):
  """The data-pass step of `train` in the loop, data over every device (8 in tests);
  `extra_state` adds parts to the state (to resume into a state unlike the saved one)."""
  config = configs.base_config()
  config.num_steps, config.batch_size = num_steps, 8
  config.checkpoint.every_steps = 3
  config.metrics.tensorboard = config.metrics.progress_bar = False
  mesh = parallel.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
  data_step = make_data_pass_step(mesh)

  def step_fn(state, batch, step):
    time.sleep(step_delay)  # gives a test time to signal the process mid-run
    out = data_step(state, batch, step)
    print("STEP", step, flush=True)
    return out

  iterator = pipeline.train_iterator(Source(), batch_size=parallel.host_batch_size(8), seed=0,
                                     read_threads=1)
  return loop.run(workdir=str(workdir), config=config,
                  state={**data_pass_state(mesh), **(extra_state or {})},
                  data_iterator=iterator, step_fn=step_fn)


def digest(result):
  return int(result.state["ids_digest"]), int(result.state["examples_seen"])
