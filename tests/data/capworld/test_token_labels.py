"""Per-token labels agree with the rendered pixels and with plain geometry."""

import numpy as np
import pytest

from balcap.data.capworld import COLOURS, SHAPES, Scene, SceneObject, render, sample_scene
from balcap.data.capworld.token_labels import MIN_COVER, num_classes, token_labels


def _scene(*objects, width=224, height=224):
  return Scene(width, height, "white", tuple(objects), ())


def _square(cx, cy, extent, colour="red"):
  return SceneObject("square", colour, "large", cx, cy, extent, "center")


def test_a_square_on_known_cells_labels_exactly_those_cells():
  # A square's drawn area is its box inset by 7% of the side: box [56, 112) -> ~[60, 108].
  scene = _scene(_square(84, 84, 56))
  labels = token_labels(scene, 8, 8).reshape(8, 8, 4)
  square, red = 1 + SHAPES.index("square"), 1 + list(COLOURS).index("red")
  # Cells of 28 px: rows/columns 2 and 3 span [56, 112), covered ~85% each.
  covered = np.zeros((8, 8), bool)
  covered[2:4, 2:4] = True
  np.testing.assert_array_equal(labels[..., 0], np.where(covered, square, 0))
  np.testing.assert_array_equal(labels[..., 1], np.where(covered, red, 0))
  np.testing.assert_array_equal(labels[..., 2], np.repeat(np.arange(8)[:, None], 8, axis=1))
  np.testing.assert_array_equal(labels[..., 3], np.repeat(np.arange(8)[None, :], 8, axis=0))


def test_a_sliver_under_min_cover_is_background_and_the_larger_cover_wins():
  # Box [28, 56): drawn ~[30, 54]; a second square whose drawn part reaches into the same cell
  # only slightly. Cell (1, 1) is [28, 56)^2: the first square covers ~74% of it.
  first = _square(42, 42, 28, "blue")
  second = _square(70, 42, 28, "green")  # drawn ~[58, 82] x [30, 54]: cell (1, 2) only
  labels = token_labels(_scene(first, second), 8, 8).reshape(8, 8, 4)
  blue, green = 1 + list(COLOURS).index("blue"), 1 + list(COLOURS).index("green")
  assert labels[1, 1, 1] == blue and labels[1, 2, 1] == green
  assert labels[0, 1, 1] == 0 and labels[1, 0, 1] == 0  # untouched neighbours
  # A cell an object covers less than MIN_COVER of is background. On a grid of 16 px cells
  # the blue square's drawn pixels (read back from the image) split over several cells.
  fine = token_labels(_scene(first), 14, 14).reshape(14, 14, 4)
  drawn = (np.asarray(render(_scene(first))) == COLOURS["blue"]).all(axis=-1)
  cover = drawn.reshape(14, 16, 14, 16).mean(axis=(1, 3))
  assert 0 < cover[cover > 0].min() < MIN_COVER  # the test covers both sides of the line
  np.testing.assert_array_equal(fine[..., 1] == blue, cover >= MIN_COVER)


@pytest.mark.parametrize("size,grid", [((224, 224), (8, 8)), ((336, 224), (8, 12)),
                                       ((168, 280), (10, 6))])
def test_labels_name_the_colour_of_the_pixels_in_each_cell(size, grid):
  width, height = size
  rng = np.random.default_rng(width + height)
  colours = {v: 1 + k for k, v in enumerate(COLOURS.values())}
  for _ in range(20):
    scene = sample_scene(rng, width, height)
    image = np.asarray(render(scene))
    labels = token_labels(scene, *grid).reshape(*grid, 4)
    cell_h, cell_w = height // grid[0], width // grid[1]
    for r in range(grid[0]):
      for c in range(grid[1]):
        pixels = image[r * cell_h:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w].reshape(-1, 3)
        counts = {}
        for rgb in map(tuple, pixels):
          if rgb in colours:
            counts[colours[rgb]] = counts.get(colours[rgb], 0) + 1
        top = max(counts, key=counts.get) if counts else 0
        share = counts.get(top, 0) / len(pixels)
        # Away from the threshold, the label is what the pixels show (labels are printed in
        # their own colour, never an object's, and objects never overlap).
        if share >= MIN_COVER + 0.05:
          assert labels[r, c, 1] == top, (scene, r, c, share)
        elif share <= MIN_COVER - 0.05:
          assert labels[r, c, 1] == 0, (scene, r, c, share)
        if labels[r, c, 1]:
          shapes = {1 + SHAPES.index(o.shape) for o in scene.objects
                    if colours[COLOURS[o.colour]] == labels[r, c, 1]}
          assert labels[r, c, 0] in shapes


def test_num_classes_counts_background_once():
  assert num_classes(8, 6) == {"shape": 1 + len(SHAPES), "colour": 1 + len(COLOURS), "row": 8,
                               "column": 6}
