"""What an experiment is: a base config, its arms (config overrides), seeds and the claims it
tests. An experiment file under experiments/ defines `EXPERIMENT = Experiment(...)`;
`python -m experiments.run experiments/<name>.py` runs it (experiments/run.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
DONE = "done.json"  # what a finished run leaves in its folder (its seconds and commands)


def is_done(folder: str) -> bool:
  """Whether the run in `folder` finished (run.py writes DONE last)."""
  return os.path.exists(os.path.join(folder, DONE))


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: `flags` configure its RL run. `sft_flags` change its SFT warm start; arms with
  the same `sft_flags` start from one SFT checkpoint per seed, trained once."""
  name: str
  flags: tuple[str, ...] = ()
  sft_flags: tuple[str, ...] = ()
  label: str = ""  # for tables and plots; the name if empty

  @property
  def title(self) -> str:
    return self.label or self.name


@dataclasses.dataclass(frozen=True)
class Claim:
  """A direction the paper reports: arm `better` beats arm `worse` on `metric` (an after-RL
  metric of the evaluation, or one of aggregate.DERIVED), higher being better unless
  `lower`. Checked per seed, as paired differences (the two arms share each seed's SFT)."""
  text: str
  better: str
  worse: str
  metric: str
  lower: bool = False


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str
  description: str
  base: str                            # a config file, relative to the repository
  arms: tuple[Arm, ...]
  seeds: tuple[int, ...] = (0, 1, 2)
  flags: tuple[str, ...] = ()          # for every run (SFT and RL)
  claims: tuple[Claim, ...] = ()

  def __post_init__(self):
    problems = []
    if not _NAME.match(self.name):
      problems.append(f"name {self.name!r}: use lowercase letters, digits, - and _")
    names = [a.name for a in self.arms]
    if not names:
      problems.append("no arms")
    for name in names:
      if not _NAME.match(name) or name == "sft":
        problems.append(f"arm name {name!r}: lowercase letters, digits, - and _; not 'sft'")
    if len(set(names)) != len(names):
      problems.append(f"arm names repeat: {names}")
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      problems.append(f"seeds {self.seeds}: give distinct seeds")
    for claim in self.claims:
      for arm in (claim.better, claim.worse):
        if arm not in names:
          problems.append(f"claim {claim.text!r} names arm {arm!r}, not one of {names}")
    for arm in self.arms:
      for flag in arm.flags + arm.sft_flags + self.flags:
        if not flag.startswith("--config."):
          problems.append(f"arm {arm.name}: flag {flag!r} is not a --config.<field>=<value>")
    if problems:
      raise ValueError(f"experiment {self.name}: " + "; ".join(problems))

  def arm(self, name: str) -> Arm:
    return next(a for a in self.arms if a.name == name)


def load(path: str) -> Experiment:
  """The EXPERIMENT an experiment file defines."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no experiment file {path}")
  spec = importlib.util.spec_from_file_location(
      "experiment_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  experiment = getattr(module, "EXPERIMENT", None)
  if not isinstance(experiment, Experiment):
    raise ValueError(f"{path} defines no EXPERIMENT = experiments.spec.Experiment(...)")
  return experiment
