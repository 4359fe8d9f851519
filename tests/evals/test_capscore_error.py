"""The before/after table's standard errors: bootstrap over images, paired for the change."""

import math

import numpy as np

from balcap.evals import captioning


def _metrics(scores: np.ndarray) -> dict:
  return {"per_image": {c: [None if math.isnan(v) else float(v) for v in scores[:, k]]
                        for k, c in enumerate(captioning.JUDGED)}}


def test_bootstrap_se_matches_the_delta_method():
  # Only precision varies: b = 300 / (1/p + 2), so SE(b) ~ |db/dp| * sd(p) / sqrt(N).
  rng = np.random.default_rng(1)
  n = 2000
  p = rng.uniform(0.2, 0.8, n)
  scores = np.stack([p, np.ones(n), np.ones(n)], axis=1)
  mean = p.mean()
  slope = 300.0 / (1.0 / mean + 2.0) ** 2 / mean**2
  expected = slope * p.std() / math.sqrt(n)
  assert abs(captioning.bootstrap_se(scores) - expected) < 0.1 * expected


def test_bootstrap_se_is_zero_for_identical_images_and_nan_for_one():
  assert captioning.bootstrap_se(np.full((50, 3), 0.5)) == 0.0
  assert math.isnan(captioning.bootstrap_se(np.full((1, 3), 0.5)))


def test_change_se_is_paired():
  rng = np.random.default_rng(2)
  before = rng.uniform(0.1, 0.9, (300, 3))
  after = np.clip(before + 0.1, 0, 1)  # every image better by the same amount
  alone = captioning.bootstrap_se(before)
  paired = captioning.change_se(_metrics(before), _metrics(after))
  assert alone > 0.5  # the images differ a lot...
  assert paired < 0.2 * alone  # ...but the change is nearly the same on each
  assert captioning.change_se(_metrics(before), _metrics(before)) == 0.0
  # A component the judge could not score (None) is left out of that resample's mean.
  holes = before.copy()
  holes[::7, 1] = np.nan
  assert math.isfinite(captioning.change_se(_metrics(holes), _metrics(after)))
  assert math.isnan(captioning.change_se(_metrics(before), _metrics(after[:-1])))


def test_table_prints_standard_errors():
  rng = np.random.default_rng(3)
  sides = []
  for shift in (0.0, 0.2):
    scores = np.clip(rng.uniform(0.1, 0.7, (100, 3)) + shift, 0, 1)
    means = scores.mean(axis=0)
    sides.append({"precision": means[0], "recall": means[1], "linguistic": means[2],
                  "b_capscore": 50.0, "length_ratio": 1.0, "words": 20.0,
                  "b_capscore_se": captioning.bootstrap_se(scores), **_metrics(scores),
                  "right/colour": 0.5 + shift, "covered/region": 0.25 + shift,
                  **({"right/region": 0.1} if not shift else {})})
  lines = captioning.table(*sides).splitlines()
  assert lines[-5:] == ["claims right, by kind:",
                        "  colour            0.50      0.70     +0.20",
                        "  region            0.10         -         -",  # none said after
                        "reference facts covered, by kind:",
                        "  region            0.25      0.45     +0.20"]
  line = lines[-6].split()
  assert line[:2] == ["b_capscore", "se"]
  assert [float(x) for x in line[2:4]] == [round(s["b_capscore_se"], 1) for s in sides]
