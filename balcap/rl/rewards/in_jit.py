"""Cheap, deterministic rewards inside a jitted step, through `jax.experimental.io_callback`.

    reward = in_jit(distinct_token_fraction, ("diversity",))
    components = jax.jit(reward)(tokens, lengths)  # {"diversity": [R] float32}

The host function receives numpy arrays and returns {name: [R] array}; the callback is
`ordered=False` (pure and deterministic: XLA may reorder or deduplicate it). Judges that make
requests or take time belong in `JudgeReward`, outside the jitted step, where they overlap
with device work instead of stalling it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

HostReward = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def in_jit(host_reward: HostReward, components: Sequence[str]
           ) -> Callable[[jax.Array, jax.Array], dict[str, jax.Array]]:
  """A jittable (tokens [R, N], lengths [R]) -> {component: [R] float32} from a host one."""
  components = tuple(components)

  def call_host(tokens, lengths):
    result = host_reward(np.asarray(tokens), np.asarray(lengths))
    missing = set(components) - set(result)
    if missing:
      raise ValueError(f"host reward returned {sorted(result)}, missing {sorted(missing)}")
    return {name: np.asarray(result[name], np.float32).reshape(lengths.shape)
            for name in components}

  def reward(tokens: jax.Array, lengths: jax.Array) -> dict[str, jax.Array]:
    shapes = {name: jax.ShapeDtypeStruct(lengths.shape, jnp.float32) for name in components}
    return io_callback(call_host, shapes, tokens, lengths, ordered=False)

  return reward


def distinct_token_fraction(tokens: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
  """An example host reward: distinct tokens / length of each rollout (1 = no repetition)."""
  out = np.zeros(lengths.shape, np.float32)
  for row, (sequence, length) in enumerate(zip(tokens, lengths)):
    if length:
      out[row] = len(set(sequence[:length].tolist())) / length
  return {"diversity": out}
