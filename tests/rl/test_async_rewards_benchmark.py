"""Smoke test of benchmarks/async_rewards.py: both modes run the demo's step side by side."""

import importlib.util
import math

from testlib import REPO


def test_the_async_rewards_benchmark_runs_both_modes(capsys):
  spec = importlib.util.spec_from_file_location(
      "async_rewards", REPO / "benchmarks" / "async_rewards.py")
  benchmark = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(benchmark)
  result = benchmark.main(["--steps", "1", "--latency", "0.2", "--new-tokens", "4"])
  assert math.isfinite(result["ratio"]) and result["ratio"] > 0
  # Behaviour, not timing (the judge's sleep overlaps scoring even in series, so no wait
  # bound holds on a loaded machine): only the async run samples the next step ahead.
  assert result["off/sample_ahead"] == 0.0 and result["on/sample_ahead"] > 0.0
  assert "on / off" in capsys.readouterr().out
