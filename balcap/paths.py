"""One path layer for every file balcap reads or writes: local paths and `gs://` alike.

Built on `etils.epath` (what orbax and TFDS use): without TensorFlow installed, `gs://` goes
through fsspec's `gcsfs`, so a pod run writes its workdir straight to a bucket. Orbax
checkpoints use the same strings (tensorstore writes the arrays itself).

What object stores cannot do, and what this module does instead:
- append: `LineAppender` appends to a local file, and on a remote path rewrites the whole
  object at each flush (a JSONL log of a few MB; tensorboardX's GCS writer does the same);
- sqlite and memory-mapped reads need a local file: `local_mirror` names a local path for a
  remote one (a per-host cache directory), `download_folder` / `upload_folder` move folders.
"""

from __future__ import annotations

import builtins
import os
import re
import shutil
import tempfile
from typing import IO, Iterable

from etils import epath

PathLike = str | os.PathLike
_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*://")
# Where remote files that must be local (sqlite caches, checkpoints being read) are mirrored.
CACHE_ENV = "BALCAP_CACHE"
_CHUNK = 64 << 20  # bytes per read when copying checkpoint shards


def is_remote(path: PathLike) -> bool:
  """True for a URI such as gs://bucket/run, False for a local path."""
  return bool(_REMOTE.match(os.fspath(path)))


def join(base: PathLike, *parts: str) -> str:
  """base/part/... as a string; keeps a gs:// prefix intact (os.path.join does too, but
  this makes the intent plain and is the one place to change if that ever differs)."""
  return os.fspath(epath.Path(base).joinpath(*parts))


def exists(path: PathLike) -> bool:
  return epath.Path(path).exists()


def isfile(path: PathLike) -> bool:
  p = epath.Path(path)
  return p.exists() and not p.is_dir()


def isdir(path: PathLike) -> bool:
  return epath.Path(path).is_dir()


def listdir(path: PathLike) -> list[str]:
  """The names in a folder (not full paths), sorted."""
  return sorted(p.name for p in epath.Path(path).iterdir())


def glob(folder: PathLike, pattern: str) -> list[str]:
  """Full paths in `folder` matching `pattern` (e.g. "*.json"), sorted."""
  return sorted(os.fspath(p) for p in epath.Path(folder).glob(pattern))


def makedirs(path: PathLike) -> None:
  """mkdir -p; on an object store folders are implicit, and this is a cheap no-op."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def parent(path: PathLike) -> str:
  return os.fspath(epath.Path(path).parent)


def open(path: PathLike, mode: str = "r") -> IO:  # pylint: disable=redefined-builtin
  """Opens a file for reading or (over)writing. Appending is `LineAppender`'s job."""
  if "a" in mode:
    raise ValueError(f"paths.open({os.fspath(path)!r}, {mode!r}): object stores cannot append;"
                     " use paths.LineAppender")
  if "w" in mode:
    makedirs(parent(path))
  return epath.Path(path).open(mode)


def read_text(path: PathLike) -> str:
  return epath.Path(path).read_text(encoding="utf-8")


def read_bytes(path: PathLike) -> bytes:
  return epath.Path(path).read_bytes()


def write_text(path: PathLike, text: str) -> None:
  """Writes a whole file so a reader never sees half of it.

  Locally: a temporary file in the same folder, then an atomic rename. On an object store an
  upload is already all-or-nothing.
  """
  if is_remote(path):
    makedirs(parent(path))
    epath.Path(path).write_text(text, encoding="utf-8")
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, encoding="utf-8",
                                   prefix=".tmp-") as f:
    f.write(text)
  os.chmod(f.name, 0o644)  # mkstemp makes it 0600; a report is for others to read too
  os.replace(f.name, path)


class LineAppender:
  """Appends text lines to a file that may live on an object store.

  Local: a file opened in append mode, flushed after each `write` so the log is readable while
  the run goes on. Remote: the file's current content is read once, new lines are added in
  memory and the whole object is rewritten at each flush (objects cannot be appended to). For
  a metrics log that is a few MB per flush at most.
  """

  def __init__(self, path: PathLike, *, truncate: bool = False):
    """`truncate`: start an empty file (like mode "w") instead of adding to one."""
    self.path = os.fspath(path)
    self._remote = is_remote(path)
    if self._remote:
      self._content = read_text(path) if exists(path) and not truncate else ""
      if self._content and not self._content.endswith("\n"):
        self._content += "\n"
      self._dirty = False
    else:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      mode = "w" if truncate else "a"
      self._file = builtins.open(self.path, mode, encoding="utf-8")  # pylint: disable=consider-using-with

  def write(self, lines: Iterable[str], flush: bool = True) -> None:
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    if self._remote:
      self._content += text
      self._dirty = True
    else:
      self._file.write(text)
    if flush:
      self.flush()

  def flush(self) -> None:
    if self._remote:
      if self._dirty:
        write_text(self.path, self._content)
        self._dirty = False
    else:
      self._file.flush()

  def close(self) -> None:
    self.flush()
    if not self._remote:
      self._file.close()


def local_mirror(path: PathLike) -> str:
  """A local path standing for `path`: itself when local, else a path under the cache
  directory ($BALCAP_CACHE, default ~/.cache/balcap) named after the URI."""
  path = os.fspath(path)
  if not is_remote(path):
    return path
  scheme, rest = path.split("://", 1)
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "balcap")
  return os.path.join(root, scheme, rest.strip("/"))


def download_folder(path: PathLike) -> str:
  """A local folder with the files of `path` (recursively); `path` itself when local.

  Remote files are fetched into `local_mirror(path)` unless a copy of the same size is there.
  """
  if not is_remote(path):
    return os.fspath(path)
  source = epath.Path(path)
  if not source.is_dir():
    raise FileNotFoundError(f"no folder at {os.fspath(path)}")
  target = local_mirror(path)
  for relative in _files_under(source):
    file = source / relative
    local = os.path.join(target, relative)
    if os.path.isfile(local) and os.path.getsize(local) == file.stat().length:
      continue
    os.makedirs(os.path.dirname(local), exist_ok=True)
    partial = local + ".partial"
    with file.open("rb") as src, builtins.open(partial, "wb") as dst:
      shutil.copyfileobj(src, dst, _CHUNK)
    os.replace(partial, local)
  return target


def _files_under(folder: epath.Path, prefix: str = "") -> list[str]:
  """Relative paths of the files below `folder`, by listing each level (epath's rglob and
  walk do not handle gs:// uniformly)."""
  found = []
  for child in folder.iterdir():
    relative = f"{prefix}{child.name}"
    found.extend(_files_under(child, relative + "/") if child.is_dir() else [relative])
  return found


def upload_folder(local: PathLike, path: PathLike) -> None:
  """Copies the files of a local folder to `path` (any scheme), recursively."""
  local = os.fspath(local)
  for root, _, names in os.walk(local):
    for name in names:
      relative = os.path.relpath(os.path.join(root, name), local)
      target = epath.Path(path) / relative
      target.parent.mkdir(parents=True, exist_ok=True)
      with builtins.open(os.path.join(root, name), "rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)
