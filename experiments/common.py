"""What the CapWorld ablations share: the demo's config at a shorter RL stage, and the default
arm every ablation compares against (one run per seed, shared through the runs' digests)."""

from experiments.spec import Arm, Claim, Experiment

BASE = "configs/tiny.py"
# The demo (configs/tiny.py) with 60 RL steps instead of 120: its training reward levels off
# after ~40 (README, the demo's curves), and an arm's RL then takes ~2.5 minutes here.
FLAGS = ("--config.rl.num_steps=60", "--config.metrics.progress_bar=False")
SEEDS = (0, 1, 2)
DEFAULT = Arm("c_gdpo", label="c-GDPO (default)")


def ablation(name: str, description: str, arms: tuple[Arm, ...],
             claims: tuple[Claim, ...]) -> Experiment:
  """A CapWorld ablation: the shared base, flags and seeds, DEFAULT first among its arms."""
  return Experiment(name=name, description=description, base=BASE, flags=FLAGS, seeds=SEEDS,
                    arms=(DEFAULT, *arms), claims=claims)
