"""Shared test set-up: 8 simulated CPU devices, no network, small shared fixtures.

The environment is set before anything imports JAX, so every test (and every subprocess a
test starts, which inherits it) sees the same 8-device CPU platform.

One persistent compilation cache serves the whole session, both pytest-xdist workers
(pytest.ini) included: many tests start processes that compile the same tiny programs (a run,
its killed twin's resume, the demo's second run), and a program compiled once is then read
back. tests/rl/test_learner_runs.py took 188 s with it against 263 s without, side by side on
the 2-core machine; its bitwise-resume checks hold.
"""

import atexit
import os
import shutil
import tempfile

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="balcap-jax-cache-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"  # the costly ones only
# balcap's local copies of remote files (paths.local_mirror) in a directory of this process's
# own, never the user's ~/.cache: pytest-xdist's workers share the fake bucket's names.
_MIRRORS = tempfile.mkdtemp(prefix="balcap-mirror-")
atexit.register(shutil.rmtree, _MIRRORS, ignore_errors=True)
os.environ["BALCAP_CACHE"] = _MIRRORS

import pytest  # pylint: disable=wrong-import-position

import testlib  # pylint: disable=wrong-import-position


@pytest.fixture(scope="session")
def capworld_builder(tmp_path_factory):
  """A prepared tiny CapWorld, shared by every test that only reads it."""
  from balcap.data import datasets  # pylint: disable=import-outside-toplevel
  return datasets.prepare(testlib.tiny_data_config(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="session")
def fake_gcs():
  """A fake GCS server for the session (see fake_gcs.py); yields the env its clients need.

  Tests write under gs://balcap-test/<their own prefix>, so they never see each other's files.
  """
  import fake_gcs as fake  # pylint: disable=import-outside-toplevel
  with fake.serve() as env:
    yield env
