"""Images grouped by the batch shard whose rows hold them: each device encodes only its own.

A batch's rows are split over the mesh's batch axes in contiguous blocks (`parallel`), S blocks
in all. The image inputs of a batch are laid out the same way: a leading axis of S image
shards, shard s holding the images of block s's rows (padded to one size), split over the
batch axes like the rows. So the vision tower runs data-parallel, each device on its block's
images only, and a row's image features are on the device that holds the row; each row's
`image_row_offsets` entry counts features from the start of its OWN shard's table.

This is also why the layout survives G rollouts and strided micro-batches: prompt p's G rows
are the G consecutive rows p*G ... p*G+G-1, so when B prompts split into S blocks, their
B*G rollouts split into S blocks with the same prompts; a strided micro-batch (every M-th row)
keeps each row in its block (see `rl/update.py`).

The helpers are host side (numpy: each host lays out its own rows' images and no host sees
another's), except `constrain`, which the models apply to image shards on the devices.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np


def constrain(x: jax.Array) -> jax.Array:
  """Image shards [S, ...] split over the batch axes like the rows they serve (a no-op
  without a mesh): each device encodes its own rows' images."""
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def rows_per_shard(rows: int, shards: int) -> int:
  """Rows in each of `shards` blocks; a clear error when they do not divide."""
  if shards < 1:
    raise ValueError(f"image_shards={shards} must be >= 1")
  if rows % shards:
    raise ValueError(f"a batch of {rows} rows does not split into {shards} image shards (the "
                     "mesh's batch shards on this host): make the per-host batch a multiple "
                     f"of {shards}")
  return rows // shards


def image_shard_of(features_per_row: np.ndarray, features_per_image: np.ndarray,
                   shards: int) -> np.ndarray:
  """[N] the shard of each image, given each row's image-feature count (rows' images are in
  row order, as processors emit them) and each image's feature count.

  An image belongs to the row whose features contain its first one; every image's features
  must lie within one row (raises naming the image otherwise)."""
  per_shard = rows_per_shard(len(features_per_row), shards)
  row_end = np.cumsum(features_per_row)
  image_start = np.cumsum(features_per_image) - features_per_image
  image_end = image_start + features_per_image
  rows = np.searchsorted(row_end, image_start, side="right")
  straddling = np.flatnonzero((rows >= len(row_end))
                              | (image_end > row_end[np.minimum(rows, len(row_end) - 1)]))
  if straddling.size:
    raise ValueError(f"image {int(straddling[0])} does not fit in one row's image tokens "
                     f"(features per row {np.asarray(features_per_row).tolist()}, per image "
                     f"{np.asarray(features_per_image).tolist()})")
  return (rows // per_shard).astype(np.int64)


def row_offsets(features_per_row: np.ndarray, shards: int) -> np.ndarray:
  """[R] int32: where each row's first image feature is in its own shard's feature table."""
  per_shard = rows_per_shard(len(features_per_row), shards)
  counts = np.asarray(features_per_row, np.int64).reshape(shards, per_shard)
  return (np.cumsum(counts, axis=1) - counts).reshape(-1).astype(np.int32)


def stack_padded(parts: list[np.ndarray], length: int) -> np.ndarray:
  """[S, length, ...]: each part [n_s, ...] zero-padded at the end to `length` rows."""
  first = parts[0]
  out = np.zeros((len(parts), length) + first.shape[1:], first.dtype)
  for s, part in enumerate(parts):
    if part.shape[0] > length:
      raise ValueError(f"image shard {s} has {part.shape[0]} entries, more than the padded "
                       f"size {length}")
    out[s, :part.shape[0]] = part
  return out
