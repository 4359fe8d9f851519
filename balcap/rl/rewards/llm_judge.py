"""A `Judge` that scores precision, recall and linguistic quality with a chat model.

Any `ChatBackend` (an HTTP endpoint, a local model) will do. A batch runs in rounds, each one
`backend.complete` call holding every request that is ready, so the backend's concurrency
spans the whole batch:
  round 1: decompose each caption, decompose each distinct reference, rate each caption;
  round 2: verify each caption's assertions against its image, check each caption's
           coverage of its references' units (+ one reminder retry of any round-1 reply
           that did not parse);
  rounds 3-4 only hold the retries that round 2's parse failures and late decompositions
  need. A reply that fails to parse twice makes its component NaN ("parse_error"); a backend
  failure makes it NaN with the backend's cause. One bad sample never stops the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Sequence

from balcap import parallel
from balcap.chat import images
from balcap.chat.json_reply import ReplyError
from balcap.chat.openai_backend import OpenAIChatBackend
from balcap.chat.protocol import ChatBackend, ChatReply, ChatRequest
from balcap.rl.rewards import prompts
from balcap.rl.rewards.types import Judgement, Sample

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Task:
  """One request and what to do with its reply."""
  id: str                                    # "<sample id>#<task>", unique within a batch
  messages: list
  parse: Callable[[str], Any]                # raises ReplyError
  on_value: Callable[[Any], list["_Task"]]   # records the parsed value; returns follow-ups
  on_failure: Callable[[str], None]          # records a failure cause
  retried: bool = False


class LLMJudge:
  """Scores `Sample`s through a `ChatBackend`; see the module docstring.

  Args:
    backend: answers the chat requests.
    name: the judge's name in metrics.
    image_format: "PNG" (lossless) or "JPEG" (smaller requests) for images sent to the judge.
    deadline_s: optional bound on a whole `judge` call: each round's backend call is given
      what is left of it (on top of the backend's own deadline), and no round starts after
      it; what is unanswered then is NaN with cause "timeout".
    reference_memory: how many decomposed references to remember across calls, so an
      example's references are decomposed once per run rather than once per step.
  """

  def __init__(self, backend: ChatBackend, *, name: str = "llm", image_format: str = "PNG",
               deadline_s: float | None = None, reference_memory: int = 4096):
    self.backend = backend
    self.name = name
    self.image_format = image_format
    self.deadline_s = deadline_s
    self.reference_memory = reference_memory
    self._units: collections.OrderedDict[str, list[str]] = collections.OrderedDict()

  def __repr__(self) -> str:
    return f"LLMJudge(name={self.name!r}, backend={self.backend!r})"

  def judge(self, samples: Sequence[Sample]) -> list[Judgement]:
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
      raise ValueError("sample ids must be unique within a batch, or scores could cross")
    judgements = [Judgement(id=s.id, details={"prompt_version": prompts.PROMPT_VERSION})
                  for s in samples]
    batch = _Batch(self, samples, judgements)
    self._run(batch.first_round())
    return judgements

  @property
  def collective(self) -> bool:
    """Whether judging must run in step on every host (a backend of collective device
    programs, e.g. the local judge on a pod): `JudgeReward` then runs it on its caller's
    thread, and every host runs the same rounds (an empty one where it has nothing left)."""
    return bool(getattr(self.backend, "collective", False))

  def _run(self, tasks: list[_Task]) -> None:
    # One deadline for the whole call, handed to the backend too: a round cannot outlast it
    # (whatever the backend's own deadline), and no round starts after it.
    end = None if self.deadline_s is None else time.monotonic() + self.deadline_s
    collective = self.collective
    while True:
      expired = end is not None and time.monotonic() > end
      busy = bool(tasks)
      if collective:
        busy, expired = parallel.host_any([busy, expired])
      if not busy:
        return
      if expired:
        for task in tasks:
          task.on_failure("timeout")
        return
      tasks = self._round(tasks, end)

  def _round(self, tasks: list[_Task], deadline: float | None = None) -> list[_Task]:
    """Sends `tasks` as one backend call; returns the tasks their replies lead to."""
    by_id = {task.id: task for task in tasks}
    if len(by_id) != len(tasks):
      raise AssertionError("two judge requests share an id")
    requests = [ChatRequest(task.id, task.messages, version=prompts.PROMPT_VERSION)
                for task in tasks]
    try:
      replies = self.backend.complete(requests, deadline=deadline)
    except Exception as e:  # pylint: disable=broad-except
      # A backend must not raise (chat.py), but one that does costs a batch of NaNs, not a run.
      log.error("judge backend %r raised %s: %s", self.backend, type(e).__name__, e)
      replies = [ChatReply(r.id, failure="judge_error") for r in requests]
    answered = {}
    for reply in replies:
      if reply.id not in by_id:
        raise AssertionError(f"judge backend answered unknown request id {reply.id!r}")
      if reply.id in answered:
        raise AssertionError(f"judge backend answered request {reply.id!r} twice")
      answered[reply.id] = reply
    if len(answered) != len(tasks):
      missing = sorted(set(by_id) - set(answered))[:5]
      raise AssertionError(f"judge backend left requests unanswered, e.g. {missing}")
    follow_ups = []
    for task in tasks:
      follow_ups += self._settle(task, answered[task.id])
    return follow_ups

  def _settle(self, task: _Task, reply: ChatReply) -> list[_Task]:
    if not reply.ok:
      task.on_failure(reply.failure)
      return []
    try:
      value = task.parse(reply.text)
    except ReplyError as e:
      if task.retried:
        log.info("judge reply %s unusable after a retry: %s", task.id, e)
        task.on_failure("parse_error")
        return []
      return [dataclasses.replace(task, id=f"{task.id}#retry", retried=True,
                                  messages=prompts.with_reminder(task.messages, str(e)))]
    try:
      return task.on_value(value)
    except Exception as e:  # pylint: disable=broad-except
      log.error("judge reply %s could not be scored: %s: %s", task.id, type(e).__name__, e)
      task.on_failure("judge_error")
      return []

  def remembered_units(self, reference: str) -> list[str] | None:
    units = self._units.get(reference)
    if units is not None:
      self._units.move_to_end(reference)
    return units

  def remember_units(self, reference: str, units: list[str]) -> None:
    self._units[reference] = units
    while len(self._units) > self.reference_memory:
      self._units.popitem(last=False)


class _Batch:
  """The tasks of one `judge` call and the bookkeeping that links them."""

  def __init__(self, judge: LLMJudge, samples: Sequence[Sample], judgements: list[Judgement]):
    self.judge = judge
    self.samples, self.judgements = samples, judgements
    self.image_urls: dict[int, str] = {}   # id(image) -> data URL: G rollouts share one image
    # Distinct references, each decomposed once for all the samples that cite it.
    self.references = sorted({r.strip() for s in samples for r in s.references if r.strip()})
    self.units: dict[str, list[str]] = {}
    self.reference_failures: dict[str, str] = {}
    self.waiting: dict[str, list[int]] = collections.defaultdict(list)  # ref -> sample indices

  def first_round(self) -> list[_Task]:
    tasks = []
    for k, reference in enumerate(self.references):
      units = self.judge.remembered_units(reference)
      if units is None:
        tasks.append(self._decompose_reference(k, reference))
      else:
        self.units[reference] = units
    for i, sample in enumerate(self.samples):
      try:
        tasks += self._decompose_caption(i) + self._rate(i)
      except Exception as e:  # pylint: disable=broad-except
        # A malformed sample (a caption that is not text, say) costs its own scores only.
        log.error("judge cannot build requests for %s: %s: %s", sample.id, type(e).__name__, e)
        for component in ("precision", "recall", "linguistic"):
          self.judgements[i].fail(component, "judge_error")
        continue
      references = self._references_of(i)
      if not references:
        self.judgements[i].fail("recall", "no_reference")
      for reference in references:
        self.waiting[reference].append(i)
    for i in range(len(self.samples)):
      tasks += self._cover_when_ready(i)
    return tasks

  def _references_of(self, i: int) -> list[str]:
    return list(dict.fromkeys(r.strip() for r in self.samples[i].references if r.strip()))

  # precision: decompose, then verify

  def _decompose_caption(self, i: int) -> list[_Task]:
    sample, judgement = self.samples[i], self.judgements[i]
    if not sample.caption.strip():
      return self._on_assertions(i, [])

    def on_failure(cause):
      judgement.fail("precision", cause)
    return [_Task(f"{sample.id}#decompose", prompts.decomposition_messages(sample.caption),
                  prompts.parse_decomposition, lambda a: self._on_assertions(i, a), on_failure)]

  def _on_assertions(self, i: int, assertions: list[str]) -> list[_Task]:
    sample, judgement = self.samples[i], self.judgements[i]
    judgement.details["assertions"] = assertions
    if not assertions:
      judgement.precision = 0.0   # METHOD.md: nothing asserted -> 0, never NaN
      return []
    try:
      url = self._image_url(sample.image)
    except (ValueError, OSError) as e:
      judgement.details["error"] = f"image: {e}"
      judgement.fail("precision", "judge_error")
      return []

    def on_verdicts(verdicts):
      judgement.details["verdicts"] = verdicts
      judgement.precision = sum(v["verified"] and v["pointable"] for v in verdicts) / len(
          verdicts)
      return []

    def on_failure(cause):
      judgement.fail("precision", cause)
    return [_Task(f"{sample.id}#verify", prompts.verification_messages(assertions, url),
                  lambda text: prompts.parse_verification(text, len(assertions)), on_verdicts,
                  on_failure)]

  def _image_url(self, image: Any) -> str:
    if image is None:
      raise ValueError("the sample has no image to verify against")
    if id(image) not in self.image_urls:
      self.image_urls[id(image)] = images.image_data_url(image, self.judge.image_format)
    return self.image_urls[id(image)]

  # recall: decompose the references, then check coverage

  def _decompose_reference(self, k: int, reference: str) -> _Task:
    def on_units(units):
      self.units[reference] = units
      self.judge.remember_units(reference, units)
      return [t for i in self.waiting[reference] for t in self._cover_when_ready(i)]

    def on_failure(cause):
      self.reference_failures[reference] = cause
      for i in self.waiting[reference]:
        self._cover_when_ready(i)
    return _Task(f"reference{k}#decompose_reference", prompts.decomposition_messages(reference),
                 prompts.parse_decomposition, on_units, on_failure)

  def _cover_when_ready(self, i: int) -> list[_Task]:
    """The coverage task once every reference of sample i is settled (at most once)."""
    sample, judgement = self.samples[i], self.judgements[i]
    references = self._references_of(i)
    if not references or "recall" in judgement.failures or "units" in judgement.details:
      return []
    if any(r not in self.units and r not in self.reference_failures for r in references):
      return []
    failed = [self.reference_failures[r] for r in references if r in self.reference_failures]
    if failed:
      judgement.fail("recall", failed[0])
      return []
    # Units of several references are pooled; one stated twice counts once.
    units = _dedupe_casefold(u for r in references for u in self.units[r])
    judgement.details["units"] = units
    if not units:
      judgement.fail("recall", "no_reference")
      return []
    if not sample.caption.strip():
      judgement.details["covered"] = [False] * len(units)
      judgement.recall = 0.0
      return []

    def on_covered(covered):
      judgement.details["covered"] = covered
      judgement.recall = sum(covered) / len(covered)
      return []

    def on_failure(cause):
      judgement.fail("recall", cause)
    return [_Task(f"{sample.id}#cover", prompts.coverage_messages(sample.caption, units),
                  lambda text: prompts.parse_coverage(text, len(units)), on_covered,
                  on_failure)]

  # linguistic quality

  def _rate(self, i: int) -> list[_Task]:
    sample, judgement = self.samples[i], self.judgements[i]

    def on_ratings(ratings):
      judgement.details["ratings"] = ratings
      judgement.linguistic = math.fsum(ratings.values()) / len(ratings)
      return []

    def on_failure(cause):
      judgement.fail("linguistic", cause)
    return [_Task(f"{sample.id}#rate", prompts.rating_messages(sample.caption),
                  prompts.parse_rating, on_ratings, on_failure)]


def _dedupe_casefold(texts) -> list[str]:
  seen, out = set(), []
  for text in texts:
    if text.casefold() not in seen:
      seen.add(text.casefold())
      out.append(text)
  return out


# Named like a class: it stands for "the LLM judge on an OpenAI endpoint" in configs.
def OpenAIChatJudge(base_url: str, model: str, *,  # pylint: disable=invalid-name
                    name: str = "openai", image_format: str = "PNG",
                    deadline_s: float | None = None, **backend_kwargs) -> LLMJudge:
  """An `LLMJudge` on an OpenAI-compatible endpoint; `backend_kwargs` go to
  `OpenAIChatBackend` (api_key_env, timeout_s, max_concurrency, cache_path, ...)."""
  return LLMJudge(OpenAIChatBackend(base_url, model, **backend_kwargs), name=name,
                  image_format=image_format, deadline_s=deadline_s)


def LocalJudge(policy, *, name: str = "local",  # pylint: disable=invalid-name
               image_format: str = "PNG", deadline_s: float | None = None,
               **backend_kwargs) -> LLMJudge:
  """An `LLMJudge` answered by a balcap policy; `backend_kwargs` go to `LocalChatBackend`."""
  from balcap.chat.local_backend import LocalChatBackend  # pylint: disable=import-outside-toplevel
  return LLMJudge(LocalChatBackend(policy, **backend_kwargs), name=name,
                  image_format=image_format, deadline_s=deadline_s)
