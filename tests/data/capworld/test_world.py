"""CapWorld scenes and images agree with each other, checked from pixels and plain geometry."""

import json

import numpy as np
import pytest

from balcap.data.capworld import (BACKGROUNDS, COLOURS, REGIONS, Fact, render, sample_scene,
                                  scene_facts, scene_from_json, scene_to_json)
from balcap.data.capworld.render import label_font, label_position
from balcap.data.capworld.world import RELATION_MARGIN, footprint

SIZES_TO_TEST = ((224, 224), (112, 112), (336, 224), (168, 280))


def _scenes(count, size=(224, 224), seed=0):
  rng = np.random.default_rng(seed)
  return [sample_scene(rng, *size) for _ in range(count)]


def _region_by_hand(x, y, width, height):
  column = 0 if x < width / 3 else (1 if x < 2 * width / 3 else 2)
  row = 0 if y < height / 3 else (1 if y < 2 * height / 3 else 2)
  return REGIONS[3 * row + column]


@pytest.mark.parametrize("size", SIZES_TO_TEST)
def test_image_pixels_agree_with_the_scene_graph(size):
  for scene in _scenes(25, size, seed=size[0] + size[1]):
    image = np.asarray(render(scene))
    assert image.shape == (scene.height, scene.width, 3)
    assert tuple(image[0, 0]) == BACKGROUNDS[scene.background] or any(
        o.box[0] <= 0 for o in scene.objects)
    for obj in scene.objects:
      colour = np.array(COLOURS[obj.colour])
      # The centre pixel, and the pixels right around it, have the object's exact colour.
      assert (image[obj.cy - 1:obj.cy + 2, obj.cx - 1:obj.cx + 2] == colour).all(), obj
      left, top, right, bottom = obj.box
      assert 0 <= left < right <= scene.width and 0 <= top < bottom <= scene.height
      inside = (image[top:bottom, left:right] == colour).all(axis=-1).mean()
      assert inside > 0.3, (obj, inside)  # the shape fills a good part of its box
    # No pixel of an object colour outside the boxes of the objects with that colour.
    for name, rgb in COLOURS.items():
      mask = (image == np.array(rgb)).all(axis=-1)
      for obj in scene.objects:
        if obj.colour == name:
          left, top, right, bottom = obj.box
          mask[top:bottom, left:right] = False
      assert not mask.any(), f"{name} painted outside its objects"


def test_objects_do_not_overlap_and_stay_on_the_canvas():
  for scene in _scenes(200):
    boxes = [footprint(o, scene.width, scene.height) for o in scene.objects]
    for k, a in enumerate(boxes):
      assert 0 <= a[0] and 0 <= a[1] and a[2] <= scene.width and a[3] <= scene.height
      for b in boxes[k + 1:]:
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_labels_are_drawn_inside_the_object_footprint():
  for scene in _scenes(100):
    font = label_font(scene)
    for obj in scene.objects:
      if obj.label:
        x, y = label_position(obj, scene)
        left, top, right, bottom = font.getbbox(obj.label, anchor="mt")
        box = footprint(obj, scene.width, scene.height)
        assert box[0] <= x + left and x + right <= box[2] and y + bottom <= box[3]
        assert obj.box[3] <= y + top


def test_regions_agree_with_the_centre_coordinates():
  for size in SIZES_TO_TEST:
    for scene in _scenes(50, size):
      for obj in scene.objects:
        assert obj.region == _region_by_hand(obj.cx, obj.cy, scene.width, scene.height)


def test_stated_relations_agree_with_the_box_centres():
  seen = 0
  for scene in _scenes(200):
    for i, relation, j in scene.relations:
      a, b = scene.objects[i], scene.objects[j]
      if relation == "left of":
        assert a.cx + RELATION_MARGIN * scene.width <= b.cx and a.box[2] <= b.box[0]
      else:
        assert relation == "above"
        assert a.cy + RELATION_MARGIN * scene.height <= b.cy and a.box[3] <= b.box[1]
      seen += 1
  assert seen > 200


def test_scene_json_round_trip_is_exact():
  for scene in _scenes(50):
    data = json.loads(json.dumps(scene_to_json(scene)))
    assert scene_from_json(data) == scene


def test_object_counts_respect_the_bounds():
  rng = np.random.default_rng(3)
  counts = {len(sample_scene(rng, 224, 224, 2, 4).objects) for _ in range(100)}
  assert counts == {2, 3, 4}
  crowded = [sample_scene(rng, 112, 112, 6, 6) for _ in range(20)]
  assert all(1 <= len(s.objects) <= 6 for s in crowded)
  with pytest.raises(ValueError):
    sample_scene(rng, 224, 224, 3, 2)


def test_scene_facts_list_attributes_relations_counts_and_background():
  scene = _scenes(1, seed=5)[0]
  facts = scene_facts(scene)
  assert Fact("background", value=scene.background) in facts
  assert Fact("count", value=len(scene.objects)) in facts
  for i, obj in enumerate(scene.objects):
    for kind, value in (("object", obj.shape), ("colour", obj.colour), ("size", obj.size),
                        ("region", obj.region)):
      assert Fact(kind, i, value) in facts
  for shape in {o.shape for o in scene.objects}:
    number = sum(o.shape == shape for o in scene.objects)
    assert Fact("count", value=number, shape=shape) in facts
  assert len(facts) == len(set(facts))
