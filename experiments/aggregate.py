"""An experiment's finished runs as tables, claims and plots.

Per arm, over its seeds: mean, standard deviation and a 95% interval (Student's t) of each
after-RL test metric of the runs' eval.json. Each claim is checked on paired differences
(the two arms run from the same SFT checkpoint on each seed): it "reproduced" when the mean
difference points the claimed way and its 95% interval excludes zero, "same direction, not
significant" when only the mean does, and "not reproduced" otherwise.

Writes to the results folder:
  summary.md   the arms' table and one paragraph per claim, with the numbers;
  metrics.csv  one row per arm x seed (SFT and after-RL metrics, run seconds);
  final.png    the final metrics per arm (means, 95% intervals, each seed a dot);
  curves.png   RL training curves over steps (reward components, length ratio, masked
               share, words), each arm's mean over seeds with a +-1 sd band.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np
from scipy import stats

from experiments import spec

# The table's columns: (metric, header, digits).
COLUMNS = (("precision", "precision", 3), ("recall", "recall", 3),
           ("linguistic", "linguistic", 3), ("b_capscore", "b-CapScore", 1),
           ("length_ratio", "length ratio", 2), ("words", "words", 1), ("meta", "meta", 2),
           ("repetitive", "repetitive", 2), ("degenerate", "degenerate", 2))
# Metrics computed from an evaluation's, for claims and tables.
DERIVED = {"length_error": lambda m: abs(m["length_ratio"] - 1.0)}
# Training curves (rl/metrics.jsonl keys) and their panel titles.
CURVES = (("reward/precision/mean", "precision (train)"),
          ("reward/recall/mean", "recall (train)"),
          ("reward/linguistic/mean", "linguistic (train)"),
          ("rollout/length_ratio_mean", "length ratio"),
          ("length/masked_fraction", "masked by length"),
          ("rollout/words_mean", "words per caption"))


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def collect(layout, seeds) -> dict[str, dict[int, dict]]:
  """arm -> seed -> {"before", "after", "seconds", "curves"} of the finished runs of a
  `run.Layout`."""
  out: dict[str, dict[int, dict]] = {}
  for arm in layout.experiment.arms:
    for seed in seeds:
      folder = layout.arm(arm, seed)
      if not spec.is_done(folder):
        continue
      with open(os.path.join(folder, "run", "eval.json"), encoding="utf-8") as f:
        evaluation = json.load(f)
      with open(os.path.join(folder, spec.DONE), encoding="utf-8") as f:
        seconds = json.load(f)["seconds"]
      after = {k: v for k, v in evaluation["after"].items() if _finite(v)}
      after.update({k: f(after) for k, f in DERIVED.items()})
      before = {k: v for k, v in evaluation["before"].items() if _finite(v)}
      out.setdefault(arm.name, {})[seed] = {
          "before": before, "after": after, "seconds": seconds,
          "curves": read_curves(os.path.join(folder, "run", "rl", "metrics.jsonl"))}
  return out


def read_curves(path: str) -> dict[str, list[tuple[int, float]]]:
  """key -> [(step, value)] of the CURVES keys in a metrics.jsonl."""
  curves: dict[str, list[tuple[int, float]]] = {k: [] for k, _ in CURVES}
  if not os.path.exists(path):
    return curves
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      for key in curves:
        if _finite(row.get(key)):
          curves[key].append((int(row["step"]), float(row[key])))
  return curves


def interval(values) -> tuple[float, float, float]:
  """(mean, sd, 95% half-width) of values; sd and half-width NaN for fewer than 2."""
  values = np.asarray(values, np.float64)
  mean = float(values.mean()) if len(values) else math.nan
  if len(values) < 2:
    return mean, math.nan, math.nan
  sd = float(values.std(ddof=1))
  return mean, sd, float(stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values)))


def check_claim(claim, runs: dict[str, dict[int, dict]]) -> dict[str, Any]:
  """The claim's paired test over the seeds both arms finished."""
  better, worse = runs.get(claim.better, {}), runs.get(claim.worse, {})
  seeds = sorted(s for s in set(better) & set(worse)
                 if claim.metric in better[s]["after"] and claim.metric in worse[s]["after"])
  diffs = [better[s]["after"][claim.metric] - worse[s]["after"][claim.metric] for s in seeds]
  sign = -1.0 if claim.lower else 1.0
  mean, sd, half = interval(diffs)
  if not seeds:
    verdict = "not tested: no seed finished both arms"
  elif sign * mean > 0 and len(seeds) >= 2 and sign * mean - half > 0:
    verdict = "reproduced"
  elif sign * mean > 0:
    verdict = "same direction, not significant at 95%" if len(seeds) >= 2 else (
        "same direction on one seed (no interval)")
  else:
    verdict = "not reproduced"
  arms = {name: interval([r[s]["after"][claim.metric] for s in seeds])
          for name, r in ((claim.better, better), (claim.worse, worse))}
  return {"claim": claim.text, "verdict": verdict, "seeds": seeds, "mean_difference": mean,
          "sd": sd, "half_width": half, "arms": arms}


def _cell(values, digits: int) -> str:
  mean, sd, _ = interval(values)
  if math.isnan(mean):
    return "–"
  return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def summary(experiment, runs: dict[str, dict[int, dict]], seeds) -> str:
  """summary.md: the arms' table (mean ± sd over seeds, the b-CapScore's 95% interval) and
  one paragraph per claim."""
  lines = [f"# {experiment.name}", "", experiment.description.strip(), ""]
  total = sum(r["seconds"] for arm in runs.values() for r in arm.values())
  lines.append(f"Seeds {list(seeds)}; base config `{experiment.base}`"
               + (f" with {' '.join(experiment.flags)}" if experiment.flags else "")
               + f". Arm runs (RL and evaluation) took {total / 60:.0f} minutes in all; "
               "the shared SFT runs are not counted here. Values are mean ± sd over seeds "
               "of the after-RL test split.")
  lines += ["", "| arm | flags | seeds | " + " | ".join(h for _, h, _ in COLUMNS)
            + " | b-CapScore 95% interval | SFT b-CapScore | SFT length ratio |",
            "|---|---|---|" + "---|" * (len(COLUMNS) + 3)]
  for arm in experiment.arms:
    done = runs.get(arm.name, {})
    cells = [_cell([r["after"][m] for r in done.values() if m in r["after"]], d)
             for m, _, d in COLUMNS]
    mean, _, half = interval([r["after"]["b_capscore"] for r in done.values()])
    ci = "–" if math.isnan(half) else f"[{mean - half:.1f}, {mean + half:.1f}]"
    sft = [_cell([r["before"][m] for r in done.values() if m in r["before"]], d)
           for m, d in (("b_capscore", 1), ("length_ratio", 2))]
    flags = " ".join(f"`{f}`" for f in arm.sft_flags + arm.flags) or "(default)"
    lines.append(f"| {arm.title} | {flags} | {len(done)} | " + " | ".join(cells)
                 + f" | {ci} | {' | '.join(sft)} |")
  if experiment.claims:
    lines += ["", "## Claims", ""]
  for claim in experiment.claims:
    result = check_claim(claim, runs)
    lines.append(f"**{claim.text}** — {result['verdict']}.")
    if result["seeds"]:
      (bm, bs, _), (wm, ws, _) = (result["arms"][claim.better], result["arms"][claim.worse])
      fmt = lambda m, s: f"{m:.3f}" + ("" if math.isnan(s) else f" ± {s:.3f}")  # noqa: E731
      half = result["half_width"]
      ci = ("" if math.isnan(half) else
            f", 95% interval [{result['mean_difference'] - half:+.3f}, "
            f"{result['mean_difference'] + half:+.3f}]")
      lines.append(
          f"{claim.metric} ({'lower' if claim.lower else 'higher'} is better): "
          f"{experiment.arm(claim.better).title} {fmt(bm, bs)}, "
          f"{experiment.arm(claim.worse).title} {fmt(wm, ws)}; paired difference "
          f"{result['mean_difference']:+.3f}{ci} over seeds {result['seeds']}.")
    lines.append("")
  return "\n".join(lines).rstrip() + "\n"


def write_csv(path: str, experiment, runs: dict[str, dict[int, dict]]) -> None:
  keys = sorted({k for arm in runs.values() for r in arm.values() for k in r["after"]})
  first = [m for m, _, _ in COLUMNS if m in keys]
  keys = first + [k for k in keys if k not in first]
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["arm", "seed", "sft_b_capscore", *keys, "seconds"])
    for arm in experiment.arms:
      for seed, r in sorted(runs.get(arm.name, {}).items()):
        writer.writerow([arm.name, seed, r["before"].get("b_capscore", ""),
                         *(r["after"].get(k, "") for k in keys), round(r["seconds"], 1)])


def write(layout, results: str, seeds) -> list[str]:
  """Writes summary.md, metrics.csv and the plots of a `run.Layout`'s finished runs; returns
  their paths."""
  from experiments import plots  # pylint: disable=import-outside-toplevel
  experiment = layout.experiment
  os.makedirs(results, exist_ok=True)
  runs = collect(layout, seeds)
  paths = [os.path.join(results, name) for name in ("summary.md", "metrics.csv")]
  with open(paths[0], "w", encoding="utf-8") as f:
    f.write(summary(experiment, runs, seeds))
  write_csv(paths[1], experiment, runs)
  if runs:
    paths += plots.write(experiment, runs, results)
  return paths
