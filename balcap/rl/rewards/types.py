"""What rewards and judges exchange: samples in, per-component scores (NaN = unscored) out.

A `Sample` carries everything a judge may need about one caption, and its `id` travels with
every request a judge makes, so a score can never land on the wrong caption. A `Judge` scores
a batch of samples into `Judgement`s; a component it could not score is NaN, with the cause
in `failures` (see `FAILURE_CAUSES`), and the run carries on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Protocol, Sequence

# The judged reward components, each in [0, 1]. length_ratio (no judge needed) and the
# b-CapScore summary are added by `balcap.rl.rewards.functions`.
JUDGED_COMPONENTS = ("precision", "recall", "linguistic")

# Why a component is NaN; the metrics count each (component, cause) pair.
FAILURE_CAUSES = ("timeout", "http_error", "parse_error", "no_reference", "judge_error")


@dataclasses.dataclass(frozen=True)
class Sample:
  """One caption to score, with its example's context."""
  id: str                        # "<example id>/<rollout index>": unique within a batch
  caption: str
  references: tuple[str, ...]    # the example's reference caption(s)
  image: Any = None              # PIL.Image or uint8 [H, W, 3]; None for text-only judges
  fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. scene_graph


@dataclasses.dataclass
class Judgement:
  """A judge's verdict on one sample. Scores in [0, 1]; NaN where `failures` says why."""
  id: str
  precision: float = math.nan   # verified AND pointable assertions / all assertions
  recall: float = math.nan      # reference units covered / all units
  linguistic: float = math.nan  # mean of clarity, fluency, coherence, each in [0, 1]
  failures: dict[str, str] = dataclasses.field(default_factory=dict)  # component -> cause
  details: dict[str, Any] = dataclasses.field(default_factory=dict)   # for sample tables

  def fail(self, component: str, cause: str) -> None:
    if cause not in FAILURE_CAUSES:
      raise ValueError(f"unknown failure cause {cause!r}; known: {FAILURE_CAUSES}")
    setattr(self, component, math.nan)
    self.failures[component] = cause


class Judge(Protocol):
  """Scores captions. Must return one Judgement per sample, in order, with the same ids, and
  must not raise for a sample it cannot score (NaN + cause instead) or hang past its
  deadline."""
  name: str

  def judge(self, samples: Sequence[Sample]) -> list[Judgement]: ...
