"""Smoke test of benchmarks/eval_judges.py: every judged benchmark, cold then from the cache."""

import importlib.util

from testlib import REPO


def test_the_eval_judges_benchmark_runs_cold_and_warm(capsys):
  spec = importlib.util.spec_from_file_location("eval_judges",
                                                REPO / "benchmarks" / "eval_judges.py")
  benchmark = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(benchmark)
  result = benchmark.main(["--items", "2"])
  # DCScore: decompose + 3 match + 3 verify per caption; CaptionQA: 3 questions; arena: 1.
  assert [result[f"{b}/cold"]["asks"] for b in ("dcscore", "captionqa", "caparena")] == [14, 6, 2]
  assert all(result[f"{b}/warm"]["asks"] == 0 for b in ("dcscore", "captionqa", "caparena"))
  assert all(r["invalid"] == 0 for k, r in result.items() if "/" in k and "invalid" in r)
  assert "s/caption" in capsys.readouterr().out
