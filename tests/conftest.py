"""Shared test set-up: 8 simulated CPU devices, no network, small shared fixtures.

The environment is set before anything imports JAX, so every test (and every subprocess a
test starts, which inherits it) sees the same 8-device CPU platform.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # pylint: disable=wrong-import-position

import testlib  # pylint: disable=wrong-import-position


@pytest.fixture(scope="session")
def capworld_builder(tmp_path_factory):
  """A prepared tiny CapWorld, shared by every test that only reads it."""
  from balcap.data import datasets  # pylint: disable=import-outside-toplevel
  return datasets.prepare(testlib.tiny_data_config(tmp_path_factory.mktemp("tfds")))
