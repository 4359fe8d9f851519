"""The evaluation benchmarks read from local folders in their published layouts.

Nothing is downloaded: place each benchmark's released files in a folder and point the eval
config at it. A missing or malformed folder is one `BenchmarkDataError` naming the file, the
item and the layout expected (`LAYOUTS` below: DeCapBench for DCScore, CaptionQA,
CapArena-Auto).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

from balcap import configs, paths

DECAPBENCH_FILE = "human_annotated_oracle_facts.jsonl"
CAPARENA_FILE = "caparena_auto_600.json"
IMAGES = "images"

# What each benchmark's folder holds: printed by every error about it.
LAYOUTS = {
    "DeCapBench": """\
  <folder>/human_annotated_oracle_facts.jsonl, one JSON object a line:
      {"image_name": "x.jpg", "oracle_caption": "...", "oracle_facts": ["...", ...]}
  <folder>/images/x.jpg""",
    # One row per image, as the released data set's rows; JSON Lines or a JSON list, in any
    # number of files (e.g. one per domain).
    "CaptionQA": """\
  <folder>/*.jsonl or *.json, one row per image:
      {"id": "nat_001", "domain": "natural", "image_paths": ["images/1.jpg"],
       "questions": [{"question": "...", "choices": ["...", ...],
                      "answer": "<one of the choices>", "category": ["..."]}, ...]}
  <folder>/images/1.jpg (image_paths are relative to the folder)""",
    "CapArena-Auto": """\
  <folder>/caparena_auto_600.json:
      {"<image name>": {"captions": {"human": "...", "gpt": "...", "cog": "...",
                                     "cpm": "..."}, "ref_model": "gpt"}, ...}
  <folder>/images/<image name>""",
}


class BenchmarkDataError(configs.BalcapError, ValueError):
  """A benchmark folder that does not hold its published layout."""


def _fail(benchmark: str, where: str, problem: str) -> BenchmarkDataError:
  return BenchmarkDataError(f"{benchmark}: {where}: {problem}. Expected layout:\n"
                            f"{LAYOUTS[benchmark]}")


def _require(benchmark: str, where: str, record: Any, field: str, kind: type | tuple) -> Any:
  if not isinstance(record, dict):
    raise _fail(benchmark, where, f"is {type(record).__name__}, not a JSON object")
  if field not in record:
    raise _fail(benchmark, where, f"has no field {field!r} (fields: {sorted(record)})")
  value = record[field]
  if not isinstance(value, kind):
    names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
    raise _fail(benchmark, where, f"field {field!r} is {type(value).__name__}, not {names}")
  return value


def _image(benchmark: str, folder: str, relative: str, where: str) -> str:
  path = os.path.join(folder, relative)
  if not paths.isfile(path):
    raise _fail(benchmark, where, f"image {path} does not exist")
  return path


def _folder(benchmark: str, folder: str) -> str:
  if not folder or not paths.isdir(folder):
    raise _fail(benchmark, f"folder {folder!r}", "does not exist")
  return folder


def _jsonl(benchmark: str, path: str) -> Iterator[tuple[str, Any]]:
  with paths.open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield f"{path} line {number}", json.loads(line)
      except json.JSONDecodeError as e:
        raise _fail(benchmark, f"{path} line {number}", f"is not JSON ({e})") from None


# --- DeCapBench ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecapItem:
  id: str                 # the image name
  image_path: str
  oracle_caption: str
  oracle_facts: tuple[str, ...]


def load_decapbench(folder: str) -> list[DecapItem]:
  name = "DeCapBench"
  path = os.path.join(_folder(name, folder), DECAPBENCH_FILE)
  if not paths.isfile(path):
    raise _fail(name, path, "does not exist")
  items, seen = [], set()
  for where, record in _jsonl(name, path):
    image = _require(name, where, record, "image_name", str)
    caption = _require(name, where, record, "oracle_caption", str)
    facts = _require(name, where, record, "oracle_facts", list)
    if not facts or not all(isinstance(f, str) and f.strip() for f in facts):
      raise _fail(name, where, "oracle_facts must be a non-empty list of non-empty strings")
    if image in seen:
      raise _fail(name, where, f"image {image!r} appears twice")
    seen.add(image)
    items.append(DecapItem(image, _image(name, folder, os.path.join(IMAGES, image), where),
                           caption, tuple(facts)))
  if not items:
    raise _fail(name, path, "holds no items")
  return items


# --- CaptionQA -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Question:
  id: str                 # "<image id>/<index>"
  question: str
  choices: tuple[str, ...]
  answer: str
  categories: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CaptionQAImage:
  id: str
  image_path: str
  domain: str
  questions: tuple[Question, ...]


def _captionqa_rows(path: str) -> Iterator[tuple[str, Any]]:
  if path.endswith(".jsonl"):
    yield from _jsonl("CaptionQA", path)
    return
  with paths.open(path) as f:
    try:
      rows = json.load(f)
    except json.JSONDecodeError as e:
      raise _fail("CaptionQA", path, f"is not JSON ({e})") from None
  if not isinstance(rows, list):
    raise _fail("CaptionQA", path, "is not a JSON list of rows")
  for number, row in enumerate(rows):
    yield f"{path} row {number}", row


def load_captionqa(folder: str) -> list[CaptionQAImage]:
  name = "CaptionQA"
  files = sorted(paths.glob(_folder(name, folder), "*.jsonl") + paths.glob(folder, "*.json"))
  if not files:
    raise _fail(name, folder, "holds no *.jsonl or *.json files")
  images, seen = [], set()
  for path in files:
    for where, row in _captionqa_rows(path):
      image_id = str(_require(name, where, row, "id", (str, int)))
      domain = _require(name, where, row, "domain", str)
      listed = _require(name, where, row, "image_paths", list)
      if len(listed) != 1 or not isinstance(listed[0], str):
        raise _fail(name, where, f"image_paths must name exactly one image, got {listed!r}")
      if image_id in seen:
        raise _fail(name, where, f"image id {image_id!r} appears twice")
      seen.add(image_id)
      questions = []
      for k, q in enumerate(_require(name, where, row, "questions", list)):
        at = f"{where} question {k}"
        text = _require(name, at, q, "question", str)
        choices = [str(c) for c in _require(name, at, q, "choices", list)]
        answer = str(_require(name, at, q, "answer", (str, int)))
        if len(choices) < 2 or answer not in choices:
          raise _fail(name, at, f"answer {answer!r} is not one of at least two choices "
                                f"{choices}")
        category = q.get("category", [])
        categories = tuple(category) if isinstance(category, list) else (str(category),)
        questions.append(Question(f"{image_id}/{k}", text, tuple(choices), answer, categories))
      images.append(CaptionQAImage(image_id, _image(name, folder, listed[0], where), domain,
                                   tuple(questions)))
  return images


# --- CapArena-Auto ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CapArenaItem:
  id: str                 # the image name
  image_path: str
  human: str              # the reference caption the judge sees
  baseline: str           # ref_model: which model's caption the test caption faces
  baseline_caption: str


def load_caparena(folder: str) -> list[CapArenaItem]:
  name = "CapArena-Auto"
  path = os.path.join(_folder(name, folder), CAPARENA_FILE)
  if not paths.isfile(path):
    raise _fail(name, path, "does not exist")
  with paths.open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise _fail(name, path, f"is not JSON ({e})") from None
  if not isinstance(data, dict) or not data:
    raise _fail(name, path, "is not a non-empty JSON object of images")
  items = []
  for image, record in data.items():
    where = f"{path} image {image!r}"
    captions = _require(name, where, record, "captions", dict)
    baseline = _require(name, where, record, "ref_model", str)
    for needed in ("human", baseline):
      if not isinstance(captions.get(needed), str):
        raise _fail(name, where, f"captions has no {needed!r} caption (has {sorted(captions)})")
    items.append(CapArenaItem(image, _image(name, folder, os.path.join(IMAGES, image), where),
                              captions["human"], baseline, captions[baseline]))
  return items
