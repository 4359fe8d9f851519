"""Runs an experiment: every arm x seed as an ordinary balcap run, then the aggregate.

    python -m experiments.run experiments/advantage.py
    python -m experiments.run experiments/advantage.py --seeds 0 1 2 3 4   # more seeds
    python -m experiments.run experiments/advantage.py -- --config.rl.num_steps=200
    python -m experiments.run experiments/advantage.py --aggregate_only   # tables and plots

For each seed, each distinct SFT (arms with the same `sft_flags`) is trained once, with
`mode=sft`, and exported as an HF folder in float32 (`mode=export`, the params exactly); each
arm then runs `mode=train` from that folder (`--config.model.checkpoint`, SFT and vision
pre-training off), so the arms of one seed differ in their RL settings alone. Runs live in
`--workdir` (default experiments/runs, shared by every experiment): `sft-<digest>/seed<S>`
and `<arm>-<digest>/seed<S>`, the digest of the base config and every flag the run gets
(`Layout`), so experiments share the runs they have in common. Each folder holds the balcap
workdir `run/`, stdout.log / stderr.log (each command run, after "$ ") and, once finished,
done.json. Running the same command again skips what has done.json and resumes the rest
(balcap's own checkpoints: an interrupted run continues from its last one). A run that fails
is reported and the others go on; the command exits nonzero if any failed.

The aggregate (experiments/aggregate.py) goes to `--results` (default
experiments/results/<name>): summary.md, metrics.csv, final.png and curves.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time

from experiments import aggregate, spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where an experiment's runs live. A run's folder is named after what it runs (its arm's
  name and a digest of the base config and every flag it gets), so experiments sharing a
  workdir share the runs they have in common (the default arm, each seed's SFT) and a run
  whose flags change gets a new folder instead of resuming a stale one."""
  experiment: spec.Experiment
  workdir: str
  extra: tuple[str, ...] = ()  # flags from the command line, for every run

  def _digest(self, *flags) -> str:
    text = "\n".join((self.experiment.base, *self.experiment.flags, *self.extra, *flags))
    return hashlib.sha1(text.encode()).hexdigest()[:8]

  def sft(self, arm: spec.Arm, seed: int) -> str:
    return os.path.join(self.workdir, f"sft-{self._digest(*arm.sft_flags)}", f"seed{seed}")

  def arm(self, arm: spec.Arm, seed: int) -> str:
    digest = self._digest(*arm.sft_flags, "--", *arm.flags)
    return os.path.join(self.workdir, f"{arm.name}-{digest}", f"seed{seed}")


def _balcap(folder: str, base: str, flags: list[str]) -> tuple[str, ...]:
  return (sys.executable, "-m", "balcap.main", f"--config={os.path.join(REPO, base)}",
          f"--workdir={os.path.join(folder, 'run')}", *flags)


@dataclasses.dataclass(frozen=True)
class Job:
  label: str
  folder: str
  commands: tuple[tuple[str, ...], ...]
  needs: str | None = None  # the folder of the SFT job it starts from


def plan(layout: Layout, seeds) -> list[Job]:
  """The runs in the order they run: each seed's SFTs, then its arms."""
  experiment, jobs = layout.experiment, []
  for seed in seeds:
    common = [f"--config.seed={seed}", *experiment.flags, *layout.extra]
    planned = set()
    for arm in experiment.arms:
      folder = layout.sft(arm, seed)
      if folder in planned:
        continue
      planned.add(folder)
      flags = [*common, *arm.sft_flags]
      export = os.path.join(folder, "export")
      jobs.append(Job(f"SFT {os.path.basename(os.path.dirname(folder))} seed {seed}", folder, (
          _balcap(folder, experiment.base, [*flags, "--config.mode=sft"]),
          _balcap(folder, experiment.base, [
              *flags, "--config.mode=export", "--config.export.stage=sft",
              "--config.export.dtype=float32", f"--config.export.output={export}"]))))
    for arm in experiment.arms:
      start = layout.sft(arm, seed)
      jobs.append(Job(f"{arm.name} seed {seed}", layout.arm(arm, seed), (
          _balcap(layout.arm(arm, seed), experiment.base, [
              *common, *arm.sft_flags, *arm.flags,
              f"--config.model.checkpoint={os.path.join(start, 'export')}",
              "--config.sft.num_steps=0", "--config.vision_pretrain.num_steps=0",
              "--config.mode=train"]),), needs=start))
  return jobs


def run_job(job: Job) -> bool:
  """Runs one job's commands (appending to its logs) unless done; True when done."""
  label, folder, needs = job.label, job.folder, job.needs
  if spec.is_done(folder):
    print(f"{label}: done before, skipped", flush=True)
    return True
  if needs is not None and not spec.is_done(needs):
    print(f"{label}: not run, its SFT ({needs}) did not finish", flush=True)
    return False
  os.makedirs(folder, exist_ok=True)
  started = time.time()
  print(f"{label}: running, logs in {folder}/stdout.log", flush=True)
  with open(os.path.join(folder, "stdout.log"), "a", encoding="utf-8") as out, open(
      os.path.join(folder, "stderr.log"), "a", encoding="utf-8") as err:
    for command in job.commands:
      out.write(f"$ {' '.join(command)}\n")
      out.flush()
      done = subprocess.run(command, stdout=out, stderr=err, cwd=REPO, check=False)
      if done.returncode != 0:
        print(f"{label}: FAILED (exit {done.returncode}); see {folder}/stderr.log", flush=True)
        return False
  seconds = time.time() - started
  with open(os.path.join(folder, spec.DONE), "w", encoding="utf-8") as f:
    json.dump({"seconds": seconds, "commands": job.commands}, f, indent=2)
  print(f"{label}: finished in {seconds:.0f}s", flush=True)
  return True


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("experiment", help="an experiment file, e.g. experiments/advantage.py")
  parser.add_argument("--workdir", help="the runs (default experiments/runs)")
  parser.add_argument("--results", help="the aggregate (default experiments/results/<name>)")
  parser.add_argument("--seeds", type=int, nargs="+", help="default: the experiment's")
  parser.add_argument("--aggregate_only", action="store_true",
                      help="aggregate what has finished; run nothing")
  parser.add_argument("flags", nargs="*", help="config flags for every run, after --")
  args = parser.parse_args(argv)
  experiment = spec.load(args.experiment)
  # Absolute: the runs start in the repository, the runner's own files are written from here.
  layout = Layout(experiment, os.path.abspath(args.workdir or os.path.join(
      REPO, "experiments", "runs")), tuple(args.flags))
  results = os.path.abspath(
      args.results or os.path.join(REPO, "experiments", "results", experiment.name))
  seeds = tuple(args.seeds or experiment.seeds)
  failed: list[str] = []
  if not args.aggregate_only:
    jobs = plan(layout, seeds)
    print(f"experiment {experiment.name}: {len(experiment.arms)} arms x {len(seeds)} seeds, "
          f"{len(jobs)} runs in {layout.workdir}", flush=True)
    failed = [job.label for job in jobs if not run_job(job)]
  written = aggregate.write(layout, results, seeds)
  print(f"aggregate: {', '.join(written)}", flush=True)
  if failed:
    print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}", flush=True)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
