"""One device mesh, one table of logical-axis rules, and the helpers that place data on them.

Every array in balcap is sharded the same way: models annotate each dimension with a logical
name (`embed`, `heads`, `batch`, ...), `LOGICAL_AXIS_RULES` maps those names to the mesh axes
`('data', 'fsdp', 'tensor')`, and the config picks the mesh shape. Changing the parallelism
strategy means changing the mesh shape or this table, never model code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over both data-parallel axes: fsdp shards params AND batch.
BATCH_AXES = ("data", "fsdp")

# Logical dimension name -> mesh axes. A mesh axis is used at most once per array: when two
# dimensions of one array map to the same axis, the earlier dimension keeps it (flax's rule),
# so an activation [batch, length, embed] is split over batch only while a weight
# [embed, mlp] is split over fsdp x tensor.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),   # examples, rollouts, KV-cache rows
    ("length", None),        # sequence positions
    ("embed", "fsdp"),       # model width (weights: FSDP-sharded; activations: see above)
    ("mlp", "tensor"),       # MLP hidden width
    ("heads", "tensor"),     # query heads
    ("kv_heads", "tensor"),  # key/value heads (GQA)
    ("head_dim", None),
    ("vocab", "tensor"),     # embedding rows and logits
    ("layers", None),        # stacked (scanned) layers
    ("norm", None),          # norm scales and biases
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Mesh


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Returns {axis: size} for `config.mesh`, with -1 replaced by the remaining devices.

  Raises ValueError naming the field and the fix when the shape cannot cover `num_devices`.
  """
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  unknown = set(mesh_config.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
  bad = [f"config.mesh.{a}={s}" for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f"{', '.join(bad)}: mesh sizes must be positive, or -1 for 'the rest'")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {free}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f"config.mesh: the fixed axes ({_describe(sizes)}) use {fixed} devices, which does "
          f"not divide the {num_devices} devices; make their product a divisor of {num_devices}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f"config.mesh ({_describe(sizes)}) has {fixed} devices but there are {num_devices}; "
        f"set one axis to -1 or make the product {num_devices}")
  return sizes


def _describe(sizes: Mapping[str, int]) -> str:
  return " x ".join(f"{a}={s}" for a, s in sizes.items())


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh of `config.mesh` over `devices` (default all).

  `jax.make_mesh` orders devices for the physical topology (TPU torus, GPU NVLink islands), so
  the tensor axis, the innermost, lands on the fastest links. Axes are `Auto`: jit propagates
  shardings and shard_map accepts the arrays as placed.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = resolve_mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


# ---------------------------------------------------------------------------------------------
# Logical axes -> shardings


def logical_to_spec(logical_axes: tuple[str | None, ...],
                    rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
  """('batch', 'length', 'embed') -> PartitionSpec(('data', 'fsdp'), None, None)."""
  return nn.logical_to_mesh_axes(logical_axes, rules)


def logical_sharding(mesh: Mesh, logical_axes: tuple[str | None, ...],
                     rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def rules_without(axes: Sequence[str], rules=LOGICAL_AXIS_RULES) -> tuple:
  """`rules` with the mesh `axes` taken out: what they place is replicated over those axes."""
  def keep(target):
    if target is None or isinstance(target, str):
      return None if target in axes else target
    kept = tuple(a for a in target if a not in axes)
    return kept or None
  return tuple((name, keep(target)) for name, target in rules)


def param_shardings(boxed_params: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a params pytree whose leaves carry logical annotations.

  `boxed_params` is what `module.init` returns (or its `jax.eval_shape`): leaves wrapped in
  `nn.LogicallyPartitioned` by `nn.with_logical_partitioning`. Unannotated leaves are
  replicated. Raises ValueError listing every parameter whose shape does not divide over the
  mesh axes its annotation asks for.
  """
  specs = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_params), mesh, rules)
  check_divisible(nn.unbox(boxed_params), specs)
  return specs


def check_divisible(tree: Any, shardings: Any) -> None:
  """Raises ValueError naming each leaf whose dimensions do not split evenly over the mesh."""
  problems = []
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  for (path, leaf), sharding in zip(leaves, jax.tree_util.tree_leaves(shardings)):
    for dim, (size, axes) in enumerate(zip(np.shape(leaf), sharding.spec)):
      parts = _axes_size(sharding.mesh, axes)
      if size % parts:
        problems.append(f"{jax.tree_util.keystr(path)} {np.shape(leaf)}: dim {dim} of size "
                        f"{size} does not split over mesh axes {axes} ({parts} ways)")
  if problems:
    raise ValueError("cannot shard these arrays on this mesh; choose mesh sizes that divide "
                     "them (config.mesh) or change parallel.LOGICAL_AXIS_RULES:\n  "
                     + "\n  ".join(problems))


def _axes_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def shard_params(boxed_params: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """Places an annotated params pytree on the mesh; returns plain (unboxed) arrays."""
  shardings = param_shardings(boxed_params, mesh, rules)
  return jax.device_put(nn.unbox(boxed_params), shardings)


def sharded_init(init_fn, mesh: Mesh, *args, rules=LOGICAL_AXIS_RULES) -> Any:
  """Runs `init_fn(*args)` (returning annotated params) with each output born sharded.

  Nothing is ever materialised whole on one device: the shapes come from `jax.eval_shape`, the
  shardings from the rules, and jit writes each shard where it belongs.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = param_shardings(abstract, mesh, rules)
  return jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)


# ---------------------------------------------------------------------------------------------
# Batches: per-host local data -> one global array


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def host_batch_size(global_batch_size: int) -> int:
  """This host's share of a global batch (each host feeds its own data shard)."""
  count = jax.process_count()
  if global_batch_size % count:
    raise ValueError(f"config.batch_size={global_batch_size} does not divide over {count} hosts")
  return global_batch_size // count


def make_global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's local numeric arrays into global arrays split on the batch axes.

  Every host calls this with its own `[local_batch, ...]` arrays (same keys, shapes and dtypes
  on every host); the result has global leading size `local_batch * process_count`. Host-only
  fields (strings, PIL images) must be removed first: they raise a TypeError naming the key.
  """
  sharding = batch_sharding(mesh)
  shards = _axes_size(mesh, BATCH_AXES)
  result = {}
  for key, value in local_batch.items():
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
      raise TypeError(f"batch field {key!r} has dtype {array.dtype}; only numeric arrays go to "
                      "devices (keep strings and images on the host)")
    global_size = array.shape[0] * jax.process_count()
    if global_size % shards:
      raise ValueError(f"batch field {key!r}: global batch {global_size} does not split over "
                       f"{shards} data shards (mesh data x fsdp)")
    global_shape = (global_size,) + array.shape[1:]
    result[key] = jax.make_array_from_process_local_data(sharding, array, global_shape)
  return result


# Model-input fields whose batch axis is not the first (every other field's is): M-RoPE
# positions [3, rows, length]. Image inputs (`pixel_values`, `vision_layout`) lead with their
# image-shard axis, split like the rows (`balcap.models.image_shards`).
BATCH_AXIS_OF = {"position_ids": 1}


def global_inputs(inputs: Mapping[str, Any], mesh: Mesh | None) -> dict[str, Any]:
  """Host-prepared inputs as device arrays, split over the batch axes along their batch axis
  (`BATCH_AXIS_OF`, default 0), each host giving its own rows in process order. Without a
  mesh, everything goes to the default device."""
  if mesh is None:
    return jax.device_put(dict(inputs))
  out = {}
  for key, value in inputs.items():
    axis, sharding = BATCH_AXIS_OF.get(key, 0), input_sharding(key, mesh)
    out[key] = jax.tree.map(lambda x, s=sharding, a=axis: _global(x, s, a), value)
  return out


def input_sharding(key: str, mesh: Mesh) -> NamedSharding:
  """Where `global_inputs` puts input `key`: split over the batch axes along its batch axis
  (`BATCH_AXIS_OF`, default 0)."""
  axis = BATCH_AXIS_OF.get(key, 0)
  return NamedSharding(mesh, PartitionSpec(*((None,) * axis + (BATCH_AXES,))))


def _global(value: Any, sharding: NamedSharding, axis: int) -> jax.Array:
  if jax.process_count() == 1:
    return jax.device_put(value, sharding)
  value = np.asarray(value)
  shape = list(value.shape)
  shape[axis] *= jax.process_count()
  return jax.make_array_from_process_local_data(sharding, value, tuple(shape))


# ---------------------------------------------------------------------------------------------
# Host <-> host: what every host must agree on, and each host's share of a global result


def host_max(value: int) -> int:
  """The largest `value` over all hosts (one host: itself): padded lengths must agree."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def host_max_each(values: Mapping[str, int]) -> dict[str, int]:
  """Each value the largest over all hosts, in one exchange (one host: the values)."""
  if jax.process_count() == 1:
    return {k: int(v) for k, v in values.items()}
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  keys = sorted(values)
  gathered = multihost_utils.process_allgather(np.asarray([values[k] for k in keys], np.int64))
  return dict(zip(keys, (int(v) for v in np.asarray(gathered).reshape(-1, len(keys)).max(0))))


def host_any(flags: Sequence[bool]) -> list[bool]:
  """Each flag OR-ed over all hosts (one host: the flags): decisions every host must share."""
  if jax.process_count() == 1:
    return [bool(f) for f in flags]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32).reshape(-1))
  return [bool(f) for f in np.asarray(gathered).reshape(jax.process_count(), -1).max(axis=0)]


def host_union(names: Sequence[str]) -> list[str]:
  """The sorted union of every host's `names` (one host: its own, sorted)."""
  if jax.process_count() == 1:
    return sorted(set(names))
  # JSON escapes newlines, so one line per host survives the byte concatenation.
  encoded = np.frombuffer((json.dumps(sorted(set(names))) + "\n").encode(), np.uint8)
  whole, _ = host_concat(encoded)
  return sorted({name for line in whole.tobytes().decode().splitlines()
                 for name in json.loads(line)})


def host_rows_multiple(mesh: Mesh | None) -> int:
  """What each host's rows of a batch must be a multiple of, for the global batch to split
  over the mesh's batch axes (1 without a mesh)."""
  if mesh is None:
    return 1
  return max(1, _axes_size(mesh, BATCH_AXES) // jax.process_count())


def host_concat(array: np.ndarray) -> tuple[np.ndarray, int]:
  """Every host's `array` concatenated along axis 0 in process order (sizes may differ), and
  the row where this host's part starts. One host: (array, 0)."""
  array = np.asarray(array)
  if jax.process_count() == 1:
    return array, 0
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  rows = np.asarray(multihost_utils.process_allgather(np.asarray(array.shape[0], np.int64)))
  padded = np.zeros((int(rows.max()),) + array.shape[1:], array.dtype)
  padded[:array.shape[0]] = array
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  whole = np.concatenate([gathered[p, :rows[p]] for p in range(len(rows))])
  return whole, int(rows[:jax.process_index()].sum())


def host_local(array: jax.Array, axis: int = 0) -> np.ndarray:
  """This host's rows (along `axis`) of a global array split over the batch axes, as numpy:
  what `global_inputs` was given, for results the host goes on with (tokens, logprobs).

  Read from this host's own shards (no collective: the other hosts' rows never travel); a
  replicated array, or one whose local shards are not this host's contiguous share, falls
  back to an all-gather."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(array))
  rows = array.shape[axis] // jax.process_count()
  pieces = {}
  for shard in array.addressable_shards:
    index = shard.index[axis]
    start = index.start or 0
    pieces.setdefault(start, shard)  # replicas (the tensor axis) hold the same rows
  starts = sorted(pieces)
  spans = [(start, pieces[start].data.shape[axis]) for start in starts]
  contiguous = all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
  if contiguous and spans and spans[0][0] == rows * jax.process_index() and (
      sum(n for _, n in spans) == rows):
    return np.concatenate([np.asarray(pieces[start].data) for start in starts], axis=axis)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  whole = np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.take(whole, np.arange(rows) + rows * jax.process_index(), axis=axis)


# ---------------------------------------------------------------------------------------------
# Micro-batches


def micro_batches(x: jax.Array, parts: int, axis: int = 0) -> jax.Array:
  """[..., R, ...] -> [parts, ..., R / parts, ...], micro-batch m = rows m, m + parts, ...

  Strided, not contiguous: with the R rows split over the batch axes in blocks, every
  micro-batch keeps R / parts / shards rows on EVERY shard (so all devices work on each one,
  and each row stays in its image shard, `balcap.models.image_shards`), and splitting moves
  no data. A contiguous split would put each micro-batch on a few shards only.
  """
  if x.shape[axis] % parts:
    raise ValueError(f"{x.shape[axis]} rows do not split into {parts} micro-batches")
  shape = x.shape[:axis] + (x.shape[axis] // parts, parts) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis + 1, 0)


def join_micro_batches(x: jax.Array, axis: int = 0) -> jax.Array:
  """The inverse of `micro_batches`: [parts, ..., R / parts, ...] -> [..., R, ...]."""
  parts = x.shape[0]
  x = jnp.moveaxis(x, 0, axis + 1)
  return x.reshape(x.shape[:axis] + (x.shape[axis] * parts,) + x.shape[axis + 2:])


class OnMesh:
  """A jitted program that runs (and lowers) under `mesh` and the logical-axis rules.

  Calling it runs the program; `lower(*args)` lowers it for the same mesh, with real arrays
  or `jax.ShapeDtypeStruct`s (ahead-of-time compilation: `balcap.aot`).
  """

  def __init__(self, jitted, mesh: Mesh | None):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with mesh_context(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with mesh_context(self.mesh):
      return self.jitted.lower(*args)


@contextlib.contextmanager
def mesh_context(mesh: Mesh | None):
  """The logical-axis rules and (when given) the mesh, for code that annotates shardings."""
  with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    if mesh is None:
      yield
    else:
      with jax.set_mesh(mesh):
        yield


# ---------------------------------------------------------------------------------------------
# Multi-process start-up


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Joins a multi-process run (TPU pod, SLURM, MPI, or explicit arguments); returns whether.

  Must run before anything touches a JAX backend. On a TPU VM pod every host runs the same
  command and the cluster is found automatically; elsewhere pass the three arguments (or set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). A lone process does nothing.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  cluster = _detected_cluster()
  if coordinator_address is None and cluster is None:
    return False
  log.info("jax.distributed.initialize (coordinator=%s, cluster=%s)", coordinator_address,
           cluster)
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def _detected_cluster() -> str | None:
  """The multi-process environment JAX itself would detect (SLURM, MPI, TPU pod), if any."""
  try:
    from jax._src import clusters  # pylint: disable=import-outside-toplevel
    # The same registry jax.distributed.initialize() consults; it has no public accessor.
    for cluster_type in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if cluster_type.is_env_present():
        return cluster_type.__name__
  except Exception:  # pylint: disable=broad-except
    log.warning("could not query JAX's cluster detection; assuming a single process")
  return None
