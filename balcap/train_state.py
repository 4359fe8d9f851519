"""The state a training stage carries from step to step, and checkpoints: params, optimizer
state, step counter, PRNG key. A plain dict pytree, so jit, donation and orbax treat it as is."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec


def initial_state(policy, optimizer: optax.GradientTransformation, seed: int) -> dict[str, Any]:
  """params, optimizer state, step and rng: everything a checkpoint must hold."""
  opt_state = jax.jit(optimizer.init)(policy.params)
  if policy.mesh is None:
    # Committed to one device like the step's outputs, so the second step does not recompile.
    device = jax.devices()[0]
    return jax.device_put({"params": policy.params, "opt_state": opt_state,
                           "step": jnp.zeros((), jnp.int32), "rng": jax.random.key(seed)},
                          device)
  replicated = NamedSharding(policy.mesh, PartitionSpec())
  # Built by jit with an output sharding, not device_put: with several hosts the mesh has
  # devices this process cannot address. Moments follow their params' shardings; leaves that
  # depend on no param (Adam's step count) would land on one device, and a restored
  # checkpoint must find every leaf on the mesh.
  on_mesh = lambda make: jax.jit(make, out_shardings=replicated)()
  opt_state = jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding) else on_mesh(
          lambda v=np.asarray(x): jnp.asarray(v)), opt_state)
  return {"params": policy.params, "opt_state": opt_state,
          "step": on_mesh(lambda: jnp.zeros((), jnp.int32)),
          "rng": on_mesh(lambda: jax.random.key(seed))}
