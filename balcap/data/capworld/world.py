"""CapWorld's world: the closed vocabulary, scenes of simple objects, and their atomic facts.

Every shape, colour, size, region, relation and label that CapWorld draws or writes is one of
the constants below; the renderer, the caption writers, the parser and the judge all read them
from here. A `Scene` is the exact scene graph of one image and `scene_facts` lists everything
that is true of it as atomic `Fact`s, which is what precision and recall are checked against.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "heart", "cross")

# Object colours: well apart in RGB and all dark or saturated enough to stand out from every
# background below, so a colour can be verified from a single pixel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "orange": (245, 130, 20),
    "yellow": (235, 200, 20),
    "green": (40, 150, 60),
    "teal": (0, 128, 128),
    "blue": (35, 85, 215),
    "purple": (130, 55, 180),
    "pink": (240, 110, 175),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
}

# Backgrounds are pale and never an object colour, so "the background is cream" and "a red
# circle" can never be confused by the parser or by eye.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "pale grey": (222, 222, 222),
    "cream": (246, 238, 214),
    "light blue": (214, 230, 246),
}

# Side of an object's bounding square as a fraction of the canvas' shorter side. Neighbouring
# sizes differ by about 1.5x, enough to tell them apart by eye.
SIZES: dict[str, float] = {"small": 0.13, "medium": 0.2, "large": 0.29}

# The canvas in thirds; an object's region is the cell holding its centre.
REGION_GRID = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
REGIONS = tuple(name for row in REGION_GRID for name in row)

# Relations as a caption may state them; a scene stores only the canonical two, the others are
# their converses ("A right of B" is "B left of A").
RELATIONS = ("left of", "right of", "above", "below")
CANONICAL_RELATIONS = ("left of", "above")
CONVERSE_RELATION = {"right of": "left of", "below": "above", "left of": "right of",
                     "above": "below"}

# Short uppercase words or letters printed under an object.
LABEL_WORDS = ("A", "B", "K", "X", "Z", "GO", "UP", "OK", "HI", "SUN", "CAT", "BOX", "FOX", "ZOO")
LABEL_PROBABILITY = 0.25

# Layout, all as fractions of the canvas so that every image size looks the same.
EDGE_MARGIN = 0.03        # of the shorter side: nothing closer to the border
OBJECT_GAP = 0.03         # of the shorter side: empty space between two footprints
REGION_MARGIN = 0.04      # of the axis: centres keep this far from the lines between thirds
RELATION_MARGIN = 0.12    # of the axis: centre distance needed before a relation is asserted
LABEL_FONT_FRACTION = 0.06   # of the shorter side: label font size in pixels
LABEL_CHAR_WIDTH = 0.8    # of the font size: a generous bound on one uppercase glyph's advance
MAX_PLACEMENT_TRIES = 200  # per object; sampling never loops forever


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One object: what it is, where its bounding square is (pixels), and its label if any."""
  shape: str
  colour: str
  size: str
  cx: int       # centre of the shape's bounding square, pixels from the left
  cy: int       # ... and from the top
  extent: int   # side of the bounding square, pixels (even)
  region: str   # the third of the canvas holding (cx, cy), one of REGIONS
  label: str | None = None

  @property
  def box(self) -> tuple[int, int, int, int]:
    """The shape's bounding square (left, top, right, bottom), right/bottom exclusive."""
    half = self.extent // 2
    return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclasses.dataclass(frozen=True)
class Scene:
  """The exact scene graph of one image."""
  width: int
  height: int
  background: str                        # one of BACKGROUNDS
  objects: tuple[SceneObject, ...]
  # (i, relation, j): object i is `relation` of object j; relation in CANONICAL_RELATIONS.
  relations: tuple[tuple[int, str, int], ...]


@dataclasses.dataclass(frozen=True)
class Fact:
  """One atomic, checkable statement about a scene (or, in a caption, about its entities).

  `kind` says which fields are used:
    object      subject, value=shape (None: "a shape" of unnamed kind)
    colour      subject, value=colour name
    size        subject, value=size name
    region      subject, value=region name
    label       subject, value=label text
    relation    subject, value="left of" | "above", other   (converses are normalised)
    count       value=n, shape (None: all objects), colour (None: any colour)
    background  value=background colour name
  In `scene_facts` the subject and other are object indices; in a caption's claims they are
  that caption's entity indices (see `claims.py`), grounded to objects by the writer.
  """
  kind: str
  subject: int | None = None
  value: str | int | None = None
  other: int | None = None
  shape: str | None = None
  colour: str | None = None


FACT_KINDS = ("object", "colour", "size", "region", "label", "relation", "count", "background")


def relation_fact(subject: int, relation: str, other: int) -> Fact:
  """The canonical fact for "subject is `relation` other", converses turned around."""
  if relation in CANONICAL_RELATIONS:
    return Fact("relation", subject, relation, other)
  return Fact("relation", other, CONVERSE_RELATION[relation], subject)


def fact_holds(fact: Fact, facts: frozenset[Fact] | set[Fact]) -> bool:
  """Whether a claim grounded to scene objects is true, `facts` being `scene_facts(scene)`.
  "A shape" of no named kind (object fact, value None) holds for whatever object it is
  grounded to; a relation with an ungrounded end never holds."""
  if fact.kind == "object" and fact.value is None:
    return fact.subject is not None
  if fact.kind == "relation" and (fact.subject is None or fact.other is None):
    return False
  return fact in facts


def region_of(cx: float, cy: float, width: int, height: int) -> str:
  """The region (third of the canvas in each axis) holding the point (cx, cy)."""
  column = min(int(3 * cx / width), 2)
  row = min(int(3 * cy / height), 2)
  return REGION_GRID[row][column]


def label_font_size(width: int, height: int) -> int:
  """Label font size in pixels for a canvas; at least 8 px so that labels stay legible."""
  return max(8, round(LABEL_FONT_FRACTION * min(width, height)))


def footprint(obj: SceneObject, width: int, height: int) -> tuple[int, int, int, int]:
  """Everything the object paints: its bounding square plus the label band under it."""
  left, top, right, bottom = obj.box
  if obj.label is None:
    return (left, top, right, bottom)
  font = label_font_size(width, height)
  text_half = int(np.ceil(LABEL_CHAR_WIDTH * font * len(obj.label) / 2)) + 1
  label_bottom = bottom + label_gap(font) + int(np.ceil(1.3 * font))
  return (min(left, obj.cx - text_half), top, max(right, obj.cx + text_half), label_bottom)


def label_gap(font_size: int) -> int:
  """Pixels between the bottom of a shape and the top of its label."""
  return max(2, font_size // 4)


def _boxes_apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
  return (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1]
          or b[3] + gap <= a[1])


def spatial_relations(objects: tuple[SceneObject, ...], width: int,
                      height: int) -> tuple[tuple[int, str, int], ...]:
  """Every relation a reader can verify by eye: the two shapes do not overlap along the axis
  at all, and their centres are at least RELATION_MARGIN of the axis apart."""
  relations = []
  for i, a in enumerate(objects):
    for j, b in enumerate(objects):
      if i == j:
        continue
      if a.box[2] <= b.box[0] and b.cx - a.cx >= RELATION_MARGIN * width:
        relations.append((i, "left of", j))
      if a.box[3] <= b.box[1] and b.cy - a.cy >= RELATION_MARGIN * height:
        relations.append((i, "above", j))
  return tuple(relations)


def _near_region_line(value: float, side: int) -> bool:
  return any(abs(value - side * k / 3) < REGION_MARGIN * side for k in (1, 2))


def _sample_object(rng: np.random.Generator, width: int, height: int,
                   placed: list[SceneObject], size_names: tuple[str, ...]) -> SceneObject | None:
  """One object that fits the canvas, keeps clear of `placed`, and is not a copy of any of
  them (shape, colour, size and region together always single an object out)."""
  short = min(width, height)
  edge, gap = int(EDGE_MARGIN * short), int(np.ceil(OBJECT_GAP * short))
  taken = {(o.shape, o.colour, o.size, o.region) for o in placed}
  boxes = [footprint(o, width, height) for o in placed]
  for _ in range(MAX_PLACEMENT_TRIES):
    size = size_names[rng.integers(len(size_names))]
    extent = 2 * max(4, round(SIZES[size] * short / 2))
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    label = (LABEL_WORDS[rng.integers(len(LABEL_WORDS))]
             if rng.random() < LABEL_PROBABILITY else None)
    cx = int(rng.integers(edge + extent // 2, width - edge - extent // 2 + 1))
    cy = int(rng.integers(edge + extent // 2, height - edge - extent // 2 + 1))
    if _near_region_line(cx, width) or _near_region_line(cy, height):
      continue
    obj = SceneObject(shape, colour, size, cx, cy, extent, region_of(cx, cy, width, height),
                      label)
    box = footprint(obj, width, height)
    inside = box[0] >= edge and box[1] >= edge and box[2] <= width - edge and (
        box[3] <= height - edge)
    if (inside and all(_boxes_apart(box, other, gap) for other in boxes)
        and (shape, colour, size, obj.region) not in taken):
      return obj
  return None


def sample_scene(rng: np.random.Generator, width: int, height: int, min_objects: int = 1,
                 max_objects: int = 6) -> Scene:
  """A random scene of min_objects..max_objects non-overlapping objects.

  Placement is rejection sampling with at most MAX_PLACEMENT_TRIES per object; when a crowded
  canvas has no room left, the scene keeps the objects placed so far (falling back to small
  ones to reach min_objects). Raises ValueError only if even that cannot reach min_objects.
  """
  if not 1 <= min_objects <= max_objects:
    raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
  num_objects = int(rng.integers(min_objects, max_objects + 1))
  background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
  placed: list[SceneObject] = []
  while len(placed) < num_objects:
    obj = _sample_object(rng, width, height, placed, tuple(SIZES))
    if obj is None and len(placed) < min_objects:
      obj = _sample_object(rng, width, height, placed, ("small",))
    if obj is None:
      break
    placed.append(obj)
  if len(placed) < min_objects:
    raise ValueError(f"cannot place {min_objects} objects on a {width}x{height} canvas")
  objects = tuple(placed)
  return Scene(width, height, background, objects, spatial_relations(objects, width, height))


def scene_to_json(scene: Scene) -> dict[str, Any]:
  """A plain JSON-able dict; `scene_from_json` inverts it exactly."""
  return {
      "width": scene.width,
      "height": scene.height,
      "background": scene.background,
      "objects": [dataclasses.asdict(o) for o in scene.objects],
      "relations": [list(r) for r in scene.relations],
  }


def scene_from_json(data: dict[str, Any]) -> Scene:
  """The Scene that `scene_to_json` wrote."""
  objects = tuple(SceneObject(**o) for o in data["objects"])
  relations = tuple((int(i), str(r), int(j)) for i, r, j in data["relations"])
  return Scene(int(data["width"]), int(data["height"]), str(data["background"]), objects,
               relations)


def scene_facts(scene: Scene) -> list[Fact]:
  """Every atomic fact that is true of the scene, subjects as object indices.

  Counts are exact ("two circles" means exactly two): one per shape present, one per colour
  and shape when more than one object shares both, and the total number of objects.
  """
  facts = [Fact("background", value=scene.background)]
  for i, o in enumerate(scene.objects):
    facts += [Fact("object", i, o.shape), Fact("colour", i, o.colour), Fact("size", i, o.size),
              Fact("region", i, o.region)]
    if o.label is not None:
      facts.append(Fact("label", i, o.label))
  facts += [Fact("relation", i, relation, j) for i, relation, j in scene.relations]
  facts.append(Fact("count", value=len(scene.objects)))
  for shape in SHAPES:
    same_shape = [o for o in scene.objects if o.shape == shape]
    if same_shape:
      facts.append(Fact("count", value=len(same_shape), shape=shape))
    for colour in COLOURS:
      same = sum(o.colour == colour for o in same_shape)
      if same > 1:
        facts.append(Fact("count", value=same, shape=shape, colour=colour))
  return facts
