"""Smoke test of benchmarks/device_suite.py: every measurement runs, on the tiny model."""

import importlib.util
import math

from testlib import REPO


def test_the_device_suite_runs_every_measurement(capsys):
  spec = importlib.util.spec_from_file_location(
      "device_suite", REPO / "benchmarks" / "device_suite.py")
  suite = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(suite)
  result = suite.main(["--tiny"])
  for key in ("decode_tokens_per_s", "decode_bound_tokens_per_s", "transformers_tokens_per_s",
              "update_seconds", "mfu"):
    assert math.isfinite(result[key]) and result[key] > 0, key
  assert result["predicted_bytes"] > 0
  out = capsys.readouterr().out
  assert "transformers generate:" in out and "MFU" in out and "compiled update needs" in out
