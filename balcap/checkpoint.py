"""Checkpoints of a run: the train-state pytree, each host's data-iterator state, the config.

A thin wrapper over orbax's `CheckpointManager`, so a run can always resume exactly:
- `state` is any pytree of arrays (params, optimizer state, step, rng; typed PRNG keys are
  stored as their raw key data and rebuilt on restore);
- `data` is every host's grain iterator state (one small JSON file per host), so a resumed run
  neither repeats nor skips an example;
- `config` is the run's config as JSON, for the record.
Saves are asynchronous (arrays are copied to host memory, then written in the background) and
atomic: orbax writes into a temporary directory and renames it when complete, so a crash in the
middle of a save leaves a half-written temporary directory that is never listed, never loaded,
and is cleaned up when the next run opens the directory.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"


class Checkpointer:
  """Saves and restores numbered checkpoints under one directory (local path or gs://)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        # A run killed mid-save leaves a temporary directory behind; remove it on start-up.
        cleanup_tmp_directories=True,
        create=True,
    )
    directory = str(directory)
    # Orbax wants absolute paths; "runs/x" means relative to where the command was started.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            STATE: ocp.StandardCheckpointHandler(),
            DATA: grain.checkpoint.CheckpointHandler(),
            CONFIG: ocp.JsonCheckpointHandler(),
        },
    )

  def latest_step(self) -> int | None:
    """The newest COMPLETE checkpoint's step, or None; half-written saves are never listed."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iterator: Any = None,
           config: dict | None = None) -> None:
    """Starts saving checkpoint `step` (returns once arrays are on the host; see wait())."""
    items = {STATE: ocp.args.StandardSave(_keys_to_data(state))}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items[CONFIG] = ocp.args.JsonSave(_jsonable(config))
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, *, step: int | None = None,
              data_iterator: Any = None) -> Any:
    """Restores the state (and the data iterator, in place) of `step`, default the latest.

    `abstract_state` gives the structure, dtypes and target shardings, e.g. from
    `jax.eval_shape` with `.sharding` set for the CURRENT mesh: a checkpoint written on one mesh
    restores onto any other. Raises FileNotFoundError when there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    items = {STATE: ocp.args.StandardRestore(_abstract_keys_to_data(abstract_state))}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
      if data_iterator is not None and "process_" in str(e):
        raise ValueError(
            f"checkpoint {step} in {self.directory} has no data-iterator state for this host "
            f"(process {jax.process_index()} of {jax.process_count()}); it was written by a "
            "run with a different number of hosts, whose data order cannot be continued "
            "exactly. Resume with the same number of hosts.") from e
      raise
    log.info("restored checkpoint %d from %s", step, self.directory)
    return _data_to_keys(restored[STATE], abstract_state)

  def restore_params(self, abstract_params: Any, *, step: int | None = None) -> Any:
    """Only `state["params"]` of checkpoint `step` (default the latest), onto the shardings of
    `abstract_params`: the optimizer state (twice the params, in float32) is never read, so
    evaluating or exporting a 7B run needs the params' memory only."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    if "params" not in self.saved_keys(step):
      raise ValueError(f"checkpoint {step} in {self.directory} has no params (its state holds "
                       f"{self.saved_keys(step)})")
    # The manager's restore takes the whole item; orbax's partial restore reads the subtree.
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    path = os.path.join(self.directory, str(step), STATE)
    restored = ocp.PyTreeCheckpointer().restore(path, args=args)
    log.info("restored the params of checkpoint %d from %s", step, self.directory)
    return restored["params"]

  def saved_keys(self, step: int | None = None) -> list[str]:
    """The top-level keys of the state saved at `step` (default the latest), from its
    metadata alone."""
    step = self.latest_step() if step is None else step
    return sorted(self._manager.item_metadata(step)[STATE].keys())

  def restore_config(self, step: int | None = None) -> dict:
    """The config (as a dict) saved with checkpoint `step`, default the latest."""
    step = self.latest_step() if step is None else step
    args = ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
    return self._manager.restore(step, args=args)[CONFIG]

  def wait(self) -> None:
    """Blocks until the checkpoint being written in the background is complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# Typed PRNG keys have no on-disk format; store their raw key data and rebuild them.


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(tree: Any) -> Any:
  def convert(x):
    if not _is_key(x):
      return x
    data = jax.eval_shape(jax.random.key_data, x)
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):  # the key-data dimension is never split
      spec = tuple(sharding.spec) + (None,) * (data.ndim - len(sharding.spec))
      sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  return jax.tree.map(convert, tree)


def _data_to_keys(tree: Any, abstract: Any) -> Any:
  def convert(x, target):
    if not _is_key(target):
      return x
    # The key dtype names its implementation (threefry, rbg, ...), abstract or not.
    return jax.random.wrap_key_data(x, impl=target.dtype._impl)  # pylint: disable=protected-access
  return jax.tree.map(convert, tree, abstract)


def _jsonable(value: Any) -> Any:
  """ConfigDict / tuples / numpy scalars -> plain JSON types."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if hasattr(value, "item") and callable(value.item):
    return value.item()
  return value
