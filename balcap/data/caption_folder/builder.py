"""Your own captioning data as a TFDS data set: a JSONL manifest of images and references.

One row per line: `{"id": "...", "image": "images/0001.jpg", "reference": "..."}` — the image
path is relative to the manifest's folder (or absolute), `reference` is a string or a list of
strings (re-captioned references, as the method uses), and an optional `"split"` of train /
validation / test pins a row to a split (otherwise a stable hash of the id decides, so adding
rows never moves old ones between splits).

A bad row never stops the build: a malformed line, a missing field, a missing, truncated or
non-image file is skipped, and its id (or line number) and the reason go to
`skipped_rows.jsonl` in the prepared data set's folder and to the counts in its metadata.
Duplicate ids are the one fatal error, raised before anything is written and naming each.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import zlib

import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from balcap import paths
from balcap.configs import BalcapError

SPLITS = ("train", "validation", "test")
SKIPPED_ROWS_FILE = "skipped_rows.jsonl"
# Formats kept byte for byte; anything else is re-encoded as PNG.
_KEPT_FORMATS = ("JPEG", "PNG")
_CHECK_THREADS = 8


class DuplicateIdError(BalcapError, ValueError):
  """The manifest uses some ids more than once (the message lists them with line numbers)."""


@dataclasses.dataclass(eq=False)
class CaptionFolderConfig(tfds.core.BuilderConfig):
  manifest: str = ""
  validation_fraction: float = 0.02
  test_fraction: float = 0.02


def caption_folder_config(manifest: str, *, validation_fraction: float = 0.02,
                          test_fraction: float = 0.02) -> CaptionFolderConfig:
  """A builder config named after the manifest's CONTENT, so an edited manifest is rebuilt."""
  manifest = manifest if paths.is_remote(manifest) else os.path.abspath(manifest)
  if not paths.isfile(manifest):
    raise FileNotFoundError(f"config.data.caption_folder.manifest: no file at {manifest}")
  digest = hashlib.sha1()
  with paths.open(manifest, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  digest.update(f"{validation_fraction},{test_fraction}".encode())
  stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(manifest))[0])
  return CaptionFolderConfig(
      name=f"{stem[:40]}_{digest.hexdigest()[:10]}", manifest=manifest,
      validation_fraction=validation_fraction, test_fraction=test_fraction,
      description=f"caption_folder over {manifest}")


def split_of(example_id: str, validation_fraction: float, test_fraction: float) -> str:
  """The split a row without an explicit "split" goes to, from a stable hash of its id."""
  bucket = zlib.crc32(example_id.encode("utf-8")) / 2**32
  if bucket < test_fraction:
    return "test"
  if bucket < test_fraction + validation_fraction:
    return "validation"
  return "train"


def read_manifest(path: str) -> tuple[list[dict], list[dict]]:
  """Parses the manifest into (rows, skipped); raises DuplicateIdError for repeated ids.

  Each row gets `line` (1-based), `id`, `image` (absolute path), `references` (list) and
  `split`. A line that cannot become a row is returned in `skipped` with its reason.
  """
  rows, skipped = [], []
  folder = paths.parent(path if paths.is_remote(path) else os.path.abspath(path))
  with paths.open(path) as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      row, reason = _parse_row(line, folder)
      if reason:
        skipped.append({"line": line_number, "id": row.get("id"), "reason": reason})
      else:
        rows.append({"line": line_number, **row})
  lines_by_id = collections.defaultdict(list)
  for row in rows:
    lines_by_id[row["id"]].append(row["line"])
  duplicates = {i: lines for i, lines in lines_by_id.items() if len(lines) > 1}
  if duplicates:
    listed = "; ".join(f"{i!r} on lines {lines}" for i, lines in sorted(duplicates.items()))
    raise DuplicateIdError(f"{path}: {len(duplicates)} id(s) used more than once: {listed}")
  return rows, skipped


def _parse_row(line: str, folder: str) -> tuple[dict, str | None]:
  try:
    raw = json.loads(line)
  except json.JSONDecodeError as e:
    return {}, f"not valid JSON ({e.msg} at column {e.colno})"
  if not isinstance(raw, dict):
    return {}, "not a JSON object"
  example_id = raw.get("id")
  row = {"id": str(example_id) if example_id is not None else None}
  if example_id is None or str(example_id) == "":
    return row, "missing 'id'"
  image = raw.get("image")
  if not isinstance(image, str) or not image:
    return row, "missing 'image' path"
  references = raw.get("reference")
  if isinstance(references, str):
    references = [references]
  if (not isinstance(references, list) or not references
      or not all(isinstance(r, str) and r.strip() for r in references)):
    return row, "'reference' must be a non-empty string or list of non-empty strings"
  split = raw.get("split")
  if split is not None and split not in SPLITS:
    return row, f"'split' is {split!r}; use one of {list(SPLITS)}"
  image = image if paths.is_remote(image) else os.path.join(folder, image)
  row.update(image=image, references=references, split=split)
  return row, None


def check_image(path: str) -> tuple[bool, str | None]:
  """Decodes the whole file; returns (needs_reencode, None), or (False, reason) if unusable.

  Decoding everything catches a truncated file here, not in the training loop. RGB JPEG/PNG
  files without an EXIF rotation are stored byte for byte; others are re-encoded as PNG.
  """
  try:
    with paths.open(path, "rb") as f, Image.open(f) as image:
      image.load()
      rotated = image.getexif().get(0x0112, 1) != 1  # EXIF Orientation
      return not (image.mode == "RGB" and image.format in _KEPT_FORMATS and not rotated), None
  except FileNotFoundError:
    return False, f"image file not found: {path}"
  except OSError as e:
    if not paths.exists(path):
      return False, f"image file not found: {path}"
    return False, f"not a readable image ({type(e).__name__}: {e})"
  except (SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return False, f"not a readable image ({type(e).__name__}: {e})"


def image_bytes(path: str, needs_reencode: bool) -> bytes:
  """The bytes to store for an image that passed check_image: the file, or an RGB PNG of it."""
  if not needs_reencode:
    return paths.read_bytes(path)
  with paths.open(path, "rb") as f, Image.open(f) as image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P", "PA"):  # transparency -> composite on white
      rgba = image.convert("RGBA")
      image = Image.new("RGB", rgba.size, (255, 255, 255))
      image.paste(rgba, mask=rgba.getchannel("A"))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class CaptionFolder(tfds.core.GeneratorBasedBuilder):
  """Images listed in a JSONL manifest, with their reference captions."""

  name = "caption_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3)),
            "references": tfds.features.Sequence(tfds.features.Text()),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    rows, self._skipped = read_manifest(config.manifest)
    # Every image is decoded once, here, in threads (PIL decodes without the GIL), so a split
    # whose rows are all bad is known before TFDS is asked to write it.
    with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
      checks = list(pool.map(check_image, [row["image"] for row in rows]))
    by_split = {split: [] for split in SPLITS}
    for row, (needs_reencode, reason) in zip(rows, checks):
      split = row["split"] or split_of(row["id"], config.validation_fraction,
                                       config.test_fraction)
      if reason:
        self._skipped.append({"line": row["line"], "id": row["id"], "split": split,
                              "reason": reason})
      else:
        by_split[split].append({**row, "needs_reencode": needs_reencode})
    # TFDS cannot write an empty split; a split with no rows is absent (open_split says so).
    return {split: self._generate_examples(split_rows)
            for split, split_rows in by_split.items() if split_rows}

  def _generate_examples(self, rows: list[dict]):
    for row in rows:
      data = image_bytes(row["image"], row["needs_reencode"])
      yield row["id"], {"id": row["id"], "image": data, "references": row["references"]}

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    self._write_skipped()

  def _write_skipped(self) -> None:
    # Runs while data_dir is TFDS's temporary folder (before dataset_info.json is written), so
    # the report and the metadata counts are part of the finished data set.
    self._skipped.sort(key=lambda e: e["line"])
    paths.write_text(os.path.join(os.fspath(self.data_dir), SKIPPED_ROWS_FILE),
                     "".join(json.dumps(entry) + "\n" for entry in self._skipped))
    reasons = collections.Counter(e["reason"].split(" (")[0].split(":")[0]
                                  for e in self._skipped)
    self.info.metadata["num_skipped_rows"] = len(self._skipped)
    self.info.metadata["skipped_reasons"] = dict(reasons)
