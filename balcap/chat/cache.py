"""An on-disk cache of judge replies (sqlite), so a rerun or a repeated caption costs nothing.

Keys hash everything that determines a reply: the judge model, the prompt version, the exact
messages (image data URLs included) and the sampling params. Only successful replies are
stored, by the backend; a failure is always asked again. Safe to share between threads (one
connection behind a lock) and between processes (sqlite's own file locking, WAL journal).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from typing import Any, Mapping, Sequence


def cache_key(model: str, prompt_version: str, messages: Sequence[Mapping[str, Any]],
              params: Mapping[str, Any]) -> str:
  """A hex digest of (model, prompt version, messages, sampling params), stable across runs."""
  payload = json.dumps([model, prompt_version, list(messages), dict(params)],
                       sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ResponseCache:
  """key -> reply text, persisted in one sqlite file."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    self._lock = threading.Lock()
    # check_same_thread=False: the backend's worker threads share it, serialised by _lock.
    self._db = sqlite3.connect(path, check_same_thread=False, timeout=30.0)
    with self._lock:
      self._db.execute("PRAGMA journal_mode=WAL")
      # A lost last reply after a power cut is cheap to ask again; an fsync per reply is not.
      self._db.execute("PRAGMA synchronous=NORMAL")
      self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, text TEXT)")
      self._db.commit()

  def get(self, key: str) -> str | None:
    with self._lock:
      row = self._db.execute("SELECT text FROM replies WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]

  def get_many(self, keys: Sequence[str]) -> dict[str, str]:
    """The cached subset of `keys`, in one transaction (a batch is hundreds of keys)."""
    found = {}
    with self._lock:
      for key in set(keys):
        row = self._db.execute("SELECT text FROM replies WHERE key = ?", (key,)).fetchone()
        if row is not None:
          found[key] = row[0]
    return found

  def put(self, key: str, text: str) -> None:
    with self._lock:
      self._db.execute("INSERT OR REPLACE INTO replies (key, text) VALUES (?, ?)", (key, text))
      self._db.commit()

  def __len__(self) -> int:
    with self._lock:
      return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

  def close(self) -> None:
    with self._lock:
      self._db.close()
