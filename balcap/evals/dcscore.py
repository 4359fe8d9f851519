"""DCScore (DeCapBench): a caption's facts checked against the image and matched to oracle facts.

The protocol (Ye et al., "Painting with Words", 2025): a judge decomposes the caption into
atomic facts, each tagged descriptive (relevance 1) or not; it matches each fact to one of the
benchmark's human-annotated oracle facts or to none (sampled `match_samples` = 3 times at
temperature 1.0), and verifies each fact against the image and the oracle caption
(`verify_samples` = 3 times at temperature 0.3). Every verify x match pair of samples is one
trial; a trial's precision, recall and F1 are

    precision = sum_p v(p) / |P|
    recall    = (#{p: v(p)=1, m(p)=none} + sum_{p: v(p)=1, m(p)=o} 1 / c_o)
                / (|O| + #{p: v(p)=1, m(p)=none})
    F1        = 2 P R / (P + R + 1e-8)

with v(p) in {0, 1} the verification, m(p) the oracle fact p matches (or none), c_o the number
of predicted facts matched to oracle fact o (counted over all predicted facts: a fact that two
predicted facts both match is shared between them), O the oracle facts. Correct facts the
oracle lacks count as recalled extra facts. The same over the descriptive facts alone gives
F1_rel (c_o still over all facts, |O| unchanged). An image's DCScore is the mean over trials of
(F1 + F1_rel) / 2; the benchmark's is the mean over its valid images x 100. An image whose
judge replies never parsed is invalid: listed by id, never averaged in.

This file is the scoring alone, over the judge's parsed outputs; the driver asks the judge.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Sequence

import numpy as np

EPSILON = 1e-8
MATCH_SAMPLES, MATCH_TEMPERATURE = 3, 1.0
VERIFY_SAMPLES, VERIFY_TEMPERATURE = 3, 0.3


@dataclasses.dataclass(frozen=True)
class TrialScore:
  precision: float
  recall: float
  f1: float


def _f1(precision: float, recall: float) -> float:
  return 2 * precision * recall / (precision + recall + EPSILON)


def trial(verified: Sequence[bool], matches: Sequence[int | None], num_oracle: int,
          subset: Sequence[bool] | None = None) -> TrialScore:
  """Precision, recall and F1 of one verify x match trial.

  `verified[p]`, `matches[p]` (an oracle fact's index, or None) for every predicted fact p;
  `subset[p]` (default all) selects the facts scored, e.g. the descriptive ones. c_o, the
  number of facts matched to oracle fact o, counts every predicted fact whatever `subset`.
  """
  if len(verified) != len(matches):
    raise ValueError(f"{len(verified)} verifications for {len(matches)} matched facts")
  if subset is not None and len(subset) != len(matches):
    raise ValueError(f"a subset of {len(subset)} flags for {len(matches)} facts")
  bad = [m for m in matches if m is not None and not 0 <= m < num_oracle]
  if bad:
    raise ValueError(f"matches {bad} name no oracle fact (there are {num_oracle})")
  shared = np.bincount([m for m in matches if m is not None], minlength=num_oracle)
  chosen = [p for p in range(len(matches)) if subset is None or subset[p]]
  if not chosen:
    return TrialScore(0.0, 0.0, 0.0)
  correct = [p for p in chosen if verified[p]]
  extra = sum(1 for p in correct if matches[p] is None)
  covered = sum(1.0 / shared[matches[p]] for p in correct if matches[p] is not None)
  precision = len(correct) / len(chosen)
  denominator = num_oracle + extra
  recall = (extra + covered) / denominator if denominator else 0.0
  return TrialScore(precision, recall, _f1(precision, recall))


@dataclasses.dataclass(frozen=True)
class ImageScore:
  dcscore: float          # mean over trials of (F1 + F1_rel) / 2
  f1: float
  f1_relevant: float
  precision: float
  recall: float
  precision_relevant: float
  recall_relevant: float
  facts: int
  trials: int


def image_score(relevant: Sequence[bool], verifications: Sequence[Sequence[bool]],
                matchings: Sequence[Sequence[int | None]], num_oracle: int) -> ImageScore:
  """One image's scores over every (verification sample, matching sample) pair.

  `relevant[p]`: fact p is descriptive; `verifications[i][p]`, `matchings[j][p]`: sample i's
  verification, sample j's match of fact p.
  """
  if not verifications or not matchings:
    raise ValueError("an image needs at least one verification and one matching sample")
  rows = []
  for verified, matches in itertools.product(verifications, matchings):
    every = trial(verified, matches, num_oracle)
    descriptive = trial(verified, matches, num_oracle, relevant)
    rows.append((every.precision, every.recall, every.f1, descriptive.precision,
                 descriptive.recall, descriptive.f1))
  p, r, f1, p_rel, r_rel, f1_rel = np.mean(np.asarray(rows, np.float64), axis=0)
  return ImageScore(float((f1 + f1_rel) / 2), float(f1), float(f1_rel), float(p), float(r),
                    float(p_rel), float(r_rel), len(relevant), len(rows))


def benchmark(per_image: Mapping[str, ImageScore | None]) -> dict[str, Any]:
  """The benchmark's score (x 100) over the valid images; None marks an invalid image."""
  valid = {k: v for k, v in per_image.items() if v is not None}
  invalid = sorted(k for k, v in per_image.items() if v is None)
  mean = lambda field: (  # noqa: E731
      100.0 * float(np.mean([getattr(v, field) for v in valid.values()])) if valid else None)
  return {"score": mean("dcscore"), "f1": mean("f1"), "f1_relevant": mean("f1_relevant"),
          "precision": mean("precision"), "recall": mean("recall"),
          "precision_relevant": mean("precision_relevant"),
          "recall_relevant": mean("recall_relevant"),
          "facts_per_caption": (float(np.mean([v.facts for v in valid.values()]))
                                if valid else None),
          "items": len(per_image), "valid": len(valid), "invalid": len(invalid),
          "invalid_ids": invalid}
