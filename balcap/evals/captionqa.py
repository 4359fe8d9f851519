"""CaptionQA: how much of an image a caption lets a text-only reader answer.

The protocol: a text-only judge answers each of the benchmark's multiple-choice questions
about an image from the caption alone. The options are shuffled with a fixed seed and lettered
A, B, ...; unless the question is yes/no, a last option "cannot answer from the caption" is
appended. The judge decodes greedily (at most 4 tokens) and its reply's first standalone
option letter is its answer (after "Answer:" when present; a 1-based option number as a
fallback). A question scores 1 when answered correctly, 0 when wrong or unparsable, and
1/K + 0.05 for "cannot answer" (K: the question's own number of choices: the score of a guess,
plus a little for honesty). The benchmark reports the micro average over questions, each
domain's average, and Overall = the unweighted mean of the domain averages, all x 100.

This file is the scoring alone; the driver asks the judge.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Iterable, Sequence

import numpy as np

CANNOT_ANSWER = "Cannot answer from the caption"
CANNOT_ANSWER_BONUS = 0.05
MAX_ANSWER_TOKENS = 4
_YES_NO_STARTS = ("is", "are", "was", "were", "do", "does", "did", "have", "has", "had", "can",
                  "could", "will", "would", "should", "shall", "may", "might", "must")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def is_yes_no(question: str, choices: Sequence[str]) -> bool:
  """A yes/no question: its choices hold yes and no, or it opens with an auxiliary verb."""
  lowered = {c.strip().strip(".").lower() for c in choices}
  if {"yes", "no"} <= lowered:
    return True
  words = re.findall(r"[a-z']+", question.lower())
  return bool(words) and words[0] in _YES_NO_STARTS


@dataclasses.dataclass(frozen=True)
class Options:
  """One question's lettered options as the judge sees them."""
  texts: tuple[str, ...]          # in the order shown: A, B, ...
  correct: int                    # index into texts of the right answer
  cannot_answer: int | None       # index of "cannot answer", None for yes/no questions
  num_choices: int                # K: the question's own choices

  def prompt_lines(self) -> str:
    return "\n".join(f"{LETTERS[i]}. {t}" for i, t in enumerate(self.texts))


def _rng(seed: int, key: str) -> np.random.Generator:
  # A stable per-question stream: the same options order on every machine and every run.
  digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def options(question_id: str, question: str, choices: Sequence[str], answer: str | int,
            seed: int = 0) -> Options:
  """The shuffled, lettered options of one question. `answer`: the right choice's text or
  its index in `choices`."""
  choices = [str(c) for c in choices]
  if len(choices) < 2:
    raise ValueError(f"question {question_id!r} has {len(choices)} choice(s); needs 2 or more")
  if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
    if not 0 <= answer < len(choices):
      raise ValueError(f"question {question_id!r}: answer index {answer} is not one of its "
                       f"{len(choices)} choices")
    right = int(answer)
  else:
    found = [i for i, c in enumerate(choices) if c.strip() == str(answer).strip()]
    if not found:
      raise ValueError(f"question {question_id!r}: answer {answer!r} is not one of its "
                       f"choices {choices}")
    right = found[0]
  if len(choices) + 1 > len(LETTERS):
    raise ValueError(f"question {question_id!r} has {len(choices)} choices; at most "
                     f"{len(LETTERS) - 1} can be lettered")
  order = _rng(seed, question_id).permutation(len(choices))
  texts = [choices[i] for i in order]
  correct = int(np.flatnonzero(order == right)[0])
  cannot = None
  if not is_yes_no(question, choices):
    cannot = len(texts)
    texts.append(CANNOT_ANSWER)
  return Options(tuple(texts), correct, cannot, len(choices))


def parse_answer(reply: str, num_options: int) -> int | None:
  """The option index a judge's reply names, or None.

  The first standalone option letter, searched after the last "Answer:" when there is one;
  else a 1-based option number. Letters beyond the options are ignored.
  """
  text = reply or ""
  marker = list(re.finditer(r"answer\s*[:：]", text, re.IGNORECASE))
  if marker:
    text = text[marker[-1].end():]
  valid = LETTERS[:num_options]
  bare = text.strip().strip(".)(").upper()
  if len(bare) == 1 and bare in valid:
    return valid.index(bare)  # a bare "b" or "(b)"
  for match in re.finditer(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text):
    if match.group(1) in valid:
      return valid.index(match.group(1))
  number = re.search(r"(?<!\d)(\d+)(?!\d)", text)
  if number and 1 <= int(number.group(1)) <= num_options:
    return int(number.group(1)) - 1
  return None


def score(option: Options, chosen: int | None) -> float:
  """1 right, 1/K + 0.05 "cannot answer", 0 wrong or unparsable."""
  if chosen is None:
    return 0.0
  if chosen == option.correct:
    return 1.0
  if option.cannot_answer is not None and chosen == option.cannot_answer:
    return 1.0 / option.num_choices + CANNOT_ANSWER_BONUS
  return 0.0


def aggregate(items: Iterable[tuple[str, float]]) -> dict[str, Any]:
  """(domain, score) per question -> micro average, per domain and Overall (mean of the
  domains), x 100."""
  by_domain: dict[str, list[float]] = {}
  for domain, value in items:
    by_domain.setdefault(domain, []).append(value)
  if not by_domain:
    return {"overall": None, "micro": None, "domains": {}, "questions": 0}
  domains = {d: 100.0 * float(np.mean(v)) for d, v in sorted(by_domain.items())}
  every = [v for values in by_domain.values() for v in values]
  return {"overall": float(np.mean(list(domains.values()))),
          "micro": 100.0 * float(np.mean(every)), "domains": domains,
          "questions": len(every)}
