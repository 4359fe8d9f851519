"""Small benchmark folders in each benchmark's published layout (benchmark_data.LAYOUTS)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def _image(path: str, seed: int) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 255, (32, 48, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)


def decapbench(folder: str, count: int = 2) -> str:
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "human_annotated_oracle_facts.jsonl"), "w") as f:
    for i in range(count):
      name = f"dc{i}.jpg"
      _image(os.path.join(folder, "images", name), i)
      f.write(json.dumps({"image_name": name, "oracle_caption": f"A red cube {i}. A blue ball.",
                          "oracle_facts": [f"a red cube {i}", "a blue ball", "a wooden table"]})
              + "\n")
  return folder


def captionqa(folder: str, count: int = 2) -> str:
  os.makedirs(folder, exist_ok=True)
  rows = []
  for i in range(count):
    _image(os.path.join(folder, "images", f"{i}.jpg"), 10 + i)
    rows.append({"id": f"nat_{i:03d}", "domain": "natural" if i % 2 == 0 else "document",
                 "image_paths": [f"images/{i}.jpg"],
                 "questions": [
                     {"question": "What color is the cube?",
                      "choices": ["Red", "Green", "Blue"], "answer": "Red",
                      "category": ["Attribute - Color"]},
                     {"question": "Is there a ball?", "choices": ["Yes", "No"], "answer": "Yes",
                      "category": ["Object Existence"]},
                     {"question": "How many dogs are there?", "choices": ["1", "2", "3", "4"],
                      "answer": "2", "category": ["Counting"]}]})
  with open(os.path.join(folder, "natural.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return folder


def caparena(folder: str, count: int = 3) -> str:
  os.makedirs(folder, exist_ok=True)
  data = {}
  for i in range(count):
    name = f"ca{i}.jpg"
    _image(os.path.join(folder, "images", name), 20 + i)
    data[name] = {"captions": {"human": f"A red cube {i} beside a blue ball.",
                               "gpt": f"gpt caption {i}", "cog": f"cog caption {i}",
                               "cpm": f"cpm caption {i}"},
                  "ref_model": ("gpt", "cog", "cpm")[i % 3]}
  with open(os.path.join(folder, "caparena_auto_600.json"), "w") as f:
    json.dump(data, f)
  return folder
