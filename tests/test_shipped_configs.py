"""Every shipped config, given what its docstring says a user must add, validates and builds
its data set: a shipped config must never crash before it starts (as qwen7b once did in TFDS).
"""

import os

import pytest

from balcap import configs
from balcap.data import datasets
from testlib import load_config_file

# The flags each config's docstring tells a user to give (the checkpoint is made below).
REAL_MODEL_FLAGS = {"rewards.openai.base_url": "http://127.0.0.1:9",
                    "rewards.openai.model": "judge"}
SHIPPED = [("tiny", None), ("qwen3b", "hardware=gpu8"), ("qwen3b", "hardware=tpu"),
           ("qwen7b", "hardware=gpu8"), ("qwen7b", "hardware=tpu"), ("llava7b", "hardware=gpu8"),
           ("llava7b", "hardware=tpu")]


def _fake_checkpoint(folder) -> str:
  """What validate looks for before any work: a folder with config.json and weights."""
  os.makedirs(folder, exist_ok=True)
  for name in ("config.json", "model.safetensors"):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
      f.write("{}")
  return str(folder)


@pytest.fixture(autouse=True)
def judge_key(monkeypatch):
  monkeypatch.setenv("JUDGE_API_KEY", "key")  # the real configs' judge reads its key from it


def _user_config(name, arg, tmp_path):
  config = load_config_file(name, arg)
  if name != "tiny":
    config.model.checkpoint = _fake_checkpoint(tmp_path / "ckpt")
    config.rewards.openai.base_url = REAL_MODEL_FLAGS["rewards.openai.base_url"]
    config.rewards.openai.model = REAL_MODEL_FLAGS["rewards.openai.model"]
  config.data.data_dir = str(tmp_path / "tfds")
  return config


@pytest.mark.parametrize("name,arg", SHIPPED)
def test_shipped_config_validates_and_builds_its_data_at_its_own_sizes(name, arg, tmp_path):
  config = _user_config(name, arg, tmp_path)
  configs.validate(config, num_devices=8)
  # At the config's own sizes (CapWorld's defaults collided with the class's declared config).
  builder = datasets.make_builder(config.data)
  assert builder.info.full_name.startswith(config.data.name)


@pytest.mark.parametrize("name", ["tiny", "qwen7b"])
def test_shipped_data_sections_prepare_at_reduced_sizes(name, tmp_path):
  config = _user_config(name, "hardware=gpu8" if name != "tiny" else None, tmp_path)
  world = config.data.capworld
  world.num_train, world.num_validation, world.num_test = 6, 2, 2
  builder = datasets.prepare(config.data)
  assert len(datasets.open_split(builder, config.data.test_split)) == 2


def test_a_checkpoint_that_is_not_there_is_named_before_any_work(tmp_path):
  config = _user_config("qwen7b", "hardware=gpu8", tmp_path)
  config.model.checkpoint = str(tmp_path / "nonexistent")
  with pytest.raises(configs.ConfigError, match="config.model.checkpoint=.*nonexistent.* is not "
                                                "a folder"):
    configs.validate(config, num_devices=8)
  empty = tmp_path / "empty"
  empty.mkdir()
  config.model.checkpoint = str(empty)
  with pytest.raises(configs.ConfigError, match=r"has no config.json and no weights"):
    configs.validate(config, num_devices=8)
  # The data set is never touched: validation runs first.
  assert not os.path.exists(tmp_path / "tfds")


def test_the_shipped_qwen7b_command_fails_in_validation_not_in_tfds(tmp_path):
  # As a new user types it, with a checkpoint path that does not exist.
  from test_main import balcap_main  # pylint: disable=import-outside-toplevel
  done = balcap_main("--config=configs/qwen7b.py", "--config.model.checkpoint=/nonexistent",
                     "--config.rewards.openai.base_url=http://127.0.0.1:9",
                     "--config.rewards.openai.model=x", f"--workdir={tmp_path / 'run'}",
                     tmp_path=tmp_path)
  assert done.returncode != 0
  assert "config.model.checkpoint='/nonexistent' is not a folder" in done.stderr, done.stderr
  assert "Traceback" not in done.stderr
