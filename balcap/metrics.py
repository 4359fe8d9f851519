"""Where a run's numbers go: TensorBoard event files, a JSONL log, and a console progress bar.

One `MetricWriter` interface (`write_scalars`, `write_texts`, `flush`, `close`) in front of
every backend; `create_writer` gives process 0 the configured backends and every other process
a writer that drops everything, so a pod writes one copy of each metric.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Protocol

import jax
import numpy as np
import tqdm

from balcap import paths


class MetricWriter(Protocol):
  """Anything that records scalars and texts against a step."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None: ...

  def flush(self) -> None: ...

  def close(self) -> None: ...


def _scalar(name: str, value: Any) -> float:
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric {name!r} has shape {array.shape}; write_scalars needs one value")
  return float(array.reshape(()))


class JsonlWriter:
  """Appends one JSON object per call to a file (local or gs://): {"step", "time", ...}.

  Non-finite values are written as the strings "nan" / "inf" / "-inf" so every line stays
  valid JSON (a NaN reward count is exactly what one wants to be able to read back).
  """

  def __init__(self, path: str):
    self.path = path
    self._file = paths.LineAppender(path)

  def _write(self, record: dict) -> None:
    # Flushed per line: one line per log step, and readable while the run goes on.
    self._file.write([json.dumps(record, allow_nan=False)])

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = {k: _finite_or_str(_scalar(k, v)) for k, v in scalars.items()}
    self._write({"step": int(step), "time": time.time(), **values})

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._write({"step": int(step), "time": time.time(), "texts": dict(texts)})

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _finite_or_str(value: float) -> float | str:
  return value if math.isfinite(value) else str(value)


def read_jsonl(path: str) -> list[dict]:
  """Reads a JsonlWriter file back, turning "nan"/"inf" strings into floats again."""
  def revive(value):
    return float(value) if value in ("nan", "inf", "-inf") else value
  lines = paths.read_text(path).splitlines()
  return [{k: revive(v) for k, v in json.loads(line).items()} for line in lines if line.strip()]


class TensorBoardWriter:
  """TensorBoard event files through tensorboardX (no TensorFlow needed; it writes gs://
  logdirs itself, through google-cloud-storage)."""

  def __init__(self, logdir: str):
    import tensorboardX  # pylint: disable=import-outside-toplevel
    self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for name, value in scalars.items():
      self._writer.add_scalar(name, _scalar(name, value), global_step=int(step))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for name, text in texts.items():
      self._writer.add_text(name, text, global_step=int(step))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MultiWriter:
  """Sends every call to each of several writers."""

  def __init__(self, writers: list[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for writer in self.writers:
      writer.write_texts(step, texts)

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


def create_writer(workdir: str, *, tensorboard: bool = True, jsonl: bool = True) -> MultiWriter:
  """The run's writer: workdir/tensorboard and workdir/metrics.jsonl on process 0 only."""
  writers: list[MetricWriter] = []
  if jax.process_index() == 0:
    if tensorboard:
      writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
    if jsonl:
      writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
  return MultiWriter(writers)


class ProgressBar:
  """A tqdm bar over steps with rate and ETA, shown on process 0 only.

  Starts at `initial` so a resumed run shows its true position and a rate that counts only
  the steps this process ran.
  """

  def __init__(self, total: int, *, initial: int = 0, description: str = "",
               enabled: bool = True, unit: str = "step"):
    self._initial = initial
    self._started = time.monotonic()
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=description, unit=unit,
                          disable=not enabled or jax.process_index() != 0, dynamic_ncols=True)

  def update(self, n: int = 1, **postfix: Any) -> None:
    if postfix:
      self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
    self._bar.update(n)

  def write(self, message: str) -> None:
    """Prints a line above the bar without breaking it (process 0 only)."""
    if jax.process_index() == 0:
      self._bar.write(message)

  @property
  def rate(self) -> float | None:
    """Steps per second over this process's own steps (None before the first)."""
    done = self._bar.n - self._initial
    elapsed = time.monotonic() - self._started
    return done / elapsed if done > 0 and elapsed > 0 else None

  def close(self) -> None:
    self._bar.close()


def _short(value: Any) -> str:
  if isinstance(value, (float, np.floating)):
    return f"{value:.4g}"
  return str(value)
