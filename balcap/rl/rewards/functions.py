"""Reward functions: host callables from captions to named reward components, with accounting.

    reward = JudgeReward(CapWorldJudge())
    future = reward.submit(samples)        # runs on a host thread while the devices work
    batch = future.result()                # RewardBatch
    batch.components["precision"]          # np.ndarray [N], NaN where unscored

A `JudgeReward` adds `length_ratio` (caption length / mean reference length, in words by
default or in tokens) to a judge's precision, recall and linguistic scores, turns any judge
crash into NaN rewards with cause "judge_error" (a run never dies on its judge), and counts
every NaN per component and cause for the metrics.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from balcap.rl.rewards.types import JUDGED_COMPONENTS, Judge, Judgement, Sample

log = logging.getLogger(__name__)

COMPONENTS = JUDGED_COMPONENTS + ("length_ratio",)


def word_count(text: str) -> int:
  return len(text.split())


def length_ratio(caption: str, references: Sequence[str],
                 count: Callable[[str], int] = word_count) -> float:
  """len(caption) / mean len(references), in `count`'s unit; NaN without a usable reference."""
  lengths = [count(r) for r in references]
  mean = sum(lengths) / len(lengths) if lengths else 0.0
  return count(caption) / mean if mean > 0 else math.nan


def b_capscore(precision: np.ndarray, recall: np.ndarray, linguistic: np.ndarray) -> np.ndarray:
  """The paper's balanced metric: 100 x harmonic mean of the three (0 if any is 0; NaN if any
  is NaN)."""
  p, r, l = (np.asarray(x, np.float64) for x in (precision, recall, linguistic))
  with np.errstate(divide="ignore", invalid="ignore"):
    harmonic = 3.0 / (1.0 / p + 1.0 / r + 1.0 / l)
  harmonic = np.where((p == 0) | (r == 0) | (l == 0), 0.0, harmonic)
  return 100.0 * harmonic


@dataclasses.dataclass
class RewardBatch:
  """Rewards of N samples: components {name: [N] float32} and the NaN accounting."""
  ids: list[str]
  components: dict[str, np.ndarray]
  failures: collections.Counter  # (component, cause) -> count
  judgements: list[Judgement]

  def metrics(self, prefix: str = "reward") -> dict[str, float]:
    """Mean, std and NaN count of each component, b-CapScore, and a count per failure cause."""
    out = {}
    for name, values in self.components.items():
      scored = values[~np.isnan(values)]
      out[f"{prefix}/{name}/mean"] = float(scored.mean()) if scored.size else math.nan
      out[f"{prefix}/{name}/std"] = float(scored.std()) if scored.size else math.nan
      out[f"{prefix}/{name}/nan"] = float(values.size - scored.size)
    capscore = b_capscore(*(self.components[n] for n in JUDGED_COMPONENTS))
    out[f"{prefix}/b_capscore"] = float(np.nanmean(capscore)) if np.isfinite(
        capscore).any() else math.nan
    for (component, cause), count in sorted(self.failures.items()):
      out[f"{prefix}/failures/{component}/{cause}"] = float(count)
    return out


class JudgeReward:
  """precision, recall, linguistic from a judge + length_ratio, for a list of samples.

  `submit` judges on a thread of its own per batch, so a batch that outlives its deadline
  (a hung server, a judge that ignores deadlines) never delays the next one: `result` gives
  up on it (NaN, "timeout") and the next batch starts on a fresh thread at once. At most
  `max_in_flight` batches run at a time; with that many still running, a new batch is scored
  NaN ("timeout") at once instead of queueing behind them, so a dead judge costs rewards,
  never threads without bound nor the run. A collective judge (`judge.collective`: device
  programs that span hosts) is run on the caller's thread instead, where every host issues
  its programs in the same order.
  """

  def __init__(self, judge: Judge, *, count: Callable[[str], int] = word_count,
               max_in_flight: int = 4):
    if max_in_flight < 1:
      raise ValueError(f"max_in_flight={max_in_flight} must be >= 1")
    self.judge = judge
    self.count = count
    self.max_in_flight = max_in_flight
    self._slots = threading.BoundedSemaphore(max_in_flight)
    self._threads: set[threading.Thread] = set()
    self._lock = threading.Lock()
    self._submitted = 0

  def __call__(self, samples: Sequence[Sample]) -> RewardBatch:
    return self._batch(samples, self._judge(samples))

  def _batch(self, samples: Sequence[Sample], judgements: list[Judgement]) -> RewardBatch:
    components = {name: np.array([getattr(j, name) for j in judgements], np.float32)
                  for name in JUDGED_COMPONENTS}
    components["length_ratio"] = np.array(
        [length_ratio(s.caption, s.references, self.count) for s in samples], np.float32)
    failures = collections.Counter((component, cause) for j in judgements
                                   for component, cause in j.failures.items())
    return RewardBatch([s.id for s in samples], components, failures, judgements)

  def submit(self, samples: Sequence[Sample]) -> concurrent.futures.Future:
    """Scores on a host thread; device work goes on meanwhile (JAX releases the GIL)."""
    samples = list(samples)
    future: concurrent.futures.Future = concurrent.futures.Future()
    if getattr(self.judge, "collective", False):
      future.set_result(self(samples))
      return future
    if not self._slots.acquire(blocking=False):
      log.warning("judge %r: %d batches are still running past their deadline; scoring the "
                  "next %d samples NaN (timeout) instead of queueing them", self.judge.name,
                  self.max_in_flight, len(samples))
      future.set_result(self._batch(samples, _failed(samples, "timeout")))
      return future
    with self._lock:
      self._submitted += 1
      thread = threading.Thread(target=self._work, args=(samples, future), daemon=True,
                                name=f"reward-{self._submitted}")
      self._threads.add(thread)
    thread.start()
    return future

  def _work(self, samples: list[Sample], future: concurrent.futures.Future) -> None:
    try:
      future.set_result(self(samples))
    except BaseException as e:  # pylint: disable=broad-except  (handed to `result`)
      future.set_exception(e)
    finally:
      self._slots.release()
      with self._lock:
        self._threads.discard(threading.current_thread())

  def result(self, future: concurrent.futures.Future, samples: Sequence[Sample],
             deadline_s: float) -> RewardBatch:
    """The submitted batch's rewards, or, if they are not ready within `deadline_s`, NaN
    rewards with cause "timeout" (the late result is dropped when it comes): a run never
    waits longer."""
    try:
      return future.result(timeout=deadline_s)
    except concurrent.futures.TimeoutError:
      log.warning("judge %r missed the %.0f s deadline for %d samples; scoring them NaN",
                  self.judge.name, deadline_s, len(samples))
      return self._batch(samples, _failed(samples, "timeout"))

  def _judge(self, samples: Sequence[Sample]) -> list[Judgement]:
    try:
      judgements = self.judge.judge(samples)
      if [j.id for j in judgements] != [s.id for s in samples]:
        raise RuntimeError(f"judge {self.judge.name!r} returned judgements out of order")
      return judgements
    except Exception:  # pylint: disable=broad-except
      # A judge bug or outage must cost rewards (NaN, counted), never the run.
      log.exception("judge %r failed on a batch of %d; scoring it NaN", self.judge.name,
                    len(samples))
      return _failed(samples, "judge_error")

  def close(self, timeout_s: float = 30.0) -> None:
    """Waits up to `timeout_s` for batches still running; a hung one is left to its daemon
    thread (it cannot keep the process alive)."""
    end = time.monotonic() + timeout_s
    with self._lock:
      threads = list(self._threads)
    for thread in threads:
      thread.join(max(0.0, end - time.monotonic()))


def _failed(samples: Sequence[Sample], cause: str) -> list[Judgement]:
  """Judgements with every judged component NaN for `cause`."""
  failed = []
  for sample in samples:
    judgement = Judgement(sample.id)
    for component in JUDGED_COMPONENTS:
      judgement.fail(component, cause)
    failed.append(judgement)
  return failed


def make_samples(examples: Sequence[dict[str, Any]], captions: Sequence[str],
                 num_samples: int, *, fields: Sequence[str] = ("scene_graph",)) -> list[Sample]:
  """Samples for B examples x G captions (caption r belongs to example r // G).

  Ids are "<example id>/<rollout>", so every score can be traced to its caption.
  """
  if len(captions) != len(examples) * num_samples:
    raise ValueError(f"{len(captions)} captions for {len(examples)} examples x {num_samples}")
  samples = []
  for row, caption in enumerate(captions):
    example = examples[row // num_samples]
    samples.append(Sample(
        id=f"{example['id']}/{row % num_samples}", caption=caption,
        references=tuple(example["references"]), image=example.get("image"),
        fields={k: example[k] for k in fields if k in example}))
  return samples
