"""Draws a CapWorld scene graph as an RGB image, exactly and deterministically.

Shapes are filled polygons without anti-aliasing, so every interior pixel has its object's
colour exactly (the consistency tests read colours back from single pixels). Every length is
derived from the object's bounding square or the canvas, so all image sizes look alike.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

from balcap.data.capworld.world import (BACKGROUNDS, COLOURS, Scene, SceneObject, label_font_size,
                                        label_gap)

LABEL_COLOUR = (30, 30, 30)
Point = tuple[float, float]


def _regular_polygon(cx: float, cy: float, radius: float, sides: int,
                     start_degrees: float) -> list[Point]:
  return [(cx + radius * math.cos(math.radians(start_degrees + 360 * k / sides)),
           cy + radius * math.sin(math.radians(start_degrees + 360 * k / sides)))
          for k in range(sides)]


def _star(cx: float, cy: float, radius: float) -> list[Point]:
  """Five points, the top one straight up; a fat inner radius keeps the star readable small."""
  points = []
  for k in range(10):
    r = radius if k % 2 == 0 else 0.48 * radius
    angle = math.radians(-90 + 36 * k)
    points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
  return points


def _heart(left: float, top: float, side: float) -> list[Point]:
  """The classic parametric heart, scaled to fill the square from `left`, `top`."""
  raw = []
  for k in range(72):
    t = 2 * math.pi * k / 72
    x = 16 * math.sin(t) ** 3
    y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
    raw.append((x, y))
  xs, ys = [p[0] for p in raw], [p[1] for p in raw]
  width, height = max(xs) - min(xs), max(ys) - min(ys)
  scale = side / max(width, height)
  # Centre the curve's bounding box in the square: the box centre lies inside the heart.
  dx = left + (side - width * scale) / 2 - min(xs) * scale
  dy = top + (side - height * scale) / 2 - min(ys) * scale
  return [(x * scale + dx, y * scale + dy) for x, y in raw]


def shape_polygons(obj: SceneObject) -> list[list[Point]]:
  """The filled polygons (pixel coordinates) that draw one object's shape."""
  left, top, right, bottom = obj.box
  side = right - left - 1  # the last pixel row/column of the square is right - 1
  # The square's true centre (half a pixel before obj.cx/cy, as the side is even).
  cx, cy, radius = left + side / 2, top + side / 2, side / 2
  if obj.shape == "circle":
    return [_regular_polygon(cx, cy, radius, 64, 0)]
  if obj.shape == "square":
    inset = 0.07 * side  # a full square looks bigger than a circle of the same extent
    return [[(left + inset, top + inset), (left + side - inset, top + inset),
             (left + side - inset, top + side - inset), (left + inset, top + side - inset)]]
  if obj.shape == "triangle":
    return [[(cx, top), (left + side, top + side), (left, top + side)]]
  if obj.shape == "star":
    return [_star(cx, cy, radius)]
  if obj.shape == "diamond":
    half_width = 0.38 * side
    return [[(cx, top), (cx + half_width, cy), (cx, top + side), (cx - half_width, cy)]]
  if obj.shape == "hexagon":
    return [_regular_polygon(cx, cy, radius, 6, 0)]
  if obj.shape == "heart":
    return [_heart(left, top, side)]
  if obj.shape == "cross":
    arm = 0.17 * side
    return [[(cx - arm, top), (cx + arm, top), (cx + arm, top + side), (cx - arm, top + side)],
            [(left, cy - arm), (left + side, cy - arm), (left + side, cy + arm),
             (left, cy + arm)]]
  raise ValueError(f"unknown shape {obj.shape!r}")


def label_font(scene: Scene) -> ImageFont.FreeTypeFont:
  """The font labels are printed in, sized for the canvas."""
  return ImageFont.load_default(size=label_font_size(scene.width, scene.height))


def label_position(obj: SceneObject, scene: Scene) -> tuple[int, int]:
  """Middle-top anchor of the object's label: centred under the shape."""
  return (obj.cx, obj.box[3] + label_gap(label_font_size(scene.width, scene.height)))


def render(scene: Scene) -> Image.Image:
  """The scene as an RGB image of exactly scene.width x scene.height pixels."""
  image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
  draw = ImageDraw.Draw(image)
  font = label_font(scene) if any(o.label for o in scene.objects) else None
  for obj in scene.objects:
    for polygon in shape_polygons(obj):
      draw.polygon([(round(x), round(y)) for x, y in polygon], fill=COLOURS[obj.colour])
    if obj.label is not None:
      draw.text(label_position(obj, scene), obj.label, fill=LABEL_COLOUR, font=font,
                anchor="mt")
  return image
