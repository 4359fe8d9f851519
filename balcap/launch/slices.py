"""TPU pod slices by name: the accelerator type gcloud wants, a runtime image, and the hosts.

`v5e-64` is what people say and what the pricing page lists; gcloud calls it `v5litepod-64`.
v4 and v5p names count TensorCores (2 per chip), v5e and v6e names count chips.
"""

from __future__ import annotations

import dataclasses
import re

# generation: (gcloud prefix, TensorCores per chip in the name, chips per host, runtime image)
_GENERATIONS = {
    "v4": ("v4-", 2, 4, "tpu-ubuntu2204-base"),
    "v5e": ("v5litepod-", 1, 4, "v2-alpha-tpuv5-lite"),
    "v5p": ("v5p-", 2, 4, "v2-alpha-tpuv5"),
    "v6e": ("v6e-", 1, 4, "v2-alpha-tpuv6e"),
}
_ALIASES = {"v5litepod": "v5e"}
# Single-host slices with more chips than a pod host has (a whole v5e / v6e host of 8).
_SINGLE_HOST_CHIPS = {"v5e": 8, "v6e": 8}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str              # as given, e.g. "v5e-64"
  accelerator_type: str  # gcloud's --accelerator-type, e.g. "v5litepod-64"
  runtime_version: str   # the default TPU VM image for this generation
  chips: int
  hosts: int

  def describe(self) -> str:
    return (f"{self.accelerator_type}: {self.chips} chips on {self.hosts} "
            f"host{'s' if self.hosts > 1 else ''}")


def parse(name: str) -> Slice:
  """`v5e-64`, `v5litepod-64`, `v4-32`, `v5p-128`, `v6e-16` -> a Slice; a clear error else."""
  match = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", name.strip().lower())
  if not match:
    raise ValueError(f"--accelerator={name!r}: expected a slice name such as v5e-64, v4-32, "
                     f"v5p-128 or v6e-16 (generations {sorted(_GENERATIONS)})")
  generation = _ALIASES.get(match.group(1), match.group(1))
  count = int(match.group(2))
  prefix, cores_per_chip, chips_per_host, runtime = _GENERATIONS[generation]
  if count % cores_per_chip:
    raise ValueError(f"--accelerator={name!r}: {generation} slice names count TensorCores "
                     f"({cores_per_chip} per chip), so the number must be even")
  chips = count // cores_per_chip
  if chips <= _SINGLE_HOST_CHIPS.get(generation, chips_per_host):
    hosts = 1
  elif chips % chips_per_host:
    raise ValueError(f"--accelerator={name!r}: {chips} chips do not fill whole hosts of "
                     f"{chips_per_host}")
  else:
    hosts = chips // chips_per_host
  return Slice(name, f"{prefix}{count}", runtime, chips, hosts)
