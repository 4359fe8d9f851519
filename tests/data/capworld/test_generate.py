"""make_example is a pure function of (spec, split, index), in any process; the preview works."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from balcap.data.capworld import CapWorldSpec, make_example, render, scene_from_json
from balcap.data.capworld.preview import PADDING, cell_width

REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[3])
SPEC = CapWorldSpec(image_sizes=((224, 224), (336, 224)), seed=3)
INDICES = (0, 1, 17)

# Prints a digest of each example: image bytes and every string, as JSON.
DIGEST_SCRIPT = """
import hashlib, json, sys
from balcap.data.capworld import CapWorldSpec, make_example
spec = CapWorldSpec(image_sizes=((224, 224), (336, 224)), seed=3)
out = []
for index in (0, 1, 17):
  e = make_example(spec, "train", index)
  out.append([hashlib.sha256(e["image"].tobytes()).hexdigest(), e["id"], e["scene_graph"],
              e["references"], e["sft_caption"], e["sft_flaws"]])
print(json.dumps(out))
"""


def _digest(example):
  return [hashlib.sha256(example["image"].tobytes()).hexdigest(), example["id"],
          example["scene_graph"], example["references"], example["sft_caption"],
          example["sft_flaws"]]


def test_example_has_the_promised_fields():
  example = make_example(SPEC, "validation", 5)
  assert example["id"] == "capworld-validation-000005"
  assert isinstance(example["image"], Image.Image) and example["image"].mode == "RGB"
  assert example["image"].size == (example["width"], example["height"])
  assert (example["width"], example["height"]) in SPEC.image_sizes
  scene = scene_from_json(json.loads(example["scene_graph"]))
  assert render(scene).tobytes() == example["image"].tobytes()
  assert len(example["references"]) == SPEC.num_references
  assert len(set(example["references"])) == SPEC.num_references
  assert isinstance(example["sft_caption"], str) and example["sft_flaws"]
  assert all(isinstance(f, str) for f in example["sft_flaws"])


# Enough examples that set-iteration order would show: plan.py once picked shapes by
# iterating a set of names, which follows PYTHONHASHSEED.
HASH_SEED_SCRIPT = """
import hashlib, json
from balcap.data.capworld import CapWorldSpec, make_example
spec = CapWorldSpec(image_sizes=((112, 112),))
digest = hashlib.sha256()
for index in range(120):
  e = make_example(spec, "train", index)
  digest.update(json.dumps([e["references"], e["sft_caption"], e["sft_flaws"],
                            e["scene_graph"]]).encode())
print(digest.hexdigest())
"""


def test_examples_do_not_depend_on_the_python_hash_seed():
  digests = {subprocess.run([sys.executable, "-c", HASH_SEED_SCRIPT], capture_output=True,
                            text=True, check=True, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONHASHSEED": seed,
                                 "PYTHONPATH": REPO_ROOT}).stdout for seed in ("0", "5")}
  assert len(digests) == 1


def test_same_arguments_give_identical_examples_also_in_a_fresh_process():
  here = [_digest(make_example(SPEC, "train", index)) for index in INDICES]
  assert here == [_digest(make_example(SPEC, "train", index)) for index in INDICES]
  result = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT], capture_output=True, text=True,
                          check=True, cwd=REPO_ROOT,
                          # A different hash seed: nothing may depend on Python's hash().
                          env={**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": REPO_ROOT})
  assert json.loads(result.stdout) == here


def test_index_split_and_seed_each_change_the_example():
  base = make_example(SPEC, "train", 0)
  for other in (make_example(SPEC, "train", 1), make_example(SPEC, "test", 0),
                make_example(CapWorldSpec(image_sizes=SPEC.image_sizes, seed=4), "train", 0)):
    assert other["scene_graph"] != base["scene_graph"]
    assert other["image"].tobytes() != base["image"].tobytes()


def test_more_references_are_all_different():
  spec = CapWorldSpec(num_references=4, min_objects=1, max_objects=1)
  for index in range(20):
    references = make_example(spec, "train", index)["references"]
    assert len(set(references)) == 4


@pytest.mark.parametrize("bad", [dict(num_references=1), dict(image_sizes=((100, 224),)),
                                 dict(min_objects=3, max_objects=2), dict(image_sizes=()),
                                 dict(terse_share=1.5), dict(terse_share=-0.1)])
def test_invalid_spec_is_rejected(bad):
  with pytest.raises(ValueError):
    CapWorldSpec(**bad)


def test_preview_command_writes_a_contact_sheet(tmp_path):
  path = tmp_path / "sheet.png"
  result = subprocess.run([sys.executable, "-m", "balcap.data.capworld", "--preview",
                           str(path), "--num", "4", "--size", "168", "--columns", "2"],
                          capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
  assert result.stdout.strip() == str(path)
  sheet = Image.open(path)
  assert sheet.format == "PNG"
  assert sheet.width == 2 * cell_width(168)
  assert sheet.height > 2 * 168 + 2 * 100  # two rows of images, each with captions under it
  # The first cell shows the first example's image, centred at the top.
  pixels = np.asarray(sheet.convert("RGB"))
  image = np.asarray(make_example(CapWorldSpec(image_sizes=((168, 168),)), "train", 0)["image"])
  left = (cell_width(168) - 168) // 2
  assert (pixels[PADDING:PADDING + 168, left:left + 168] == image).all()
