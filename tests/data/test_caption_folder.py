"""caption_folder: a manifest with good and bad rows becomes a data set; bad rows are reported."""

import json

import numpy as np
import pytest
from PIL import Image

from balcap.data import datasets
from balcap.data.caption_folder import builder as caption_folder
from testlib import tiny_data_config


def _write_manifest(folder, rows, extra_lines=()):
  path = folder / "manifest.jsonl"
  lines = [json.dumps(r) for r in rows] + list(extra_lines)
  path.write_text("\n".join(lines) + "\n")
  return path


def _images(folder):
  (folder / "images").mkdir()
  Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "images" / "red.jpg")
  Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(folder / "images" / "clear.png")
  Image.new("L", (16, 12), 77).save(folder / "images" / "gray.png")
  Image.new("RGB", (64, 64), (0, 128, 0)).save(folder / "images" / "green.jpg", quality=95)
  data = (folder / "images" / "green.jpg").read_bytes()
  (folder / "images" / "truncated.jpg").write_bytes(data[: len(data) // 2])
  (folder / "images" / "notes.txt").write_text("not an image")


def _data_config(tmp_path, manifest):
  data = tiny_data_config(tmp_path / "tfds")
  data.name = "caption_folder"
  data.caption_folder.manifest = str(manifest)
  return data


def test_bad_rows_are_skipped_reported_and_counted(tmp_path):
  _images(tmp_path)
  good = [
      {"id": "red", "image": "images/red.jpg", "reference": "A red rectangle.", "split": "train"},
      {"id": "clear", "image": "images/clear.png", "reference": ["Nothing.", "Blank."],
       "split": "train"},
      {"id": "gray", "image": "images/gray.png", "reference": "Gray.", "split": "validation"},
  ]
  bad = [
      {"id": "gone", "image": "images/missing.jpg", "reference": "x", "split": "train"},
      {"id": "cut", "image": "images/truncated.jpg", "reference": "x", "split": "train"},
      {"id": "text", "image": "images/notes.txt", "reference": "x", "split": "test"},
      {"id": "noref", "image": "images/red.jpg"},
      {"id": "badsplit", "image": "images/red.jpg", "reference": "x", "split": "dev"},
  ]
  manifest = _write_manifest(tmp_path, good + bad, extra_lines=["{not json"])
  builder = datasets.prepare(_data_config(tmp_path, manifest))

  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 2,
                                                                         "validation": 1}
  report = [json.loads(l) for l in (builder.data_path / "skipped_rows.jsonl").read_text()
            .splitlines()]
  reasons = {r["id"]: r["reason"] for r in report}
  assert set(reasons) == {"gone", "cut", "text", "noref", "badsplit", None}
  assert "image file not found" in reasons["gone"]
  assert "not a readable image" in reasons["cut"] and "not a readable image" in reasons["text"]
  assert "'reference'" in reasons["noref"] and "'dev'" in reasons["badsplit"]
  assert "not valid JSON" in reasons[None] and report[-1]["line"] == 9
  assert builder.info.metadata["num_skipped_rows"] == 6

  train = datasets.open_split(builder, "train")
  examples = {train[i]["id"].decode(): train[i] for i in range(len(train))}
  assert examples["red"]["image"].shape == (30, 40, 3)
  assert [r.decode() for r in examples["clear"]["references"]] == ["Nothing.", "Blank."]
  # Transparent pixels are composited on white, not left black.
  np.testing.assert_array_equal(examples["clear"]["image"][0, 0], [255, 255, 255])
  gray = datasets.open_split(builder, "validation")[0]["image"]
  assert gray.shape == (12, 16, 3) and (gray == 77).all()
  with pytest.raises(ValueError, match="split 'test' of caption_folder/.* has no examples"):
    datasets.open_split(builder, "test")


def test_duplicate_ids_are_an_error_naming_them(tmp_path):
  _images(tmp_path)
  rows = [{"id": i, "image": "images/red.jpg", "reference": "r"} for i in ("a", "b", "a", "c",
                                                                          "b")]
  manifest = _write_manifest(tmp_path, rows)
  with pytest.raises(caption_folder.DuplicateIdError,
                     match=r"2 id\(s\) used more than once: 'a' on lines \[1, 3\]; 'b' on lines "
                     r"\[2, 5\]"):
    datasets.prepare(_data_config(tmp_path, manifest))


def test_hash_splits_are_stable_and_follow_the_fractions():
  ids = [f"img{i:05d}" for i in range(20_000)]
  splits = [caption_folder.split_of(i, 0.1, 0.05) for i in ids]
  assert splits == [caption_folder.split_of(i, 0.1, 0.05) for i in ids]
  assert abs(splits.count("validation") / len(ids) - 0.1) < 0.01
  assert abs(splits.count("test") / len(ids) - 0.05) < 0.01


def test_a_changed_manifest_is_a_new_data_set(tmp_path):
  _images(tmp_path)
  rows = [{"id": "red", "image": "images/red.jpg", "reference": "Red."}]
  first = caption_folder.caption_folder_config(str(_write_manifest(tmp_path, rows)))
  rows.append({"id": "green", "image": "images/green.jpg", "reference": "Green."})
  second = caption_folder.caption_folder_config(str(_write_manifest(tmp_path, rows)))
  assert first.name != second.name and first.name.startswith("manifest_")
  with pytest.raises(FileNotFoundError, match="caption_folder.manifest: no file"):
    caption_folder.caption_folder_config(str(tmp_path / "nope.jsonl"))
