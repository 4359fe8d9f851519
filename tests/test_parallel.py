"""The mesh, the logical-axis rules and batch assembly, on 8 simulated CPU devices."""

import os
import socket
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from balcap import parallel
from testlib import REPO


def test_simulated_devices_are_present():
  assert jax.device_count() == 8, "conftest must set --xla_force_host_platform_device_count=8"


def test_minus_one_takes_the_remaining_devices():
  assert parallel.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {
      "data": 2, "fsdp": 2, "tensor": 2}
  assert parallel.resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8)["fsdp"] == 8


@pytest.mark.parametrize("mesh, message", [
    ({"data": -1, "fsdp": 3, "tensor": 1}, "does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "only one axis may be -1"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "has 4 devices but there are 8"),
    ({"data": 0, "fsdp": -1, "tensor": 1}, "config.mesh.data=0"),
])
def test_impossible_mesh_shapes_are_explained(mesh, message):
  with pytest.raises(ValueError, match=message):
    parallel.resolve_mesh_shape(mesh, 8)


def test_mesh_has_the_three_auto_axes():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_weights_and_activations_resolve_through_one_table():
  assert parallel.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert parallel.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
  # batch takes fsdp first, so an activation's embed dimension stays whole.
  assert parallel.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None,
                                                                      None)
  assert parallel.logical_to_spec(("batch", "length", "kv_heads", "head_dim")) == P(
      ("data", "fsdp"), None, "tensor", None)


class _Block(nn.Module):
  """A two-matmul MLP annotated like the real models: [embed, mlp] then [mlp, embed]."""

  @nn.compact
  def __call__(self, x):
    up = self.param("up", nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")),
                    (x.shape[-1], 32))
    down = self.param("down",
                      nn.with_logical_partitioning(nn.initializers.normal(), ("mlp", "embed")),
                      (32, x.shape[-1]))
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))  # not annotated
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (jax.nn.gelu(x @ up) @ down) * scale


def test_params_are_born_sharded_by_their_annotations():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  module = _Block()
  x = jnp.ones((4, 3, 16))
  params = parallel.sharded_init(lambda k: module.init(k, x), mesh, jax.random.key(0))["params"]
  assert params["up"].sharding.spec == P("fsdp", "tensor")
  assert params["up"].addressable_shards[0].data.shape == (8, 16)  # [16/fsdp, 32/tensor]
  assert params["down"].addressable_shards[0].data.shape == (16, 8)
  assert params["scale"].sharding.spec == P()  # unannotated -> replicated
  # Same values as an unsharded init, and the sharded forward pass agrees too.
  reference = nn.unbox(module.init(jax.random.key(0), x))["params"]
  np.testing.assert_allclose(params["up"], reference["up"], rtol=1e-6)  # jit vs eager ulps
  with nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES), jax.set_mesh(mesh):
    out = jax.jit(module.apply)({"params": params}, x)
  np.testing.assert_allclose(out, module.apply({"params": reference}, x), rtol=1e-5, atol=1e-6)


def test_shard_params_names_parameters_that_do_not_split():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  boxed = {"layer": {"w": nn.LogicallyPartitioned(jnp.ones((12, 4)), ("embed", "mlp"))}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\] \(12, 4\): dim 0 of size 12 does "
                     r"not split over mesh axes fsdp \(8 ways\)"):
    parallel.shard_params(boxed, mesh)


def test_global_batch_is_split_over_data_and_fsdp():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  local = {"tokens": np.arange(8 * 5).reshape(8, 5).astype(np.int32),
           "weight": np.linspace(0, 1, 8, dtype=np.float32)}
  batch = parallel.make_global_batch(local, mesh)
  assert batch["tokens"].shape == (8, 5)
  assert batch["tokens"].sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(2, 5)}
  np.testing.assert_array_equal(batch["tokens"], local["tokens"])
  # A shard_map program sees one quarter of the rows per data shard and can reduce over them.
  total = jax.jit(jax.shard_map(lambda t: jax.lax.psum(t.sum(), ("data", "fsdp")), mesh=mesh,
                                in_specs=P(("data", "fsdp")), out_specs=P()))(batch["tokens"])
  assert int(total) == local["tokens"].sum()


def test_global_batch_rejects_strings_and_uneven_rows():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with pytest.raises(TypeError, match="'caption' has dtype <U"):
    parallel.make_global_batch({"caption": np.array(["a", "b", "c", "d"])}, mesh)
  with pytest.raises(ValueError, match="'x': global batch 6 does not split over 4"):
    parallel.make_global_batch({"x": np.zeros((6, 2))}, mesh)


def test_a_single_process_does_not_start_jax_distributed():
  assert parallel.initialize_distributed() is False
  assert jax.process_count() == 1


_TWO_HOST_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from balcap import parallel
    assert parallel.initialize_distributed()
    import jax
    from jax.experimental import multihost_utils
    process = jax.process_index()
    mesh = parallel.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    local = {"x": np.full((4, 3), process + 1, np.float32)}  # this host's rows
    batch = parallel.make_global_batch(local, mesh)
    total = jax.jit(lambda x: x.sum(axis=1))(batch["x"])
    gathered = np.asarray(multihost_utils.process_allgather(total, tiled=True))
    # host_local reads this host's own shards: no collective (an all-gather here would fail).
    def no_gather(*args, **kwargs):
      raise AssertionError("host_local all-gathered")
    multihost_utils.process_allgather = no_gather
    mine = parallel.host_local(total)
    print("RESULT", process, jax.process_count(), jax.device_count(), batch["x"].shape,
          gathered.tolist(), mine.tolist(), flush=True)
    jax.distributed.shutdown()
""")


def test_two_processes_assemble_one_global_batch():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(REPO))
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_HOST_SCRIPT], env=dict(
      env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
  results = sorted(line for out in outputs for line in out.splitlines()
                   if line.startswith("RESULT"))
  # 2 hosts x 2 devices, 4 rows per host -> 8 global rows; host 0's rows come first.
  expected = [3.0] * 4 + [6.0] * 4
  assert results == [f"RESULT 0 2 4 (8, 3) {expected} {[3.0] * 4}",
                     f"RESULT 1 2 4 (8, 3) {expected} {[6.0] * 4}"]


def test_rules_without_axes_replicate_over_them():
  rules = parallel.rules_without(parallel.BATCH_AXES)
  assert parallel.logical_to_spec(("embed", "mlp"), rules) == P(None, "tensor")
  assert parallel.logical_to_spec(("batch", "heads"), rules) == P(None, "tensor")
  assert parallel.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
