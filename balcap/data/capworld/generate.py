"""One CapWorld example from (spec, split, index): image, scene graph, references, SFT caption.

Everything is a pure function of its arguments: the random streams are seeded from the spec's
seed, a CRC of the split name and the index (never Python's per-process `hash`), so any
process, any host, any time produces byte-identical images and identical strings. The TFDS
builder (`builder.py`) and the preview both call `make_example`.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any

import numpy as np

from balcap.data.capworld.flaws import write_sft_caption
from balcap.data.capworld.grammar import write_reference
from balcap.data.capworld.render import render
from balcap.data.capworld.world import sample_scene, scene_to_json

IMAGE_SIDE_MULTIPLE = 28  # Qwen2.5-VL merges 2x2 patches of 14 px
# Independent random streams, so that a change to the caption writers leaves the scenes (and
# a change to the SFT writer leaves the references) of every example as they were.
_SCENE_STREAM, _REFERENCE_STREAM, _SFT_STREAM = 0, 1, 2
_MAX_REFERENCE_TRIES = 50


@dataclasses.dataclass(frozen=True)
class CapWorldSpec:
  """The parameters of a CapWorld data set; equal specs give equal data."""
  image_sizes: tuple[tuple[int, int], ...] = ((224, 224),)  # (width, height), one drawn per example
  min_objects: int = 1
  max_objects: int = 6
  num_references: int = 2  # reference captions per image, each different (>= 2)
  seed: int = 0
  # Share of SFT captions that are too_short on purpose (flaws.write_sft_caption): a terse
  # captioner leaves out facts it could see, which only a recall reward teaches it to say.
  terse_share: float = 0.0

  def __post_init__(self):
    problems = []
    if not self.image_sizes:
      problems.append("image_sizes is empty")
    for size in self.image_sizes:
      if len(size) != 2 or any(int(s) <= 0 or int(s) % IMAGE_SIDE_MULTIPLE for s in size):
        problems.append(f"image_sizes entry {size!r} must be (width, height), positive "
                        f"multiples of {IMAGE_SIDE_MULTIPLE}")
    if not 1 <= self.min_objects <= self.max_objects:
      problems.append(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, "
                      f"{self.max_objects}")
    if not 0.0 <= self.terse_share <= 1.0:
      problems.append(f"terse_share={self.terse_share} must be in [0, 1]")
    if self.num_references < 2:
      problems.append(f"num_references={self.num_references} must be >= 2")
    if problems:
      raise ValueError("invalid CapWorldSpec: " + "; ".join(problems))


def spec_from_config(world) -> CapWorldSpec:
  """The spec `config.data.capworld` describes (raises ValueError naming a bad field)."""
  return CapWorldSpec(image_sizes=tuple(tuple(s) for s in world.image_sizes),
                      min_objects=world.min_objects, max_objects=world.max_objects,
                      num_references=world.num_references, seed=world.seed,
                      terse_share=float(world.get("terse_share", 0.0)))


def example_rng(spec: CapWorldSpec, split: str, index: int, stream: int) -> np.random.Generator:
  """The random stream `stream` of one example; stable across processes and machines."""
  return np.random.default_rng([spec.seed, zlib.crc32(split.encode("utf-8")), index, stream])


def make_example(spec: CapWorldSpec, split: str, index: int) -> dict[str, Any]:
  """The example `index` of `split`: a dict with id, image (PIL), width, height, scene_graph
  (JSON string), references (list of str), sft_caption (str) and sft_flaws (list of str)."""
  rng = example_rng(spec, split, index, _SCENE_STREAM)
  width, height = spec.image_sizes[int(rng.integers(len(spec.image_sizes)))]
  scene = sample_scene(rng, int(width), int(height), spec.min_objects, spec.max_objects)

  rng = example_rng(spec, split, index, _REFERENCE_STREAM)
  references: list[str] = []
  for _ in range(_MAX_REFERENCE_TRIES):
    text = write_reference(scene, rng).text
    if text not in references:
      references.append(text)
    if len(references) == spec.num_references:
      break
  else:
    raise RuntimeError(f"could not write {spec.num_references} different references for "
                       f"{split}[{index}]")

  sft = write_sft_caption(scene, example_rng(spec, split, index, _SFT_STREAM),
                          reference_words=len(references[0].split()),
                          terse_share=spec.terse_share)
  return {
      "id": f"capworld-{split}-{index:06d}",
      "image": render(scene),
      "width": scene.width,
      "height": scene.height,
      "scene_graph": json.dumps(scene_to_json(scene), sort_keys=True),
      "references": references,
      "sft_caption": sft.text,
      "sft_flaws": list(sft.flaws),
  }
