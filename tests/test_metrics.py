"""Metric writers (JSONL, TensorBoard), process-0-only writing, and the progress bar."""

import glob
import math
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from balcap import metrics


def read_events(logdir):
  """Every (tag, step, value) in the TensorBoard event files under `logdir`."""
  found = []
  for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):  # TFRecord framing: length, crc, payload, crc
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        found.append((value.tag, event.step, value))
  return found


def test_jsonl_round_trips_scalars_nan_included_and_texts(tmp_path):
  writer = metrics.JsonlWriter(str(tmp_path / "m.jsonl"))
  writer.write_scalars(3, {"reward/precision": np.float32(0.5), "reward/nan_count": np.nan,
                           "loss": np.array(1.25)})
  writer.write_texts(3, {"samples": "a red circle"})
  writer.close()
  first, second = metrics.read_jsonl(str(tmp_path / "m.jsonl"))
  assert first["step"] == 3 and first["reward/precision"] == 0.5 and first["loss"] == 1.25
  assert math.isnan(first["reward/nan_count"])
  assert second["texts"] == {"samples": "a red circle"}


def test_non_scalar_metric_is_named(tmp_path):
  writer = metrics.JsonlWriter(str(tmp_path / "m.jsonl"))
  with pytest.raises(ValueError, match="metric 'advantages' has shape \\(4,\\)"):
    writer.write_scalars(1, {"advantages": np.zeros(4)})


def test_tensorboard_event_files_hold_scalars_and_texts(tmp_path):
  writer = metrics.create_writer(str(tmp_path), tensorboard=True, jsonl=True)
  for step in (1, 2):
    writer.write_scalars(step, {"loss": 1.0 / step})
  writer.write_texts(2, {"samples": "two blue squares"})
  writer.close()
  events = read_events(tmp_path / "tensorboard")
  scalars = sorted((step, v.simple_value) for tag, step, v in events if tag == "loss")
  assert scalars == [(1, 1.0), (2, 0.5)]
  texts = [v.tensor.string_val[0].decode() for tag, _, v in events if tag.startswith("samples")]
  assert texts == ["two blue squares"]
  assert len(metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))) == 3


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics.jax, "process_index", lambda: 1)
  writer = metrics.create_writer(str(tmp_path))
  assert writer.writers == []
  writer.write_scalars(1, {"loss": 1.0})
  writer.close()
  assert list(tmp_path.iterdir()) == []
  bar = metrics.ProgressBar(10)
  assert bar._bar.disable  # pylint: disable=protected-access


def test_progress_bar_starts_at_the_resumed_step_and_reports_a_rate(capsys):
  bar = metrics.ProgressBar(10, initial=4, description="train")
  for _ in range(3):
    bar.update(1, loss=0.123456)
  assert bar._bar.n == 7  # pylint: disable=protected-access
  assert bar.rate is not None and bar.rate > 0
  bar.close()
  err = capsys.readouterr().err
  assert "7/10" in err and "loss=0.1235" in err
