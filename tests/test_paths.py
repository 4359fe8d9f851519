"""balcap.paths on local folders and on gs:// (the fake GCS server of fake_gcs.py)."""

import os

import pytest

from balcap import metrics, paths


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  request.getfixturevalue("fake_gcs")
  return f"gs://balcap-test/test_paths/{os.path.basename(tmp_path)}"


def test_appender_adds_lines_across_openings_and_truncate_starts_over(root):
  path = paths.join(root, "logs", "m.jsonl")
  first = paths.LineAppender(path)
  first.write(["a", "b\n"])
  assert paths.read_text(path) == "a\nb\n"  # flushed per write: readable while it runs
  first.write(["c"], flush=False)
  first.close()
  second = paths.LineAppender(path)  # a resumed run adds to what is there
  second.write(["d"])
  second.close()
  assert paths.read_text(path) == "a\nb\nc\nd\n"
  fresh = paths.LineAppender(path, truncate=True)
  fresh.write(["e"])
  fresh.close()
  assert paths.read_text(path) == "e\n"


def test_jsonl_metrics_round_trip_non_finite_values(root):
  writer = metrics.JsonlWriter(paths.join(root, "metrics.jsonl"))
  writer.write_scalars(1, {"loss": 2.5, "bad": float("nan")})
  writer.write_scalars(2, {"loss": float("inf")})
  writer.close()
  rows = metrics.read_jsonl(paths.join(root, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == 2.5
  assert rows[0]["bad"] != rows[0]["bad"] and rows[1]["loss"] == float("inf")


def test_files_folders_and_listing(root):
  paths.write_text(paths.join(root, "a", "x.json"), "{}")
  paths.write_text(paths.join(root, "a", "y.md"), "# y")
  paths.write_text(paths.join(root, "a", "x.json"), '{"again": 1}')  # replaces it whole
  assert paths.read_text(paths.join(root, "a", "x.json")) == '{"again": 1}'
  assert paths.isdir(paths.join(root, "a")) and not paths.isfile(paths.join(root, "a"))
  assert paths.isfile(paths.join(root, "a", "y.md"))
  assert not paths.exists(paths.join(root, "a", "nope"))
  assert paths.listdir(paths.join(root, "a")) == ["x.json", "y.md"]
  assert paths.glob(paths.join(root, "a"), "*.json") == [paths.join(root, "a", "x.json")]
  with paths.open(paths.join(root, "b", "image.bin"), "wb") as f:
    f.write(b"\x00\x01")
  assert paths.read_bytes(paths.join(root, "b", "image.bin")) == b"\x00\x01"
  with pytest.raises(ValueError, match="LineAppender"):
    paths.open(paths.join(root, "a", "x.json"), "a")


def test_folders_download_to_the_cache_and_upload_back(root, tmp_path, monkeypatch):
  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
  paths.write_text(paths.join(root, "hf", "config.json"), "{}")
  paths.write_text(paths.join(root, "hf", "sub", "tokenizer.json"), "tok")
  local = paths.download_folder(paths.join(root, "hf"))
  assert local == paths.local_mirror(paths.join(root, "hf"))
  if paths.is_remote(root):
    assert local.startswith(str(tmp_path / "cache" / "gs" / "balcap-test"))
  with open(os.path.join(local, "sub", "tokenizer.json"), encoding="utf-8") as f:
    assert f.read() == "tok"
  paths.upload_folder(local, paths.join(root, "copy"))
  assert paths.listdir(paths.join(root, "copy")) == ["config.json", "sub"]
  assert paths.read_text(paths.join(root, "copy", "sub", "tokenizer.json")) == "tok"


def test_remote_or_local():
  assert paths.is_remote("gs://b/x") and paths.is_remote("s3://b/x")
  assert not paths.is_remote("/tmp/x") and not paths.is_remote("runs/gs:/x")
  assert paths.join("gs://b/run", "rl", "metrics.jsonl") == "gs://b/run/rl/metrics.jsonl"
  assert paths.local_mirror("/tmp/x") == "/tmp/x"


def test_a_local_write_is_readable_by_others(tmp_path):
  paths.write_text(str(tmp_path / "report.md"), "# r")
  assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
  assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary file left


def test_an_hf_folder_round_trips_through_a_bucket(tmp_path, fake_gcs, monkeypatch):
  """save_pretrained to gs:// (written locally, uploaded) and load_pretrained from it
  (downloaded to $BALCAP_CACHE): the same params and the tokenizer files come back."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from balcap import models  # pylint: disable=import-outside-toplevel
  from testlib import tiny_model_config  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
  model = tiny_model_config()
  policy = models.policy_from_config(model, jax.random.key(0))
  policy.source = model.tokenizer  # as a trained run's policy: its tokenizer files go along
  folder = f"gs://balcap-test/test_paths/hf-{tmp_path.name}"
  policy.save_pretrained(folder)
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(paths.listdir(folder))
  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "another_host"))
  loaded = models.load_pretrained(folder, scan_layers=model.scan_layers)
  assert loaded.processor is not None
  for a, b in zip(jax.tree.leaves(policy.params), jax.tree.leaves(loaded.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
