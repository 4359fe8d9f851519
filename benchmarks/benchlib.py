"""What every benchmark measures the same way: peak memory, best-of-N time, machine peaks."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def resident_bytes(field: str = "VmRSS:") -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field):
        return int(line.split()[1]) * 1024
  return 0


def measured(run, repeats: int = 3) -> tuple[float, int]:
  """(best seconds of `repeats` calls, peak resident bytes above the level before them).

  The best, not the mean: this is a shared machine, and other tenants only ever add time.
  """
  run()  # compile / warm up
  before = resident_bytes()
  with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
    f.write("5")  # reset the peak
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - start)
  return best, resident_bytes("VmHWM:") - before


def machine_peaks() -> tuple[float, float]:
  """fp32 matmul FLOP/s (2048^3) and streaming matrix-vector bytes/s (256 MB matrix)."""
  a = jnp.ones((2048, 2048), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  seconds, _ = measured(lambda: matmul(a).block_until_ready(), 10)
  flops = 2 * 2048 ** 3 / seconds
  w = jnp.ones((8192, 8192), jnp.float32)
  x = jnp.ones((8192,), jnp.float32)
  matvec = jax.jit(lambda w, x: w @ x)
  seconds, _ = measured(lambda: matvec(w, x).block_until_ready(), 10)
  return flops, w.nbytes / seconds
