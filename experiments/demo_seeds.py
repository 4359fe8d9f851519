"""The CPU demo over several seeds: does RL's gain hold, by how much, with what spread?

    python experiments/demo_seeds.py --workdir /tmp/seeds                  # seeds 0 1 2
    python experiments/demo_seeds.py --workdir /tmp/seeds --seeds 0 1 2 3 \
        -- --config.rl.num_steps=160                                       # any config flag

Runs `python -m balcap.main --config=configs/tiny.py --config.seed=S` once per seed, each in
`<workdir>/seed<S>` (running the script again resumes unfinished seeds and reuses finished
ones), then prints one table: each row's SFT -> after-RL values per seed, the mean and
standard deviation over seeds of its change, the stage times, and which of the demo's
targets each seed misses (`TARGETS`, the bar issue 13 set: the b-CapScore gain, precision
and recall both up, linguistic not down, length ratio in band, few degenerate captions, the
wall time). The summary is also written to `<workdir>/summary.md` and
`<workdir>/summary.json`.

One seed at a time: the demo uses every core.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = (("precision", 3), ("recall", 3), ("linguistic", 3), ("b_capscore", 1),
        ("length_ratio", 2), ("words", 1), ("degenerate", 2))
# What a seed must show (issue 13): name -> (description, check(before, after, seconds)).
TARGETS = {
    "gain": ("b-CapScore +15 or more", lambda b, a, s: a["b_capscore"] - b["b_capscore"] >= 15),
    "precision_up": ("precision up", lambda b, a, s: a["precision"] > b["precision"]),
    "recall_up": ("recall up", lambda b, a, s: a["recall"] > b["recall"]),
    "linguistic_kept": ("linguistic not down", lambda b, a, s: a["linguistic"] >= b["linguistic"]),
    "length_in_band": ("length ratio in [0.5, 2]",
                       lambda b, a, s: 0.5 <= a["length_ratio"] <= 2.0),
    "few_degenerate": ("degenerate captions <= 5%", lambda b, a, s: a["degenerate"] <= 0.05),
    "time": ("15 minutes or less", lambda b, a, s: s <= 15 * 60),
}
_STAGE = re.compile(r"^\[(\d)/5\] (\w+).* in (\d+)s")
# Printed inside the SFT stage, whose time includes it.
_VISION = re.compile(r"^\s*vision pre-training: .* in (\d+)s")


def run_seed(seed: int, workdir: str, config: str, flags: list[str]) -> dict:
  """Runs (or resumes) the demo for one seed; its eval.json plus stage and wall seconds."""
  folder = os.path.join(workdir, f"seed{seed}")
  os.makedirs(folder, exist_ok=True)
  command = [sys.executable, "-m", "balcap.main", f"--config={config}",
             f"--workdir={folder}/run", f"--config.seed={seed}", *flags]
  print(f"seed {seed}: {' '.join(command)}", flush=True)
  started = time.time()
  with open(os.path.join(folder, "stdout.log"), "a", encoding="utf-8") as out, open(
      os.path.join(folder, "stderr.log"), "a", encoding="utf-8") as err:
    done = subprocess.run(command, stdout=out, stderr=err, cwd=REPO, check=False)
  if done.returncode != 0:
    raise SystemExit(f"seed {seed} failed (exit {done.returncode}): see {folder}/stderr.log")
  return summarise_seed(folder, time.time() - started)


def summarise_seed(folder: str, seconds: float) -> dict:
  """A finished seed's eval.json, with the stage times its last log printed."""
  with open(os.path.join(folder, "run", "eval.json"), encoding="utf-8") as f:
    result = json.load(f)
  stages, total = {}, seconds
  log = os.path.join(folder, "stdout.log")
  lines = open(log, encoding="utf-8").read().splitlines() if os.path.exists(log) else []
  for line in lines:  # the last run's lines win: a resumed seed reports its last stages
    match = _STAGE.match(line)
    if match:
      stages[match.group(2).lower()] = int(match.group(3))
    match = _VISION.match(line)
    if match:
      stages["vision"] = int(match.group(1))
    if line.startswith("done in "):
      total = float(line.split()[2].rstrip("s;"))
  result["seconds"] = total
  result["stages"] = stages
  return result


def _stage_seconds(stages: dict) -> str:
  """"vision / SFT / RL" seconds; SFT without the vision pre-training it opens with."""
  vision, sft = stages.get("vision"), stages.get("sft")
  if vision is not None and sft is not None:
    sft -= vision
  show = lambda value: "?" if value is None else str(value)  # noqa: E731
  return f"{'–' if vision is None else vision} / {show(sft)} / {show(stages.get('rl'))}"


def targets_met(result: dict) -> dict[str, bool]:
  before, after = result["before"], result["after"]
  return {name: bool(check(before, after, result["seconds"]))
          for name, (_, check) in TARGETS.items()}


def summary(results: dict[int, dict]) -> str:
  """Markdown: per-seed before/after/change, mean and sd of the change, targets, times."""
  seeds = sorted(results)
  lines = ["| | " + " | ".join(f"seed {s}: SFT → RL (change)" for s in seeds)
           + " | change, mean ± sd |", "|---|" + "---|" * (len(seeds) + 1)]
  for name, digits in ROWS:
    cells, changes = [], []
    for s in seeds:
      before, after = results[s]["before"][name], results[s]["after"][name]
      changes.append(after - before)
      cells.append(f"{before:.{digits}f} → {after:.{digits}f} ({after - before:+.{digits}f})")
    spread = statistics.stdev(changes) if len(changes) > 1 else 0.0
    lines.append(f"| {name} | " + " | ".join(cells)
                 + f" | {statistics.mean(changes):+.{digits}f} ± {spread:.{digits}f} |")
  se = [results[s]["after"].get("b_capscore_se") for s in seeds]
  if all(x is not None for x in se):
    lines.append("| b-CapScore standard error (after) | "
                 + " | ".join(f"{x:.1f}" for x in se) + " | |")
  lines.append("| minutes (vision s / SFT s / RL s) | " + " | ".join(
      f"{results[s]['seconds'] / 60:.1f} ({_stage_seconds(results[s]['stages'])})"
      for s in seeds) + " | |")
  lines.append("")
  for s in seeds:
    met = targets_met(results[s])
    missed = [TARGETS[n][0] for n, ok in met.items() if not ok]
    lines.append(f"- seed {s}: " + ("meets every target" if not missed else
                                    "misses: " + "; ".join(missed)))
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.py"))
  parser.add_argument("flags", nargs="*", help="config flags for every seed, after --")
  args = parser.parse_args(argv)
  results = {seed: run_seed(seed, args.workdir, args.config, args.flags) for seed in args.seeds}
  text = summary(results)
  print(text)
  with open(os.path.join(args.workdir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  with open(os.path.join(args.workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump({str(s): {"before": {k: v for k, v in r["before"].items() if k != "per_image"},
                        "after": {k: v for k, v in r["after"].items() if k != "per_image"},
                        "seconds": r["seconds"], "stages": r["stages"],
                        "targets": targets_met(r)} for s, r in results.items()}, f, indent=2)
  return 0 if all(all(targets_met(r).values()) for r in results.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
