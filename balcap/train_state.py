"""The state a training stage carries from step to step, and checkpoints: params, optimizer
state, step counter, PRNG key. A plain dict pytree, so jit, donation and orbax treat it as is."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
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
  return {"params": policy.params, "opt_state": opt_state,
          "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
          "rng": jax.device_put(jax.random.key(seed), replicated)}
