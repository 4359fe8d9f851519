"""Mode `caption`: images (one unreadable) and a data split to JSONL, through the real CLI."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from balcap import models
from testlib import tiny_model_config
from testlib import QWEN_TOKENIZER_DIR, REPO


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """configs/tiny.py's architecture at random, saved as an HF folder with the Qwen tokenizer."""
  folder = tmp_path_factory.mktemp("tiny_hf")
  policy = models.policy_from_config(tiny_model_config(), jax.random.key(0))
  policy.save_pretrained(str(folder))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(QWEN_TOKENIZER_DIR, name), folder)
  return folder


def balcap_caption(tmp_path, checkpoint, *args, devices=1):
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run(
      [sys.executable, "-m", "balcap.main", "--config=configs/tiny.py:mode=caption",
       f"--config.model.checkpoint={checkpoint}", f"--workdir={tmp_path / 'run'}",
       "--config.batch_size=2", "--config.sampling.max_new_tokens=6",
       "--config.sampling.temperature=0", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_images_are_captioned_and_a_bad_one_is_reported(tmp_path, tiny_checkpoint):
  rng = np.random.default_rng(0)
  paths = []
  for name, size in (("a.png", (112, 84)), ("b.png", (56, 140))):
    Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), np.uint8)).save(tmp_path / name)
    paths.append(str(tmp_path / name))
  (tmp_path / "bad.png").write_bytes(b"not a png")
  paths.insert(1, str(tmp_path / "bad.png"))
  done = balcap_caption(tmp_path, tiny_checkpoint, f"--images={','.join(paths)}")
  assert done.returncode == 0, done.stderr
  lines = [json.loads(l) for l in (tmp_path / "run" / "captions.jsonl").read_text().splitlines()]
  assert [l["id"] for l in lines] == paths
  assert "cannot read image" in lines[1]["error"]
  for line in (lines[0], lines[2]):
    assert isinstance(line["caption"], str) and 0 <= line["num_tokens"] <= 6
  assert "caption: 3 images" in done.stdout


def test_a_data_split_is_captioned(tmp_path, tiny_checkpoint):
  done = balcap_caption(tmp_path, tiny_checkpoint, "--config.caption.num_examples=3",
                        "--config.data.capworld.num_train=4",
                        "--config.data.capworld.num_validation=2",
                        "--config.data.capworld.num_test=5")
  assert done.returncode == 0, done.stderr
  lines = [json.loads(l) for l in (tmp_path / "run" / "captions.jsonl").read_text().splitlines()]
  assert len(lines) == 3 and all(l["id"].startswith("capworld-test-") for l in lines)
  assert all("caption" in l for l in lines)


def test_batches_that_do_not_divide_over_eight_data_shards_are_padded(tmp_path,
                                                                      tiny_checkpoint):
  # 8 devices, mesh data=8, batch 8: 11 images (one unreadable) make a first batch of 7
  # readable images and a last batch of 3; both must be padded to 8 to split over the shards.
  rng = np.random.default_rng(1)
  paths = []
  for k in range(11):
    path = tmp_path / f"img{k}.png"
    if k == 4:
      path.write_bytes(b"\x89PNG truncated")
    else:
      Image.fromarray(rng.integers(0, 256, (56 + 28 * (k % 3), 84, 3), np.uint8)).save(path)
    paths.append(str(path))
  done = balcap_caption(tmp_path, tiny_checkpoint, f"--images={','.join(paths)}",
                        "--config.batch_size=8", devices=8)
  assert done.returncode == 0, done.stderr
  lines = [json.loads(l) for l in (tmp_path / "run" / "captions.jsonl").read_text().splitlines()]
  assert [l["id"] for l in lines] == paths  # no padding row written
  assert "cannot read image" in lines[4]["error"]
  assert all("caption" in l for k, l in enumerate(lines) if k != 4)
  # A split whose size does not divide either (3 test examples, batch 8).
  done = balcap_caption(tmp_path, tiny_checkpoint, "--config.caption.num_examples=3",
                        "--config.batch_size=8", "--config.data.capworld.num_train=4",
                        "--config.data.capworld.num_validation=2",
                        "--config.data.capworld.num_test=5", devices=8)
  assert done.returncode == 0, done.stderr
  lines = [json.loads(l) for l in (tmp_path / "run" / "captions.jsonl").read_text().splitlines()]
  assert len(lines) == 3 and all("caption" in l for l in lines)
