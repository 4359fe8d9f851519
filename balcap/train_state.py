"""The state a training stage carries from step to step, and checkpoints: params, optimizer
state, step counter, PRNG key. A plain dict pytree, so jit, donation and orbax treat it as is."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from balcap import optim


def initial_state(policy, optimizer: optax.GradientTransformation, seed: int) -> dict[str, Any]:
  """params, optimizer state, step and rng: everything a checkpoint must hold."""
  if policy.mesh is None:
    opt_state = jax.jit(optimizer.init)(policy.params)
    # Committed to one device like the step's outputs, so the second step does not recompile.
    device = jax.devices()[0]
    return jax.device_put({"params": policy.params, "opt_state": opt_state,
                           "step": jnp.zeros((), jnp.int32), "rng": jax.random.key(seed)},
                          device)
  replicated = NamedSharding(policy.mesh, PartitionSpec())
  # Built by jit with output shardings, not device_put: with several hosts the mesh has
  # devices this process cannot address. Moments are sharded like their params (left to XLA,
  # zeros that depend on no param may be replicated: `optim.state_shardings`); the rest
  # (Adam's step count) is replicated, so a restored checkpoint finds every leaf on the mesh.
  on_mesh = lambda make: jax.jit(make, out_shardings=replicated)()  # noqa: E731
  opt_state = jax.jit(optimizer.init, out_shardings=optim.state_shardings(
      optimizer, policy.params, replicated))(policy.params)
  return {"params": policy.params, "opt_state": opt_state,
          "step": on_mesh(lambda: jnp.zeros((), jnp.int32)),
          "rng": on_mesh(lambda: jax.random.key(seed))}
