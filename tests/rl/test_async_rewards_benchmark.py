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
  # In series the step waits out the judge's sleep after sampling; overlapped it need not.
  assert result["off/reward_wait"] >= 0.2
  assert "on / off" in capsys.readouterr().out
