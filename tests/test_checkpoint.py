"""Checkpoints: round trip, another mesh, keep-N, data state, a crash in the middle of a save."""

import os
import signal
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from balcap import checkpoint, parallel
from testlib import REPO


def _state(mesh):
  w = jax.device_put(jnp.arange(64 * 4, dtype=jnp.float32).reshape(64, 4),
                     NamedSharding(mesh, P("fsdp", "tensor")))
  return {"params": {"w": w, "b": jnp.full((4,), 0.5, jnp.bfloat16)},
          "opt_state": {"mu": w * 2}, "step": jnp.asarray(7, jnp.int32),
          "rng": jax.random.key(42)}


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      jax.eval_shape(lambda: state), shardings)


def test_restore_onto_a_different_mesh_keeps_every_value(tmp_path):
  state = _state(parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}))
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(7, state, config={"mode": "train", "image_sizes": ((112, 112),)})
    ckpt.wait()
    other = parallel.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    rows = NamedSharding(other, P(None, "tensor"))
    replicated = NamedSharding(other, P())
    target = _abstract(state, {"params": {"w": rows, "b": replicated}, "opt_state": {"mu": rows},
                               "step": replicated, "rng": replicated})
    restored = ckpt.restore(target)
    assert restored["params"]["w"].sharding == rows
    assert restored["params"]["w"].addressable_shards[0].data.shape == (64, 1)
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    np.testing.assert_array_equal(restored["opt_state"]["mu"], state["opt_state"]["mu"])
    assert restored["params"]["b"].dtype == jnp.bfloat16
    assert int(restored["step"]) == 7
    # The typed PRNG key comes back as the same key: it draws the same numbers.
    assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.uniform(restored["rng"], (3,)),
                                  jax.random.uniform(state["rng"], (3,)))
    assert ckpt.restore_config() == {"mode": "train", "image_sizes": [[112, 112]]}
    # And onto one device.
    one = NamedSharding(parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                           devices=jax.devices()[:1]), P())
    single = ckpt.restore(_abstract(state, jax.tree.map(lambda _: one, state)))
    np.testing.assert_array_equal(single["params"]["w"], state["params"]["w"])


def test_keeps_only_the_newest_checkpoints(tmp_path):
  state = {"x": jnp.zeros(3)}
  with checkpoint.Checkpointer(tmp_path, keep=2) as ckpt:
    for step in range(1, 6):
      ckpt.save(step, {"x": state["x"] + step})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
    assert ckpt.latest_step() == 5
    np.testing.assert_array_equal(ckpt.restore(state, step=4)["x"], np.full(3, 4.0))


def test_no_checkpoint_is_a_clear_error(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
      ckpt.restore({"x": jnp.zeros(3)})


def _iterator():
  dataset = grain.MapDataset.range(100).shuffle(seed=3).repeat().batch(4)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))


def test_data_iterator_resumes_at_the_next_batch(tmp_path):
  iterator = _iterator()
  for _ in range(5):
    next(iterator)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, {"x": jnp.zeros(1)}, data_iterator=iterator)
    ckpt.wait()
    expected = [next(iterator).tolist() for _ in range(3)]
    fresh = _iterator()
    ckpt.restore({"x": jnp.zeros(1)}, data_iterator=fresh)
    assert [next(fresh).tolist() for _ in range(3)] == expected


def test_data_state_of_another_host_count_is_refused_by_name(tmp_path):
  iterator = _iterator()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"x": jnp.zeros(1)}, data_iterator=iterator)
    ckpt.wait()
  data_dir = tmp_path / "1" / "data"
  (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="different number of hosts"):
      ckpt.restore({"x": jnp.zeros(1)}, data_iterator=_iterator())


_CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import jax.numpy as jnp
    from balcap import checkpoint
    directory = sys.argv[1]
    ckpt = checkpoint.Checkpointer(directory, async_save=True)
    ckpt.save(1, {"w": jnp.full((1024, 1024), 1.0)})
    ckpt.wait()
    # A large second checkpoint, written in the background; die as soon as it is under way.
    ckpt.save(2, {"w": jnp.full((1024, 1024), 2.0) + jnp.zeros((32, 1, 1))})
    while not [n for n in os.listdir(directory) if n.startswith("2") and n != "2"]:
      time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_save_killed_midway_is_never_loaded(tmp_path):
  process = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path)],
                           env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                           text=True, timeout=120)
  assert process.returncode == -signal.SIGKILL, process.stderr
  leftovers = [n for n in os.listdir(tmp_path) if n.startswith("2")]
  assert leftovers and "2" not in leftovers, f"the kill did not land mid-save: {leftovers}"
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.all_steps() == [1]
    restored = ckpt.restore({"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)})
    np.testing.assert_array_equal(restored["w"], np.ones((1024, 1024)))
  # Opening the directory again cleaned up the half-written save.
  assert [n for n in os.listdir(tmp_path) if n.startswith("2")] == []
