"""Caption a held-out split greedily and score it with the run's judge: the before/after table.

Reports precision, recall, linguistic (means over the captions each could score),
b-CapScore (100 x the harmonic mean of those three means, the paper's table metric), and the
mean length ratio to the references, plus a few example captions. Each host captions its own
shard; the sums are combined over hosts.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from balcap import parallel, sampling
from balcap.data import pipeline
from balcap.rl.rewards import functions

COMPONENTS = ("precision", "recall", "linguistic", "length_ratio")


def evaluate(policy, params: Any, source, reward: functions.JudgeReward, *, prompt: str,
             max_new_tokens: int, batch_size: int, num_examples: int = -1,
             prompt_bucket: int = sampling.PROMPT_BUCKET, num_shown: int = 2
             ) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """(metrics, example rows) for greedy captions of `source` (its first `num_examples`)."""
  if 0 <= num_examples < len(source):
    source = [source[i] for i in range(num_examples)]
  sums = np.zeros(len(COMPONENTS) + 2)  # + caption words, + degenerate (judges that say)
  counts = np.zeros(len(COMPONENTS) + 2)
  shown: list[dict[str, Any]] = []
  spec = None
  for batch in pipeline.eval_batches(source, batch_size=batch_size):
    real = np.asarray(batch["mask"])
    images = [Image.fromarray(np.asarray(image)) for image in batch["image"]]
    chats = policy.processor(prompts=[prompt] * len(images), images=images)
    if spec is None:
      spec = sampling.sampling_params(policy, max_new_tokens=max_new_tokens, temperature=0.0)
    prepared = sampling.prepare_prompts(policy, chats, prompt_bucket)
    inputs = {k: prepared[k] for k in sampling.SAMPLER_INPUTS if prepared.get(k) is not None}
    rollouts = sampling.generate_prepared(
        policy, params, parallel.global_inputs(inputs, policy.mesh),
        policy.family.decode_start(policy.config, prepared), jax.random.key(0), spec)
    captions = decode(policy, rollouts)
    examples = [{k: batch[k][i] for k in batch if k != "mask"} for i in range(len(captions))]
    rewards = _judged(reward, examples, captions)
    for i, caption in enumerate(captions):
      if not real[i]:
        continue
      values = [rewards.components[c][i] for c in COMPONENTS] + [
          len(caption.split()), _degenerate(rewards.judgements[i])]
      for k, value in enumerate(values):
        if not math.isnan(value):
          sums[k] += value
          counts[k] += 1
      if len(shown) < num_shown:
        shown.append({"id": examples[i]["id"], "caption": caption,
                      "reference": examples[i]["references"][0],
                      **{c: float(rewards.components[c][i]) for c in COMPONENTS}})
  if jax.process_count() > 1:
    gathered = multihost_utils.process_allgather(np.stack([sums, counts]))
    sums, counts = gathered.sum(axis=0)
  means = sums / np.maximum(counts, 1)
  metrics = {name: float(means[k]) for k, name in enumerate(COMPONENTS)}
  metrics["words"] = float(means[-2])
  # The share of captions that repeat or contradict themselves, where the judge says so
  # (CapWorldJudge); NaN otherwise.
  metrics["degenerate"] = float(means[-1]) if counts[-1] else float("nan")
  metrics["b_capscore"] = float(functions.b_capscore(*(np.array([metrics[c]]) for c in
                                                       ("precision", "recall",
                                                        "linguistic")))[0])
  metrics["examples"] = float(counts[0])
  return metrics, shown


def _degenerate(judgement) -> float:
  flag = (judgement.details or {}).get("degenerate")
  return float("nan") if flag is None else float(flag)


def _judged(reward: functions.JudgeReward, examples: list[dict], captions: list[str]):
  return reward(functions.make_samples(examples, captions, 1))


def score_captions(reward: functions.JudgeReward, examples: list[dict], captions: list[str]
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """b-CapScore of given captions (one per example, any model's): the means evaluate() reports,
  and one row per caption. A component the judge could not score (NaN) is left out of its
  mean and counted in `unscored`."""
  rows, values, flags = [], {c: [] for c in COMPONENTS}, []
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
      flag = _degenerate(rewards.judgements[i])
      if not math.isnan(flag):
        row["degenerate"] = bool(flag)
        flags.append(flag)
      rows.append(row)
  means = {c: float(np.mean(v)) if v else float("nan") for c, v in values.items()}
  summary: dict[str, Any] = {
      **means, "b_capscore": float(functions.b_capscore(*(np.array([means[c]]) for c in (
          "precision", "recall", "linguistic")))[0]),
      "scored": len(rows), "unscored": {c: len(rows) - len(v) for c, v in values.items()},
      "degenerate": float(np.mean(flags)) if flags else None}
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
  if not math.isnan(before.get("degenerate", math.nan)):
    rows.append(("degenerate", 2))  # share of captions repeating or contradicting themselves
  lines = [f"{'':14s}{'SFT':>10s}{'after RL':>10s}{'change':>10s}"]
  for name, digits in rows:
    lines.append(f"{name:14s}{before[name]:10.{digits}f}{after[name]:10.{digits}f}"
                 f"{after[name] - before[name]:+10.{digits}f}")
  return "\n".join(lines)
