"""The Qwen2.5-VL vision tower (ViT with 2-D RoPE, window + full attention, 2x2 patch merger).

Host side, `vision_layout` turns the images' grids into static-shaped index arrays (rotary
positions, windows and images as padded batch dimensions); device side, `QwenVisionTower` is
one jittable function of (pixel patches, layout), so one compiled program serves every batch
of images whose layout fits the same padded sizes.

Patch order is the processor's: image by image, frame by frame, merge block by merge block
(row-major over the grid of `spatial_merge_size`**2 blocks), row-major inside a block. The
tower keeps that order throughout: the reference permutes tokens window-by-window and back,
which attention does not need (see `_grouped_attention`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from balcap.models import layers
from balcap.models.hf_io import Rule

# The fields of a layout (see `vision_layout`); every one is an array of static shape.
LAYOUT_FIELDS = ("position_ids", "window_index", "window_mask", "window_position",
                 "image_index", "image_mask", "image_position")


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
  """Field names follow the HF `vision_config`; defaults are the published Qwen2.5-VL ones."""
  depth: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  out_hidden_size: int  # the language model's width
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112  # pixels per window side: (112 // 14)**2 = 64 patches per window
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # the other blocks use windows
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6  # not in HF configs: the reference hard-codes 1e-6
  # Used by the LM's video position ids, not by the tower; kept so `to_hf` round-trips.
  tokens_per_second: int = 2
  dtype: str = "float32"        # activations and matmuls
  param_dtype: str = "float32"  # stored parameters
  remat: str = "none"           # layers.REMAT_POLICIES

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_features(self) -> int:
    """Values per flattened patch: channels x frames x pixels (1176 for 3 x 2 x 14 x 14)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    """Patches per merged feature (4 for 2x2 merging)."""
    return self.spatial_merge_size ** 2

  @property
  def window_blocks(self) -> int:
    """Merge blocks per window side, as the reference rounds it."""
    return self.window_size // self.spatial_merge_size // self.patch_size

  @property
  def window_len(self) -> int:
    """Patches per (full) window."""
    return self.window_blocks ** 2 * self.merge_unit

  def __post_init__(self):
    problems = []
    if self.hidden_size % self.num_heads:
      problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                      f"{self.num_heads}")
    elif self.head_dim % 4:
      problems.append(f"head_dim {self.head_dim} must be a multiple of 4 (2-D rotary)")
    if self.window_blocks < 1:
      problems.append(f"window_size {self.window_size} is smaller than one merge block "
                      f"({self.spatial_merge_size} x {self.patch_size} px)")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      problems.append(f"fullatt_block_indexes {bad} are not blocks of a depth-{self.depth} tower")
    if self.remat not in layers.REMAT_POLICIES:
      problems.append(f"remat {self.remat!r} is not one of {sorted(layers.REMAT_POLICIES)}")
    if problems:
      raise ValueError("invalid QwenVisionConfig: " + "; ".join(problems))

  @classmethod
  def from_hf(cls, vision_config: dict[str, Any], **overrides) -> QwenVisionConfig:
    """From an HF `vision_config` dict: transformers-5 (`in_channels`, `rope_parameters`) or
    published files (`in_chans`, no rope parameters). `overrides`: dtype, param_dtype, remat."""
    c = vision_config
    rope = c.get("rope_parameters") or {}
    # transformers keeps an old file's `in_chans` beside its own default `in_channels`, so the
    # old spelling, when present, is the file's value.
    in_channels = c.get("in_chans", c.get("in_channels", 3))
    return cls(depth=c["depth"], hidden_size=c["hidden_size"],
               intermediate_size=c["intermediate_size"], num_heads=c["num_heads"],
               out_hidden_size=c["out_hidden_size"], in_channels=int(in_channels),
               patch_size=int(c.get("patch_size", 14)),
               temporal_patch_size=int(c.get("temporal_patch_size", 2)),
               spatial_merge_size=int(c.get("spatial_merge_size", 2)),
               window_size=int(c.get("window_size", 112)),
               fullatt_block_indexes=tuple(c.get("fullatt_block_indexes", (7, 15, 23, 31))),
               hidden_act=c.get("hidden_act", "silu"),
               rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
               tokens_per_second=int(c.get("tokens_per_second", 2)), **overrides)

  def to_hf(self) -> dict[str, Any]:
    """The `vision_config` dict transformers 5 accepts (and writes)."""
    return dict(depth=self.depth, hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size, num_heads=self.num_heads,
                out_hidden_size=self.out_hidden_size, in_channels=self.in_channels,
                patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
                spatial_merge_size=self.spatial_merge_size, window_size=self.window_size,
                fullatt_block_indexes=list(self.fullatt_block_indexes),
                hidden_act=self.hidden_act, tokens_per_second=self.tokens_per_second,
                rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta})


# ---------------------------------------------------------------------------------------------
# Host side: the layout of a batch of images


def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def required_sizes(grid_thw: np.ndarray, config: QwenVisionConfig) -> dict[str, int]:
  """The smallest static sizes `vision_layout` accepts for these grids.

  `num_images` counts frames: like the reference, full attention spans one frame (an image
  has one; a video grid with t > 1 has t).
  """
  grid = _check_grid(grid_thw, config)
  t, h, w = grid.T
  blocks_h, blocks_w = h // config.spatial_merge_size, w // config.spatial_merge_size
  side = config.window_blocks
  windows = t * -(-blocks_h // side) * -(-blocks_w // side)
  return dict(num_patches=int((t * h * w).sum()), num_windows=int(windows.sum()),
              num_images=int(t.sum()), image_patches=int((h * w).max(initial=0)))


def worst_case_sizes(config: QwenVisionConfig, *, num_patches: int, num_images: int,
                     image_patches: int) -> dict[str, int]:
  """Static sizes that fit ANY batch of at most `num_patches` patches in `num_images` frames of
  at most `image_patches` patches each: one compiled program for a whole data set.

  An image of u merge blocks has ceil(bh / s) * ceil(bw / s) <= (u + s - 1) / s windows
  (s = window side in blocks; equality for a one-block-wide strip), hence the bound below.
  """
  num_patches = round_up(num_patches, config.merge_unit)
  blocks, side = num_patches // config.merge_unit, config.window_blocks
  num_windows = min(blocks, (blocks + num_images * (side - 1)) // side)
  return dict(num_patches=num_patches, num_windows=max(num_windows, 1),
              num_images=num_images, image_patches=image_patches)


def vision_layout(grid_thw: np.ndarray, config: QwenVisionConfig, *,
                  num_patches: int | None = None, num_windows: int | None = None,
                  num_images: int | None = None, image_patches: int | None = None
                  ) -> dict[str, np.ndarray]:
  """Every data-dependent index the tower needs, padded to static sizes (numpy, host side).

  grid_thw [N, 3]: (frames, patch rows, patch columns) per image; rows and columns multiples
  of spatial_merge_size. Sizes left None are what this batch needs (`required_sizes`). With
  P = num_patches, W = num_windows, L = config.window_len, I = num_images, S = image_patches:

    position_ids     [P, 2] int32  (row, column) of each patch in its image, for 2-D RoPE
    window_index     [W, L] int32  the patches of each attention window; padding -> P
    window_mask      [W, L] bool   True on real entries
    window_position  [P] int32     where each patch sits in window_index.reshape(-1);
                                   padding patches -> W * L (they take a zero row)
    image_index      [I, S] int32  the patches of each frame (full attention); padding -> P
    image_mask       [I, S] bool
    image_position   [P] int32     where each patch sits in image_index.reshape(-1); -> I * S

  Windows are the reference's (`get_vision_window_index`): per frame, squares of
  window_blocks x window_blocks merge blocks from the top-left, cut short at the right and
  bottom edges, in row-major order, each listing its blocks row-major (merge_unit patches
  each).
  Index P and row W * L (or I * S) are dummies the tower appends, so padding never reads or
  overwrites a real patch. Cost: linear in patches; Python loops over images only.
  """
  grid = _check_grid(grid_thw, config)
  need = required_sizes(grid, config)
  sizes = dict(num_patches=num_patches, num_windows=num_windows, num_images=num_images,
               image_patches=image_patches)
  sizes = {k: need[k] if v is None else int(v) for k, v in sizes.items()}
  small = [f"{k}={sizes[k]} < {need[k]}" for k in need if sizes[k] < need[k]]
  if small:
    raise ValueError(f"layout sizes too small for grids {grid.tolist()}: {', '.join(small)}")
  if sizes["num_patches"] % config.merge_unit:
    raise ValueError(f"num_patches={sizes['num_patches']} must be a multiple of "
                     f"{config.merge_unit} (patches per merged feature)")
  p = sizes["num_patches"]

  rows, cols, patches, windows, window_slots, frames, frame_slots = [], [], [], [], [], [], []
  offset = window_offset = frame_offset = 0
  for t, h, w in grid.tolist():
    r, c, win, slot = _image_patches(t, h, w, config)
    patches.append(offset + np.arange(t * h * w))
    rows.append(r)
    cols.append(c)
    windows.append(window_offset + win)
    window_slots.append(slot)
    frames.append(frame_offset + np.repeat(np.arange(t), h * w))
    frame_slots.append(np.tile(np.arange(h * w), t))
    offset += t * h * w
    window_offset += int(win.max()) + 1
    frame_offset += t
  cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
  patch = cat(patches)

  position_ids = np.zeros((p, 2), np.int32)
  position_ids[patch, 0], position_ids[patch, 1] = cat(rows), cat(cols)
  window_index, window_position = _scatter(patch, cat(windows), cat(window_slots), p,
                                           sizes["num_windows"], config.window_len)
  image_index, image_position = _scatter(patch, cat(frames), cat(frame_slots), p,
                                         sizes["num_images"], sizes["image_patches"])
  return dict(position_ids=position_ids,
              window_index=window_index, window_mask=window_index < p,
              window_position=window_position,
              image_index=image_index, image_mask=image_index < p, image_position=image_position)


def _check_grid(grid_thw: np.ndarray, config: QwenVisionConfig) -> np.ndarray:
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  m = config.spatial_merge_size
  bad = grid[(grid[:, 0] < 1) | (grid[:, 1] < m) | (grid[:, 2] < m)
             | (grid[:, 1] % m != 0) | (grid[:, 2] % m != 0)]
  if len(bad):
    raise ValueError(f"image grids {bad.tolist()}: t must be >= 1 and h, w positive multiples "
                     f"of spatial_merge_size {m}")
  return grid


def _image_patches(t: int, h: int, w: int, config: QwenVisionConfig):
  """For each patch of one image, in processor order: its row, column, window and slot in the
  window (vectorised over patches)."""
  m, side = config.spatial_merge_size, config.window_blocks
  blocks_h, blocks_w = h // m, w // m
  windows_h, windows_w = -(-blocks_h // side), -(-blocks_w // side)
  # [t, blocks_h, blocks_w, m, m]: processor order is block-major, row-major inside a block.
  frame, block_r, block_c, in_r, in_c = np.meshgrid(
      np.arange(t), np.arange(blocks_h), np.arange(blocks_w), np.arange(m), np.arange(m),
      indexing="ij")
  window = (frame * windows_h + block_r // side) * windows_w + block_c // side
  # A window cut short at the right edge is narrower; its blocks are listed row-major.
  width = np.minimum(side, blocks_w - (block_c // side) * side)
  block_slot = (block_r % side) * width + block_c % side
  slot = block_slot * m * m + in_r * m + in_c
  return ((block_r * m + in_r).ravel(), (block_c * m + in_c).ravel(), window.ravel(),
          slot.ravel())


def _scatter(patch, group, slot, num_patches, num_groups, group_len):
  """index [num_groups, group_len] of patches (dummy num_patches) and its inverse per patch
  (dummy num_groups * group_len)."""
  index = np.full((num_groups, group_len), num_patches, np.int32)
  index[group, slot] = patch
  position = np.full((num_patches,), num_groups * group_len, np.int32)
  position[patch] = group * group_len + slot
  return index, position


# ---------------------------------------------------------------------------------------------
# Device side


def rotary_angles(config: QwenVisionConfig, position_ids: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """cos, sin [P, head_dim] (float32) for (row, column) ids [P, 2].

  The reference's recomposition: the first quarter of a head's frequencies follows the row,
  the second the column, and the half is repeated (rotate_half pairs dim i with i + Dh/2).
  """
  inverse = layers.rotary_inverse_frequencies(config.head_dim // 2, config.rope_theta)
  angles = position_ids.astype(jnp.float32)[..., None] * inverse  # [P, 2, Dh/4]
  angles = angles.reshape(*angles.shape[:-2], -1)                  # [P, Dh/2]: rows, columns
  angles = jnp.concatenate([angles, angles], axis=-1)             # [P, Dh]
  return jnp.cos(angles), jnp.sin(angles)


def _grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array,
                       mask: jax.Array, position: jax.Array) -> jax.Array:
  """Attention inside groups of patches (windows or frames), [P, H, Dh] -> [P, H, Dh].

  Each patch keeps its own rotary angles (applied before the gather), and attention is
  permutation invariant given them, so gathering a group by index equals the reference's
  physical reordering of tokens window by window (and its inverse afterwards).
  """
  def gather(x):  # [P, H, Dh] -> [G, L, H, Dh]; index P reads an appended zero row
    return jnp.concatenate([x, jnp.zeros_like(x[:1])])[index]
  out = layers.attention(gather(q), gather(k), gather(v), mask[:, None, None, :])
  groups, length, heads, head_dim = out.shape
  out = out.reshape(groups * length, heads, head_dim)
  # Padding patches belong to no group: they read the appended zero row.
  return jnp.concatenate([out, jnp.zeros_like(out[:1])])[position]


class VisionAttention(nn.Module):
  config: QwenVisionConfig

  @nn.compact
  def __call__(self, x, full_attention, cos, sin, layout):
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    patches = x.shape[0]
    qkv = layers.Dense(3 * c.hidden_size, ("embed", "heads"), True, dtype, param_dtype,
                       name="qkv")(x)
    q, k, v = jnp.unstack(qkv.reshape(patches, 3, c.num_heads, c.head_dim), axis=1)
    q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    # The block's kind is data (scanned), so both kinds live in one compiled block and
    # lax.cond runs only the chosen one. The cond holds no parameters: only the attention
    # core, whose two layouts differ in shape.
    out = jax.lax.cond(
        full_attention,
        lambda: _grouped_attention(q, k, v, layout["image_index"], layout["image_mask"],
                                   layout["image_position"]),
        lambda: _grouped_attention(q, k, v, layout["window_index"], layout["window_mask"],
                                   layout["window_position"]))
    return layers.Dense(c.hidden_size, ("heads", "embed"), True, dtype, param_dtype,
                        name="proj")(out.reshape(patches, c.hidden_size))


class VisionBlock(nn.Module):
  """Pre-norm attention and gated MLP (both with biases), residuals; `(x, None)` for nn.scan."""
  config: QwenVisionConfig

  @nn.compact
  def __call__(self, x, full_attention, cos, sin, layout):
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    norm = lambda name: layers.RMSNorm(c.rms_norm_eps, dtype, param_dtype, name=name)
    x = x + VisionAttention(c, name="attn")(norm("norm1")(x), full_attention, cos, sin, layout)
    mlp = layers.GatedMLP(c.intermediate_size, c.hidden_act, True, dtype=dtype,
                          param_dtype=param_dtype, name="mlp")
    return x + mlp(norm("norm2")(x)), None


class PatchMerger(nn.Module):
  """Each merge block's spatial_merge_size**2 patches, concatenated -> one LM-width feature."""
  config: QwenVisionConfig

  @nn.compact
  def __call__(self, x):  # [P, D] -> [P / merge_unit, out_hidden_size]
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    width = c.hidden_size * c.merge_unit
    x = layers.RMSNorm(c.rms_norm_eps, dtype, param_dtype, name="ln_q")(x).reshape(-1, width)
    x = layers.Dense(width, ("embed", "mlp"), True, dtype, param_dtype, name="mlp_0")(x)
    x = layers.activation("gelu")(x)  # torch nn.GELU(): exact erf
    return layers.Dense(c.out_hidden_size, ("mlp", "embed"), True, dtype, param_dtype,
                        name="mlp_2")(x)


class QwenVisionTower(nn.Module):
  config: QwenVisionConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array, layout: dict[str, jax.Array]) -> jax.Array:
    """pixel_values [P, patch_features] (processor order, padded to the layout's P) -> merged
    features [P / merge_unit, out_hidden_size] in the processor's order (the reference's
    `pooler_output`); rows of padding patches are garbage but finite."""
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    # The conv3d has stride = kernel, so it is one matmul over each flattened patch.
    x = layers.Dense(c.hidden_size, (None, "embed"), False, dtype, param_dtype,
                     name="patch_embed")(pixel_values)  # [P, D]
    cos, sin = rotary_angles(c, layout["position_ids"])
    full_attention = np.isin(np.arange(c.depth), c.fullatt_block_indexes)  # [depth] bool
    block = layers.maybe_remat(VisionBlock, c.remat)
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.depth,
                     unroll=layers.scan_unroll(c.depth),
                     metadata_params={nn.PARTITION_NAME: "layers"})(c, name="blocks")
    layout = {k: layout[k] for k in LAYOUT_FIELDS}
    x, _ = blocks(x, jnp.asarray(full_attention), cos, sin, layout)
    return PatchMerger(c, name="merger")(x)


# ---------------------------------------------------------------------------------------------
# Checkpoint table


def vision_rules(param_prefix: str = "visual", hf_prefix: str = "visual.") -> tuple[Rule, ...]:
  """The tower's checkpoint table (the same names in published and transformers-5 files)."""
  def rule(hf: str, param: str, transform: str = "identity") -> Rule:
    return Rule((hf_prefix + hf,), f"{param_prefix}/{param}", transform)

  def linear(hf: str, param: str) -> tuple[Rule, Rule]:
    return rule(f"{hf}.weight", f"{param}/kernel", "transpose"), rule(f"{hf}.bias",
                                                                      f"{param}/bias")
  block = "blocks.{layer}"
  return (
      rule("patch_embed.proj.weight", "patch_embed/kernel", "flatten_conv"),
      rule(f"{block}.norm1.weight", "blocks/norm1/scale"),
      rule(f"{block}.norm2.weight", "blocks/norm2/scale"),
      *linear(f"{block}.attn.qkv", "blocks/attn/qkv"),
      *linear(f"{block}.attn.proj", "blocks/attn/proj"),
      *(r for p in ("gate_proj", "up_proj", "down_proj")
        for r in linear(f"{block}.mlp.{p}", f"blocks/mlp/{p}")),
      rule("merger.ln_q.weight", "merger/ln_q/scale"),
      *linear("merger.mlp.0", "merger/mlp_0"),
      *linear("merger.mlp.2", "merger/mlp_2"),
  )
