"""Mode `train`: the RL run of a config, stage by stage, saying what each stage did.

Stages, in order: prepare the data set; SFT warm start; c-GDPO RL; before/after evaluation.
This version of balcap has the data stages but no policy or learner yet (they arrive with the
model, sampler, rewards and learner issues), so `train` prepares the data and runs the training
loop over the real input pipeline with a data-only step: global batches assembled from every
host's shard, a jitted, sharded fold of the example ids (a digest that proves resume is exact),
checkpoints, preemption and metrics, exactly as the learner will use them.
"""

from __future__ import annotations

import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from balcap import loop, parallel
from balcap.data import datasets, pipeline

_DIGEST_BASE = np.uint32(1_000_003)  # polynomial rolling hash of the id sequence, mod 2**32


def report(message: str) -> None:
  """A line for the person running the command (process 0 only)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def id_hashes(ids: list[str]) -> np.ndarray:
  return np.array([zlib.crc32(i.encode("utf-8")) for i in ids], dtype=np.uint32)


def fold_digest(digest: jax.Array, hashes: jax.Array) -> jax.Array:
  """digest * BASE**B + sum_i hashes[i] * BASE**(B-1-i), in wrapping uint32 arithmetic.

  Order-sensitive, so two runs have equal digests only if they saw the same ids in the same
  order; associative over batches, so it does not matter how the stream was split into runs.
  """
  size = hashes.shape[0]
  powers = jnp.cumprod(jnp.full((size,), _DIGEST_BASE, jnp.uint32))  # BASE**1 .. BASE**B
  weights = jnp.concatenate([jnp.ones((1,), jnp.uint32), powers[:-1]])[::-1]
  return digest * powers[-1] + jnp.sum(hashes * weights, dtype=jnp.uint32)


def data_pass_state(mesh) -> dict[str, jax.Array]:
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.device_put({"examples_seen": jnp.zeros((), jnp.int32),
                         "ids_digest": jnp.zeros((), jnp.uint32)}, replicated)


def make_data_pass_step(mesh):
  """A step that consumes one global batch: counts it, folds its ids, measures its captions."""

  @jax.jit
  def update(state, batch):
    hashes = batch["id_hash"]
    new_state = {"examples_seen": state["examples_seen"] + hashes.shape[0],
                 "ids_digest": fold_digest(state["ids_digest"], hashes)}
    words = batch["reference_words"]
    return new_state, {"data/reference_words_mean": jnp.mean(words),
                       "data/reference_words_max": jnp.max(words),
                       "data/examples_seen": new_state["examples_seen"]}

  def step_fn(state, batch, step):
    del step
    local = {"id_hash": id_hashes(batch["id"]),
             "reference_words": np.array([len(refs[0].split()) for refs in batch["references"]],
                                         dtype=np.float32)}
    return update(state, parallel.make_global_batch(local, mesh))

  return step_fn


def run(config, workdir: str) -> loop.LoopResult:
  report(f"balcap train: workdir {workdir}")
  started = time.time()
  builder = datasets.prepare(config.data)
  sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
  report(f"[1/4] data: {builder.info.full_name} ready in {time.time() - started:.1f}s "
         f"at {builder.data_dir}; examples per split: {sizes}")

  report("[2/4] SFT warm start: not in this version of balcap (needs the policy and learner)")
  mesh = parallel.make_mesh(config.mesh)
  source = datasets.open_split(builder, config.data.train_split)
  iterator = pipeline.train_iterator(
      source, batch_size=parallel.host_batch_size(config.batch_size), seed=config.seed,
      read_threads=config.data.read_threads, prefetch_batches=config.data.prefetch_batches)
  report(f"[3/4] RL: no policy or learner in this version; running the training loop over the "
         f"input pipeline instead ({config.num_steps} steps x {config.batch_size} examples, "
         f"mesh {dict(mesh.shape)}, {jax.process_count()} host(s))")
  result = loop.run(workdir=workdir, config=config, state=data_pass_state(mesh),
                    data_iterator=iterator, step_fn=make_data_pass_step(mesh),
                    description="data pass")
  seen = int(result.state["examples_seen"])
  resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
  report(f"      {result.step}/{config.num_steps} steps{resumed}, {seen} examples read "
         f"(epoch {seen / max(sizes.get(config.data.train_split, 1), 1):.2f}), "
         f"id digest {int(result.state['ids_digest']):08x}, {result.seconds:.1f}s; "
         f"checkpoints in {workdir}/checkpoints, metrics in {workdir}/metrics.jsonl")
  report("[4/4] before/after evaluation: not in this version (needs the policy)")
  return result
