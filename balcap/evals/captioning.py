"""Caption a held-out split greedily and score it with the run's judge: the before/after table.

Reports precision, recall, linguistic (means over the captions each could score),
b-CapScore (100 x the harmonic mean of those three means, the paper's table metric), and the
mean length ratio to the references, plus a few example captions. Each host captions its own
shard; the sums are combined over hosts.

b-CapScore is not a mean of per-image values, so its standard error is a bootstrap over the
images (`BOOTSTRAP_RESAMPLES`, fixed seed); the before/after change's is a paired bootstrap
(the same resampled images on both sides), which is far smaller than either side's because
an image hard before RL is hard after it too (the demo's SFT policy: about 1.1 points over
100 test images, so the demo uses 500). Where the judge counts its claims by kind
(CapWorldJudge's `by_kind`), `right/<kind>` is the share of each kind that is true: which
attributes (colours, shapes, regions, ...) the captioner reads, and `covered/<kind>` the share
of each kind of recall unit (the references' facts) covered: what it leaves out (recall by
kind; CapWorldJudge's `units_by_kind`); where its details flag
captions, `degenerate`, `meta` and `repetitive` are the shares flagged (`FLAGS`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from balcap import parallel, sampling
from balcap.data import pipeline
from balcap.data.capworld.world import FACT_KINDS
from balcap.models import policy as policy_lib
from balcap.rl.rewards import functions

COMPONENTS = ("precision", "recall", "linguistic", "length_ratio")
JUDGED = ("precision", "recall", "linguistic")
# Shares of captions a judge flags (`_flags`), where its details say.
FLAGS = ("degenerate", "meta", "repetitive")
BOOTSTRAP_RESAMPLES = 1000


def evaluate(policy, params: Any, source, reward: functions.JudgeReward, *, prompt: str,
             max_new_tokens: int, batch_size: int, num_examples: int = -1,
             prompt_bucket: int = sampling.PROMPT_BUCKET, num_shown: int = 2
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(metrics, example rows) for greedy captions of `source` (its first `num_examples`).
  Metrics are floats, but for `per_image` ({component: [value or None per image]})."""
  if 0 <= num_examples < len(source):
    source = [source[i] for i in range(num_examples)]
  # + caption words, + the judge's flags (judges that say: degenerate, meta, repetitive)
  sums = np.zeros(len(COMPONENTS) + 1 + len(FLAGS))
  counts = np.zeros(len(COMPONENTS) + 1 + len(FLAGS))
  shown: list[dict[str, Any]] = []
  per_image: list[np.ndarray] = []  # [batch, 3] P, R, L per row (NaN where unscored)
  real_rows: list[np.ndarray] = []  # [batch] False for the padding rows
  by_kind: dict[str, np.ndarray] = {}  # claim kind -> [distinct claims, verified], if judged
  units: dict[str, np.ndarray] = {}  # recall unit kind -> [units, covered], if judged
  spec = None
  for batch in pipeline.eval_batches(source, batch_size=batch_size):
    real = np.asarray(batch["mask"])
    images = [Image.fromarray(np.asarray(image)) for image in batch["image"]]
    chats = policy.processor(prompts=[prompt] * len(images), images=images)
    if spec is None:
      spec = sampling.sampling_params(policy, max_new_tokens=max_new_tokens, temperature=0.0)
    prepared = sampling.prepare_prompts(policy, chats, prompt_bucket)
    inputs = policy_lib.model_inputs(prepared)
    rollouts = sampling.generate_prepared(
        policy, params, parallel.global_inputs(inputs, policy.mesh),
        policy.family.decode_start(policy.config, prepared), jax.random.key(0), spec)
    captions = decode(policy, rollouts)
    examples = [{k: batch[k][i] for k in batch if k != "mask"} for i in range(len(captions))]
    rewards = _judged(reward, examples, captions)
    per_image.append(np.stack([np.asarray(rewards.components[c], np.float64)
                               for c in JUDGED], axis=1))
    real_rows.append(real.astype(bool))
    for i, caption in enumerate(captions):
      if not real[i]:
        continue
      details = rewards.judgements[i].details or {}
      for totals, key in ((by_kind, "by_kind"), (units, "units_by_kind")):
        for kind, pair in (details.get(key) or {}).items():
          totals[kind] = totals.get(kind, np.zeros(2)) + np.asarray(pair, np.float64)
      values = [rewards.components[c][i] for c in COMPONENTS] + [
          len(caption.split()), *_flags(rewards.judgements[i])]
      for k, value in enumerate(values):
        if not math.isnan(value):
          sums[k] += value
          counts[k] += 1
      if len(shown) < num_shown:
        shown.append({"id": examples[i]["id"], "caption": caption,
                      "reference": examples[i]["references"][0],
                      **{c: float(rewards.components[c][i]) for c in COMPONENTS}})
  scores = np.concatenate(per_image) if per_image else np.zeros((0, 3))
  kept = np.concatenate(real_rows) if real_rows else np.zeros((0,), bool)
  if jax.process_count() > 1:
    gathered = multihost_utils.process_allgather(np.stack([sums, counts]))
    sums, counts = gathered.sum(axis=0)
    # Every host has the same number of (padded) batches, so the arrays stack.
    scores = np.asarray(multihost_utils.process_allgather(scores)).reshape(-1, 3)
    kept = np.asarray(multihost_utils.process_allgather(kept)).reshape(-1)
    by_kind, units = (_gathered_by_kind(totals) for totals in (by_kind, units))
  means = sums / np.maximum(counts, 1)
  metrics = {name: float(means[k]) for k, name in enumerate(COMPONENTS)}
  metrics["words"] = float(means[len(COMPONENTS)])
  # Shares of captions the judge flags (CapWorldJudge; NaN for judges that do not say):
  # degenerate (repeats or contradicts itself), meta (non-pointable commentary), repetitive
  # (says a claim or a sentence again).
  for k, flag in enumerate(FLAGS, start=len(COMPONENTS) + 1):
    metrics[flag] = float(means[k]) if counts[k] else float("nan")
  metrics["b_capscore"] = float(functions.b_capscore(*(np.array([metrics[c]]) for c in
                                                       ("precision", "recall",
                                                        "linguistic")))[0])
  metrics["examples"] = float(counts[0])
  scores = scores[kept]
  # Judges that say: the share of each kind of claim that is true (what the captioner reads)
  # and of each kind of recall unit covered (what it leaves out).
  for totals, prefix in ((by_kind, "right/"), (units, "covered/")):
    for kind in sorted(totals):
      metrics[prefix + kind] = float(totals[kind][1] / max(totals[kind][0], 1))
  metrics["b_capscore_se"] = bootstrap_se(scores)
  # Per image, in the source's order: what the paired standard error of a change needs.
  metrics["per_image"] = {c: [None if math.isnan(v) else float(v) for v in scores[:, k]]
                          for k, c in enumerate(JUDGED)}
  return metrics, shown


def _gathered_by_kind(totals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{kind: [count, hits]} summed over hosts; a fixed list of kinds, so every host gathers
  the same shape."""
  gathered = multihost_utils.process_allgather(
      np.stack([totals.get(k, np.zeros(2)) for k in FACT_KINDS]))
  return {k: t for k, t in zip(FACT_KINDS, np.asarray(gathered).sum(axis=0)) if t[0] > 0}


def _resampled_capscores(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """b-CapScore of BOOTSTRAP_RESAMPLES resamples (with replacement) of the rows of `scores`
  [N, 3], drawn from `rng`."""
  picks = rng.integers(len(scores), size=(BOOTSTRAP_RESAMPLES, len(scores)))
  with np.errstate(invalid="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a resample with a component all NaN
    means = np.nanmean(scores[picks], axis=1)  # [B, 3]
  return functions.b_capscore(means[:, 0], means[:, 1], means[:, 2])


def bootstrap_se(scores: np.ndarray, seed: int = 0) -> float:
  """Standard error of the b-CapScore of per-image scores [N, 3] (P, R, L), by bootstrap."""
  if len(scores) < 2:
    return float("nan")
  return float(np.nanstd(_resampled_capscores(scores, np.random.default_rng(seed)), ddof=1))


def change_se(before: dict[str, Any], after: dict[str, Any], seed: int = 0) -> float:
  """Standard error of after - before b-CapScore on the same images (paired bootstrap), from
  the two evaluations' `per_image` scores; NaN when they are not the same images."""
  a, b = (np.array([[np.nan if v is None else v for v in m["per_image"][c]] for c in JUDGED],
                   np.float64).T for m in (before, after))
  if a.shape != b.shape or len(a) < 2:
    return float("nan")
  # One draw of image indices serves both sides: the same generator state, twice.
  first = _resampled_capscores(a, np.random.default_rng(seed))
  second = _resampled_capscores(b, np.random.default_rng(seed))
  return float(np.nanstd(second - first, ddof=1))


def _flags(judgement) -> list[float]:
  """FLAGS of one judged caption, 1.0 / 0.0, NaN where the judge's details do not say."""
  details = judgement.details or {}
  said = {"degenerate": details.get("degenerate"),
          "meta": None if "non_pointable" not in details else details["non_pointable"] > 0,
          "repetitive": None if "restated" not in details else details["restated"] > 0}
  return [float("nan") if said[f] is None else float(said[f]) for f in FLAGS]


def _judged(reward: functions.JudgeReward, examples: list[dict], captions: list[str]):
  return reward(functions.make_samples(examples, captions, 1))


def score_captions(reward: functions.JudgeReward, examples: list[dict], captions: list[str]
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """b-CapScore of given captions (one per example, any model's): the means evaluate() reports,
  and one row per caption. A component the judge could not score (NaN) is left out of its
  mean and counted in `unscored`."""
  rows, values, flags = [], {c: [] for c in COMPONENTS}, {f: [] for f in FLAGS}
  for start in range(0, len(captions), 64):  # the judge's batches
    part = slice(start, start + 64)
    rewards = _judged(reward, examples[part], captions[part])
    for i, (example, caption) in enumerate(zip(examples[part], captions[part])):
      row = {"id": str(example["id"]), "caption": caption,
             "references": [str(r) for r in example.get("references", [])]}
      for c in COMPONENTS:
        value = float(rewards.components[c][i])
        row[c] = None if math.isnan(value) else value
        if row[c] is not None:
          values[c].append(value)
      for name, flag in zip(FLAGS, _flags(rewards.judgements[i])):
        if not math.isnan(flag):
          row[name] = bool(flag)
          flags[name].append(flag)
      rows.append(row)
  means = {c: float(np.mean(v)) if v else float("nan") for c, v in values.items()}
  summary: dict[str, Any] = {
      **means, "b_capscore": float(functions.b_capscore(*(np.array([means[c]]) for c in (
          "precision", "recall", "linguistic")))[0]),
      "scored": len(rows), "unscored": {c: len(rows) - len(v) for c, v in values.items()},
      **{f: float(np.mean(v)) if v else None for f, v in flags.items()}}
  return summary, rows


def decode(policy, rollouts: sampling.Rollouts) -> list[str]:
  """Caption text of each of this host's rollouts: its tokens up to (without) the end token."""
  return [caption for caption, _ in decode_with_lengths(policy, rollouts)]


def decode_with_lengths(policy, rollouts: sampling.Rollouts) -> list[tuple[str, int]]:
  """(caption text, number of caption tokens) of each of this host's rollouts."""
  tokens = parallel.host_local(rollouts.tokens)
  lengths = parallel.host_local(rollouts.lengths)
  finished = parallel.host_local(rollouts.finished)
  out = []
  for row, length, ended in zip(tokens, lengths, finished):
    kept = row[:length - 1] if ended else row[:length]  # the end token is not caption
    out.append((policy.processor.decode(kept).strip(), int(len(kept))))
  return out


def table(before: dict[str, float], after: dict[str, float]) -> str:
  """The before/after table, as printed at the end of a run."""
  rows = [("precision", 3), ("recall", 3), ("linguistic", 3), ("b_capscore", 1),
          ("length_ratio", 2), ("words", 1)]
  # Shares of captions repeating or contradicting themselves, with commentary, repeating.
  rows += [(flag, 2) for flag in FLAGS if not math.isnan(before.get(flag, math.nan))
           and flag in after]
  lines = [f"{'':14s}{'SFT':>10s}{'after RL':>10s}{'change':>10s}"]
  for name, digits in rows:
    lines.append(f"{name:14s}{before[name]:10.{digits}f}{after[name]:10.{digits}f}"
                 f"{after[name] - before[name]:+10.{digits}f}")
  if "b_capscore_se" in before and "b_capscore_se" in after:
    change = change_se(before, after) if "per_image" in before and "per_image" in after else (
        math.nan)
    lines.append(f"{'b_capscore se':14s}{before['b_capscore_se']:10.1f}"
                 f"{after['b_capscore_se']:10.1f}{change:10.1f}")
  for prefix, title in (("right/", "claims right, by kind:"),
                        ("covered/", "reference facts covered, by kind:")):
    # A kind one side never claims (RL can learn to stop naming regions) shows as "-".
    kinds = sorted(k for k in {*before, *after} if k.startswith(prefix))
    if kinds:
      lines.append(title)
      for k in kinds:
        sides = [f"{side[k]:10.2f}" if k in side else f"{'-':>10s}" for side in (before, after)]
        change = (f"{after[k] - before[k]:+10.2f}" if k in before and k in after
                  else f"{'-':>10s}")
        lines.append(f"  {k[len(prefix):]:12s}{sides[0]}{sides[1]}{change}")
  return "\n".join(lines)
