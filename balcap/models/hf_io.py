"""HF checkpoint folders (config.json + *.safetensors) <-> balcap params, driven by rule tables.

Each architecture describes its checkpoint as a tuple of `Rule`s: HF tensor name templates
(`{layer}` stands for a layer number; several spellings may be accepted), the balcap parameter
path, and a named transform (transpose, patch-embedding reshape). Everything else — finding the
files, checking names and shapes, streaming, sharding, casting, writing — is this one generic
module.

Loading checks every header first and raises one `CheckpointMismatchError` listing each
missing, unexpected or mis-shaped tensor. Then it reads ONE tensor at a time into host memory,
transforms and casts it, and places it straight onto the mesh with its parameter's sharding
(per-layer tensors are placed one by one and stacked on the devices), so peak host memory is
about one tensor plus this host's share of the parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from balcap.models import safetensors_io

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
LAYER = "{layer}"


@dataclasses.dataclass(frozen=True)
class Transform:
  """How a checkpoint tensor becomes a parameter (`to_param`) and back (`to_hf`)."""
  to_param: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (param, hf shape) -> tensor
  param_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


TRANSFORMS = {
    "identity": Transform(lambda t: t, lambda p, _: p, lambda s: s),
    # torch Linear weight [out, in] <-> kernel [in, out]
    "transpose": Transform(lambda t: t.T, lambda p, _: p.T, lambda s: s[::-1]),
    # Conv weight [out, c, (t,) h, w] with stride = kernel <-> a Dense kernel over flattened
    # patches [c * (t *) h * w, out]: the convolution IS this matmul on patchified pixels.
    "flatten_conv": Transform(lambda t: t.reshape(t.shape[0], -1).T,
                              lambda p, hf_shape: p.T.reshape(hf_shape),
                              lambda s: (int(np.prod(s[1:])), s[0])),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One checkpoint tensor <-> one parameter; with "{layer}" in the names, one tensor per
  layer, either stacked on axis 0 of one parameter or, with "{layer}" in `param` too, one
  parameter per layer (unrolled layers)."""
  names: tuple[str, ...]     # accepted HF names; names[0] is written. "{layer}": layer number
  param: str                 # "/"-separated path in the params tree
  transform: str = "identity"
  # Surplus when the model has no such parameter (lm_head.weight in some checkpoints of a
  # model with tied embeddings): ignored then, instead of reported as unexpected.
  optional: bool = False

  @property
  def stacked(self) -> bool:
    return LAYER in self.names[0] and LAYER not in self.param

  def patterns(self) -> list[re.Pattern]:
    return [re.compile(re.escape(n).replace(re.escape(LAYER), r"(?P<layer>\d+)") + "$")
            for n in self.names]


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model; the message lists every tensor at fault."""


# ---------------------------------------------------------------------------------------------
# Files


def checkpoint_tensors(folder: str) -> dict[str, safetensors_io.TensorInfo]:
  """Every tensor of an HF folder: the sharded index's files, or model.safetensors."""
  index_path = os.path.join(folder, INDEX_FILE)
  if os.path.isfile(index_path):
    with open(index_path, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
    files, weight_map = [SINGLE_FILE], None
  else:
    found = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not found:
      raise FileNotFoundError(f"{folder}: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors")
    files, weight_map = found, None
  tensors = {}
  for name in files:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{folder}: {INDEX_FILE} lists {name}, which is missing")
    for tensor_name, info in safetensors_io.read_header(path).items():
      if weight_map is not None and weight_map.get(tensor_name) != name:
        raise CheckpointMismatchError(f"{path}: holds {tensor_name!r}, which {INDEX_FILE} "
                                      f"places in {weight_map.get(tensor_name)!r}")
      tensors[tensor_name] = info
  return tensors


# ---------------------------------------------------------------------------------------------
# Matching checkpoint tensors to parameters


def _param_leaves(tree: Any) -> dict[str, Any]:
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _concrete(rules: Iterable[Rule], leaves: dict[str, Any]) -> list[Rule]:
  """Per-layer rules (`{layer}` in `param`) spelled out for each layer the model has."""
  concrete = []
  for rule in rules:
    if LAYER not in rule.param:
      concrete.append(rule)
      continue
    pattern = re.compile(
        re.escape(rule.param).replace(re.escape(LAYER), r"(?P<layer>\d+)") + "$")
    layers = sorted(int(m.group("layer")) for m in map(pattern.match, leaves) if m)
    concrete += [Rule(tuple(n.replace(LAYER, str(i)) for n in rule.names),
                      rule.param.replace(LAYER, str(i)), rule.transform, rule.optional)
                 for i in layers]
  return concrete


def _plan(rules: Iterable[Rule], tensors: dict[str, safetensors_io.TensorInfo],
          leaves: dict[str, Any]) -> dict[str, dict[int | None, safetensors_io.TensorInfo]]:
  """For each parameter, its tensor per layer (None for unstacked); raises on any mismatch."""
  rules = _concrete(rules, leaves)
  by_param = {rule.param: rule for rule in rules}
  compiled = [(rule, rule.patterns()) for rule in rules]
  plan: dict[str, dict[int | None, safetensors_io.TensorInfo]] = {}
  unexpected, misshaped = [], []
  seen_misshaped: set[tuple[str, int | None]] = set()  # present, so not also "missing"
  for name, info in sorted(tensors.items()):
    rule, layer = _match(name, compiled)
    if rule is None or rule.param not in leaves:
      if rule is None or not rule.optional:
        unexpected.append(f"unexpected tensor {name} {info.shape} "
                          f"(in {os.path.basename(info.path)})")
      continue
    leaf = leaves[rule.param]
    expected = tuple(leaf.shape[1:] if rule.stacked else leaf.shape)
    if rule.stacked and not 0 <= layer < leaf.shape[0]:
      unexpected.append(f"unexpected tensor {name}: layer {layer} but the model has "
                        f"{leaf.shape[0]} layers")
      continue
    found = TRANSFORMS[rule.transform].param_shape(info.shape)
    if found != expected:
      misshaped.append(f"mis-shaped tensor {name}: expected {_hf_shape(rule, expected)} for "
                       f"{rule.param}, found {info.shape}")
      seen_misshaped.add((rule.param, layer))
      continue
    plan.setdefault(rule.param, {})[layer] = info
  missing = []
  for param, leaf in leaves.items():
    rule = by_param.get(param)
    if rule is None:
      missing.append(f"parameter {param} {tuple(leaf.shape)} has no rule in the table")
      continue
    layers = range(leaf.shape[0]) if rule.stacked else [None]
    for layer in layers:
      if layer not in plan.get(param, {}) and (param, layer) not in seen_misshaped:
        name = rule.names[0].replace(LAYER, str(layer))
        expected = tuple(leaf.shape[1:] if rule.stacked else leaf.shape)
        missing.append(f"missing tensor {name}: expected {_hf_shape(rule, expected)} for {param}")
  problems = missing + unexpected + misshaped
  if problems:
    raise CheckpointMismatchError(
        f"the checkpoint does not fit the model ({len(missing)} missing, {len(unexpected)} "
        f"unexpected, {len(misshaped)} mis-shaped):\n  " + "\n  ".join(problems))
  return plan


def _match(name: str, compiled) -> tuple[Rule | None, int | None]:
  for rule, patterns in compiled:
    for pattern in patterns:
      m = pattern.match(name)
      if m:
        return rule, int(m.group("layer")) if rule.stacked else None
  return None, None


def _hf_shape(rule: Rule, param_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The checkpoint shape a parameter shape corresponds to (for error messages)."""
  if rule.transform == "transpose":
    return param_shape[::-1]
  if rule.transform == "flatten_conv":
    return (param_shape[1], "...")  # the kernel window is not recoverable from the flat shape
  return param_shape


# ---------------------------------------------------------------------------------------------
# Loading


def load_params(folder: str, rules: Iterable[Rule], abstract_params: Any,
                shardings: Any = None) -> Any:
  """Reads an HF folder into a params tree shaped, typed and sharded like `abstract_params`.

  `abstract_params`: the model's params as `jax.ShapeDtypeStruct`s (`jax.eval_shape` of init;
  their dtypes are the dtypes loaded). `shardings`: a matching tree of `NamedSharding`s (see
  `balcap.parallel.param_shardings`), default: everything on the first device.
  """
  tensors = checkpoint_tensors(folder)
  leaves = _param_leaves(abstract_params)
  plan = _plan(rules, tensors, leaves)
  rules_by_param = {rule.param: rule for rule in _concrete(rules, leaves)}
  if shardings is None:
    device = SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_params)
  sharding_of = _param_leaves(shardings)
  loaded = {}
  for param, leaf in leaves.items():
    rule = rules_by_param[param]
    transform = TRANSFORMS[rule.transform]

    def host_value(info, transform=transform, leaf=leaf):
      return np.asarray(transform.to_param(safetensors_io.read_tensor(info)), dtype=leaf.dtype)

    sharding = sharding_of[param]
    if rule.stacked:
      layer_sharding = _drop_leading_axis(sharding)
      per_layer = [_place(host_value(plan[param][i]), layer_sharding)
                   for i in range(leaf.shape[0])]
      loaded[param] = _stack(per_layer, sharding)
      del per_layer
    else:
      loaded[param] = _place(host_value(plan[param][None]), sharding)
  return _unflatten(abstract_params, loaded)


def _place(host: np.ndarray, sharding) -> jax.Array:
  """Each addressable device gets its own slice; no device ever holds the whole tensor."""
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _drop_leading_axis(sharding):
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
  return sharding


def _stack(arrays: list[jax.Array], sharding) -> jax.Array:
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*arrays)


def _unflatten(template: Any, values: dict[str, Any]) -> Any:
  paths = [("/".join(str(k.key) for k in path))
           for path, _ in jax.tree_util.tree_leaves_with_path(template)]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template),
                                      [values[p] for p in paths])


# ---------------------------------------------------------------------------------------------
# Writing


def hf_tensors(rules: Iterable[Rule], params: Any, hf_shapes: dict[str, tuple[int, ...]] | None
               = None, dtype: Any = None) -> Iterable[tuple[str, np.ndarray]]:
  """(HF name, host array) for every parameter, one at a time, layers unstacked.

  `hf_shapes` gives checkpoint shapes that the flat parameter cannot tell (flatten_conv
  kernels), keyed by parameter path. Arrays sharded over several hosts are gathered.
  """
  leaves = _param_leaves(params)
  rules_by_param = {rule.param: rule for rule in _concrete(rules, leaves)}
  for param, value in leaves.items():
    rule = rules_by_param.get(param)
    if rule is None:
      raise CheckpointMismatchError(f"parameter {param} has no rule in the table")
    transform = TRANSFORMS[rule.transform]
    host = _to_host(value)
    if dtype is not None:
      host = host.astype(dtype)
    hf_shape = (hf_shapes or {}).get(param)
    if rule.stacked:
      for layer in range(host.shape[0]):
        yield rule.names[0].replace(LAYER, str(layer)), transform.to_hf(host[layer], hf_shape)
    else:
      yield rule.names[0], transform.to_hf(host, hf_shape)


def _to_host(value: jax.Array) -> np.ndarray:
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return np.asarray(value)


def save_tensors(folder: str, tensors: Iterable[tuple[str, np.ndarray]],
                 max_shard_bytes: int = 4 << 30) -> list[str]:
  """Writes model.safetensors, or shards plus model.safetensors.index.json when larger than
  `max_shard_bytes`; returns the file names. Host memory holds one shard at a time.

  Every process must call it (arrays sharded over hosts are gathered collectively); only
  process 0 writes.
  """
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(folder, exist_ok=True)
  shard: list[tuple[str, np.ndarray]] = []
  written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
  size = total = 0

  def flush():
    path = os.path.join(folder, f".shard-{len(written):05d}.safetensors.tmp")
    if writer:
      safetensors_io.write_file(path, shard, {"format": "pt"})
    written.append((path, [name for name, _ in shard]))

  for name, array in tensors:
    nbytes = array.size * array.dtype.itemsize
    if shard and size + nbytes > max_shard_bytes:
      flush()
      shard, size = [], 0
    shard.append((name, np.ascontiguousarray(array)))
    size += nbytes
    total += nbytes
  flush()
  if not writer:
    return []
  if len(written) == 1:
    os.replace(written[0][0], os.path.join(folder, SINGLE_FILE))
    return [SINGLE_FILE]
  names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
  weight_map = {}
  for file_name, (temporary, tensor_names) in zip(names, written):
    os.replace(temporary, os.path.join(folder, file_name))
    weight_map.update({tensor_name: file_name for tensor_name in tensor_names})
  with open(os.path.join(folder, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names + [INDEX_FILE]
