"""An experiment's plots (PNG, matplotlib without a display): final metrics and RL curves."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on a pod or in CI
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from experiments import aggregate  # noqa: E402  pylint: disable=wrong-import-position

FINAL = (("precision", "precision"), ("recall", "recall"), ("linguistic", "linguistic"),
         ("b_capscore", "b-CapScore"), ("length_ratio", "length ratio"),
         ("degenerate", "degenerate share"))


def final(experiment, runs, path: str) -> None:
  """One panel per metric: each arm's mean with its 95% interval, each seed a dot."""
  arms = [a for a in experiment.arms if a.name in runs]
  figure, axes = plt.subplots(1, len(FINAL), figsize=(3.2 * len(FINAL), 3.6))
  for ax, (metric, title) in zip(axes, FINAL):
    for x, arm in enumerate(arms):
      values = [r["after"][metric] for r in runs[arm.name].values() if metric in r["after"]]
      if not values:
        continue
      mean, _, half = aggregate.interval(values)
      ax.bar(x, mean, color=f"C{x}", alpha=0.45)
      if not math.isnan(half):
        ax.errorbar(x, mean, yerr=half, color="black", capsize=4)
      ax.scatter(np.full(len(values), x) + np.linspace(-0.15, 0.15, len(values)), values,
                 color=f"C{x}", edgecolor="black", zorder=3, s=18)
    ax.set_title(title)
    ax.set_xticks(range(len(arms)), [a.title for a in arms], rotation=35, ha="right")
  figure.suptitle(f"{experiment.name}: after RL, test split (bars: mean, 95% interval)")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def curves(experiment, runs, path: str) -> None:
  """One panel per training curve: each arm's mean over seeds, +-1 sd band, by RL step."""
  arms = [a for a in experiment.arms if a.name in runs]
  figure, axes = plt.subplots(2, math.ceil(len(aggregate.CURVES) / 2), figsize=(13, 7))
  for ax, (key, title) in zip(axes.flat, aggregate.CURVES):
    for k, arm in enumerate(arms):
      series = [dict(r["curves"][key]) for r in runs[arm.name].values() if r["curves"][key]]
      if not series:
        continue
      steps = sorted(set.intersection(*(set(s) for s in series)))  # logged by every seed
      if not steps:
        continue
      values = np.array([[s[step] for step in steps] for s in series])
      mean, sd = values.mean(0), values.std(0, ddof=1) if len(series) > 1 else 0 * values[0]
      ax.plot(steps, mean, color=f"C{k}", label=f"{arm.title} ({len(series)})")
      ax.fill_between(steps, mean - sd, mean + sd, color=f"C{k}", alpha=0.2)
    ax.set_title(title)
    ax.set_xlabel("RL step")
  axes.flat[0].legend(fontsize=8)
  figure.suptitle(f"{experiment.name}: RL training curves (mean over seeds, ±1 sd)")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def write(experiment, runs, results: str) -> list[str]:
  paths = [os.path.join(results, "final.png"), os.path.join(results, "curves.png")]
  final(experiment, runs, paths[0])
  curves(experiment, runs, paths[1])
  return paths
