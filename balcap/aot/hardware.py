"""Accelerators (peak bf16 FLOP/s, HBM bandwidth and capacity per chip) and compile targets.

A target is a list of devices to build the mesh from: a TPU slice described by libtpu (no TPU
needed: `pip install -e ".[tpu]"` brings libtpu; `jax.experimental.topologies` describes any
slice), or this process's own devices (`--xla_force_host_platform_device_count=N` simulates
N), with an accelerator named for the capacity and roofline (a GPU host, say).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One chip (one JAX device) as the roofline sees it."""
  name: str
  peak_flops: float      # dense bf16 FLOP/s
  hbm_bandwidth: float   # bytes/s
  hbm_bytes: float       # capacity
  source: str            # where the figures come from


# Dense (no sparsity) bf16 peaks, per chip as JAX counts devices (v4 and v5p in megacore mode:
# one device per chip, both TensorCores).
ACCELERATORS = {
    "v4": Accelerator("TPU v4", 275e12, 1228e9, 32 * GIB,
                      "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1228 GB/s"),
    "v5e": Accelerator("TPU v5e", 197e12, 819e9, 16 * GIB,
                       "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s"),
    "v5p": Accelerator("TPU v5p", 459e12, 2765e9, 95 * GIB,
                       "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 "
                       "GB/s"),
    "v6e": Accelerator("TPU v6e", 918e12, 1640e9, 32 * GIB,
                       "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM at 1640 GB/s"),
    "h100": Accelerator("H100 SXM 80GB", 989e12, 3.35e12, 80e9,
                        "NVIDIA H100 datasheet (SXM): 989 TFLOP/s dense bf16, 80 GB HBM3 at "
                        "3.35 TB/s"),
    "h200": Accelerator("H200 SXM 141GB", 989e12, 4.8e12, 141e9,
                        "NVIDIA H200 datasheet (SXM): 989 TFLOP/s dense bf16, 141 GB HBM3e at "
                        "4.8 TB/s"),
}

# Slice names as Cloud TPU uses them -> libtpu topology. v4 and v5p count TensorCores (2 per
# chip, megacore), v5e and v6e count chips (MaxText's table).
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_2D_SHAPES = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8"}


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for, and the chip they stand for."""
  name: str
  devices: tuple
  accelerator: Accelerator | None   # None: no capacity or roofline (a plain CPU run)


def tpu_topology(name: str) -> tuple[str, str, int]:
  """("v5e", "v5e:8x8", chips) for a slice name like "v5e-64" (or libtpu's "v5e:8x8")."""
  match = re.fullmatch(r"(v4|v5e|v5p|v6e)[-:](\S+)", name)
  if not match:
    raise ValueError(f"TPU topology {name!r}: use a slice name such as v5e-64, v5p-32, v4-32, "
                     f"v6e-64, or libtpu's form such as v5e:8x8")
  kind, size = match.groups()
  if "x" in size:
    return kind, f"{kind}:{size}", math.prod(int(d) for d in size.split("x"))
  chips = int(size) // _CORES_PER_CHIP[kind]
  shapes = _2D_SHAPES if kind in ("v5e", "v6e") else _3D_SHAPES
  if chips not in shapes:
    raise ValueError(f"TPU slice {name!r}: {chips} chips is not a size balcap knows; give the "
                     f"topology as {kind}:AxB{'xC' if shapes is _3D_SHAPES else ''}")
  return kind, f"{kind}:{shapes[chips]}", chips


def make_target(topology: str, accelerator: str = "") -> Target:
  """The devices and chip of `config.compile.topology` / `.accelerator`.

  topology "" uses this process's devices (simulate N with
  --xla_force_host_platform_device_count=N), for the chip `accelerator` names (h100, h200, a
  TPU kind; "" = none: memory and costs without capacity or roofline).
  """
  chip = None
  if accelerator:
    if accelerator not in ACCELERATORS:
      raise ValueError(f"config.compile.accelerator={accelerator!r} is not one of "
                       f"{sorted(ACCELERATORS)}")
    chip = ACCELERATORS[accelerator]
  if not topology:
    return Target(f"{len(jax.devices())} x {jax.devices()[0].platform}", tuple(jax.devices()),
                  chip)
  kind, libtpu_name, chips = tpu_topology(topology)
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    description = topologies.get_topology_desc(
        platform="tpu", topology_name=libtpu_name,
        chip_config_name="megacore" if kind == "v4" else "default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1)
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing or refusing)
    raise RuntimeError(
        f"cannot describe TPU topology {libtpu_name} ({type(e).__name__}: {e}); compiling for "
        "a TPU needs libtpu: pip install -e '.[tpu]'") from e
  devices = tuple(description.devices)
  if len(devices) != chips:
    raise RuntimeError(f"libtpu describes {len(devices)} devices for {libtpu_name}, expected "
                       f"{chips}")
  return Target(f"{topology} ({libtpu_name})", devices, chip or ACCELERATORS[kind])
