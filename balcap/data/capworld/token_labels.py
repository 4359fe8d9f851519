"""Dense per-token labels of a CapWorld image: what each vision token shows, and where it is.

SFT can add an auxiliary "grounding" loss (`balcap.grounding`) that predicts these labels from
the policy's hidden states at the image tokens. A policy trained from scratch in minutes
otherwise learns captions' grammar long before it reads the image, and never reads shapes or
positions at all (README, the demo). The labels come from the exact scene graph:

- shape and colour of the object that covers most of the token's cell (class 0 = background,
  i.e. no object covers at least `MIN_COVER` of the cell);
- the cell's row and column in the token grid. Qwen2.5-VL's vision tower has no absolute
  position embedding (its 2-D RoPE is relative, and a background cell looks alike anywhere), so
  where an object is must come from the language model's M-RoPE positions; asking each token's
  hidden state for its row and column makes the model put it where a caption token can read it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from balcap.data.capworld.render import shape_polygons
from balcap.data.capworld.world import COLOURS, SHAPES, Scene

MIN_COVER = 0.2  # share of a cell an object must cover to name it: a sliver is background
FIELDS = ("shape", "colour", "row", "column")


def num_classes(grid_h: int, grid_w: int) -> dict[str, int]:
  """Classes per field for a grid of grid_h x grid_w tokens."""
  return {"shape": 1 + len(SHAPES), "colour": 1 + len(COLOURS), "row": grid_h,
          "column": grid_w}


def object_cover(scene: Scene, grid_h: int, grid_w: int) -> np.ndarray:
  """[objects, grid_h * grid_w] float32: the share of each token's cell that each object's
  shape covers (row-major cells of the canvas divided into grid_h x grid_w; labels excluded)."""
  cover = np.zeros((len(scene.objects), grid_h * grid_w), np.float32)
  for k, obj in enumerate(scene.objects):
    mask = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(mask)
    for polygon in shape_polygons(obj):  # the same polygons `render` fills
      draw.polygon([(round(x), round(y)) for x, y in polygon], fill=255)
    # BOX resampling averages every pixel of a cell: the share of it the object covers.
    cover[k] = np.asarray(mask.resize((grid_w, grid_h), Image.Resampling.BOX),
                          np.float32).reshape(-1) / 255.0
  return cover


def token_labels(scene: Scene, grid_h: int, grid_w: int) -> np.ndarray:
  """[grid_h * grid_w, 4] int32 labels (shape, colour, row, column), tokens in row-major order
  (the order Qwen2.5-VL's merged vision tokens take in the sequence). The canvas is divided
  into grid_h x grid_w equal cells, however the processor resizes the image."""
  cover = object_cover(scene, grid_h, grid_w).reshape(len(scene.objects), grid_h, grid_w)
  rows, columns = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  shape = np.zeros((grid_h, grid_w), np.int32)
  colour = np.zeros((grid_h, grid_w), np.int32)
  if scene.objects:
    best = cover.argmax(axis=0)
    covered = cover.max(axis=0) >= MIN_COVER
    shape_ids = np.array([1 + SHAPES.index(o.shape) for o in scene.objects], np.int32)
    colour_ids = np.array([1 + list(COLOURS).index(o.colour) for o in scene.objects], np.int32)
    shape = np.where(covered, shape_ids[best], 0)
    colour = np.where(covered, colour_ids[best], 0)
  return np.stack([shape, colour, rows, columns], axis=-1).reshape(-1, 4).astype(np.int32)
