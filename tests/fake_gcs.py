"""A local stand-in for Google Cloud Storage, for tests of gs:// workdirs.

`gcp-storage-emulator` serves GCS's JSON API from memory on a local port. Both clients balcap
uses for gs:// talk to it unchanged: gcsfs (behind etils.epath: metrics, samples, reports)
reads STORAGE_EMULATOR_HOST, and tensorstore (behind orbax: checkpoint arrays) reads
TENSORSTORE_GCS_HTTP_URL. So a test exercises the same code a pod run does, with only the
server swapped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

BUCKET = "balcap-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
  """Environment variables that point gcsfs and tensorstore at the fake (for subprocesses)."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token"}


def forget_clients() -> None:
  """Drops cached filesystem objects so the next gs:// access reads the environment again."""
  import fsspec  # pylint: disable=import-outside-toplevel
  from etils.epath import backend  # pylint: disable=import-outside-toplevel
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  for cls in list(fsspec.registry.values()) if hasattr(fsspec.registry, "values") else []:
    getattr(cls, "clear_instance_cache", lambda: None)()
  import gcsfs  # pylint: disable=import-outside-toplevel
  gcsfs.GCSFileSystem.clear_instance_cache()


def _patch_emulator() -> None:
  """Media downloads answer with the object's generation in `x-goog-generation`, as GCS does.

  The emulator leaves that header out; tensorstore needs it (OCDBT's manifest is read and
  rewritten conditionally on its generation, else "Malformed StorageGeneration").
  """
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  if getattr(objects.download, "balcap_patched", False):
    return
  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # pylint: disable=broad-except  # not found: the 404 stands
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  download.balcap_patched = True
  objects.download = download  # objects.get calls it by this name for ?alt=media
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is original:
        handlers[method] = download


@contextlib.contextmanager
def serve():
  """Runs the fake with one bucket; yields the env dict its clients need (already set here)."""
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  logging.getLogger("gcsfs").setLevel(logging.ERROR)  # "could not determine bucket type"
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  _patch_emulator()
  port = _free_port()
  server = create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  env = client_env(f"http://localhost:{port}")
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  forget_clients()
  try:
    yield env
  finally:
    server.stop()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    forget_clients()
