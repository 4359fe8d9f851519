"""experiments/demo_seeds.py: per-seed tables, the spread over seeds and the targets."""

import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "demo_seeds.py")
_spec = importlib.util.spec_from_file_location("demo_seeds", _PATH)
demo_seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_seeds)

BEFORE = {"precision": 0.4, "recall": 0.35, "linguistic": 0.5, "b_capscore": 40.0,
          "length_ratio": 1.8, "words": 40.0, "degenerate": 0.9, "b_capscore_se": 1.2}


def _seed_folder(tmp_path, seed, after, log):
  folder = tmp_path / f"seed{seed}"
  (folder / "run").mkdir(parents=True)
  (folder / "run" / "eval.json").write_text(json.dumps({"before": BEFORE, "after": after}))
  (folder / "stdout.log").write_text(log)
  return str(folder)


LOG = ("      vision pre-training: 400/400 steps in 100s; held-out objects named right: ...\n"
       "[2/5] SFT: 700/700 steps on sft_caption captions in 500s\n"
       "[3/5] evaluation before RL on 500 test examples: b-CapScore 40.0 (20s)\n"
       "[4/5] RL (c_gdpo, judge capworld): 120/120 steps in 300s\n"
       "done in 850s; metrics in ...\n")


def test_a_seed_that_meets_every_target_and_one_that_does_not(tmp_path):
  good = dict(BEFORE, precision=0.7, recall=0.45, linguistic=0.95, b_capscore=61.0,
              length_ratio=1.0, words=22.0, degenerate=0.02, b_capscore_se=1.0)
  bad = dict(good, recall=0.3, b_capscore=52.0, degenerate=0.2)
  results = {0: demo_seeds.summarise_seed(_seed_folder(tmp_path, 0, good, LOG), 1.0),
             1: demo_seeds.summarise_seed(_seed_folder(tmp_path, 1, bad, LOG), 1.0)}
  assert results[0]["seconds"] == 850.0
  assert results[0]["stages"] == {"vision": 100, "sft": 500, "rl": 300}
  assert all(demo_seeds.targets_met(results[0]).values())
  missed = [n for n, ok in demo_seeds.targets_met(results[1]).items() if not ok]
  assert missed == ["gain", "recall_up", "few_degenerate"]
  text = demo_seeds.summary(results)
  assert "| b_capscore | 40.0 → 61.0 (+21.0) | 40.0 → 52.0 (+12.0) | +16.5 ± 6.4 |" in text
  assert ("| minutes (vision s / SFT s / RL s) | 14.2 (100 / 400 / 300) | 14.2 (100 / 400 / 300) | |"
          in text)
  assert "- seed 0: meets every target" in text
  assert "- seed 1: misses: b-CapScore +15 or more; recall up; degenerate captions <= 5%" in text


def test_a_failing_seed_stops_the_run_with_its_log(tmp_path, monkeypatch):
  class Done:
    returncode = 3
  monkeypatch.setattr(demo_seeds.subprocess, "run", lambda *a, **k: Done())
  with pytest.raises(SystemExit, match="seed 4 failed .exit 3.: see .*seed4/stderr.log"):
    demo_seeds.run_seed(4, str(tmp_path), "configs/tiny.py", ["--config.rl.num_steps=2"])
