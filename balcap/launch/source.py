"""The code a launch installs on every worker: this checkout's files as one tarball.

The tarball holds the files git tracks, as they are in the working tree (uncommitted edits
included: what you run is what you tested), written deterministically, so its digest names the
code: a worker that installed that digest before skips the install on a rerun.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile


def tracked_files(checkout: str) -> list[str]:
  try:
    listed = subprocess.run(["git", "-C", checkout, "ls-files", "-z"], check=True,
                            capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise ValueError(f"--source={checkout!r} is not a git checkout (git ls-files failed: "
                     f"{getattr(e, 'stderr', e)}); give the balcap checkout to install, or a "
                     "pip requirement such as git+https://...") from e
  # Tracked but deleted in the working tree: not shipped.
  return sorted(f for f in listed.split("\0") if f and os.path.isfile(os.path.join(checkout, f)))


def pack(checkout: str) -> tuple[bytes, str]:
  """(tar.gz bytes, 12-hex digest of the files' names and contents)."""
  digest = hashlib.sha256()
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as tar:
    for name in tracked_files(checkout):
      with open(os.path.join(checkout, name), "rb") as f:
        data = f.read()
      digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
      info = tarfile.TarInfo(name)
      info.size, info.mtime = len(data), 0
      info.mode = 0o755 if os.access(os.path.join(checkout, name), os.X_OK) else 0o644
      tar.addfile(info, io.BytesIO(data))
  # mtime=0 on every member and on the gzip header: equal files give equal bytes.
  return gzip.compress(buffer.getvalue(), mtime=0), digest.hexdigest()[:12]
