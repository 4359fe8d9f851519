"""CapArena-Auto: pairwise battles of a caption against one baseline model's, per image.

The protocol (Cheng et al., "CapArena", 2025): each of the benchmark's images names one
baseline model (`ref_model`) whose caption the test caption faces. A vision judge sees the
image, the two captions (in an order randomised with a fixed seed, so neither position is
favoured) and the human reference caption, and replies with its reasoning and a verdict:
"Caption 1 is better", "Caption 2 is better" or "Tie". Per baseline the score is
(wins - losses) / (images of that baseline) x 100, in [-100, 100]; Score_avg is the mean over
the baselines. A reply that never parses is reported and scored as neither win nor loss
(it stays in its baseline's count, like a tie: the published denominator).

Also a Bradley-Terry fit on an Elo scale, to rank several of one's own checkpoints from
pairwise battles among them.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

WIN, LOSS, TIE = "win", "loss", "tie"
_BETTER = re.compile(r"caption\s*([12])\s*is\s*(?:the\s*)?better", re.IGNORECASE)
# "Tie" as a verdict: alone on its line or after a label, not the word inside a sentence.
_TIE = re.compile(r"(?:^|\n|:)[\s*]*tie[\s*.!]*(?=$|\n)", re.IGNORECASE)


def parse_verdict(reply: str) -> int | None:
  """1 or 2 (that caption is better), 0 (tie), or None: the last verdict in the reply."""
  found = [(m.start(), int(m.group(1))) for m in _BETTER.finditer(reply or "")]
  found += [(m.start(), 0) for m in _TIE.finditer(reply or "")]
  return max(found)[1] if found else None


def test_first(image_id: str, seed: int = 0) -> bool:
  """Whether the test caption is shown as Caption 1 for this image (a fixed coin per image)."""
  digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
  return digest[0] % 2 == 0


def outcome(verdict: int | None, first: bool) -> str | None:
  """The test caption's result from a verdict, given whether it was shown first."""
  if verdict is None:
    return None
  if verdict == 0:
    return TIE
  return WIN if (verdict == 1) == first else LOSS


def score(battles: Iterable[tuple[str, str | None]]) -> dict[str, Any]:
  """(baseline, outcome or None) per image -> per-baseline and average scores."""
  tally: dict[str, dict[str, int]] = {}
  for baseline, result in battles:
    counts = tally.setdefault(baseline, {WIN: 0, LOSS: 0, TIE: 0, "unparsed": 0, "images": 0})
    counts["images"] += 1
    counts[result if result is not None else "unparsed"] += 1
  per = {b: {**c, "score": 100.0 * (c[WIN] - c[LOSS]) / c["images"]}
         for b, c in sorted(tally.items())}
  return {"score_avg": float(np.mean([v["score"] for v in per.values()])) if per else None,
          "baselines": per, "images": sum(c["images"] for c in tally.values()),
          "unparsed": sum(c["unparsed"] for c in tally.values())}


def bradley_terry(games: Sequence[tuple[str, str, float]], *, prior: float = 0.5,
                  iterations: int = 1000, tolerance: float = 1e-10) -> dict[str, float]:
  """Elo ratings (mean 1000, 400 points = 10:1 odds) from (a, b, a's result) games.

  a's result is 1 (a won), 0 (b won) or 0.5 (tie: half a win each). Fitted by Hunter's
  minorisation-maximisation; `prior` virtual ties between every pair that met keep a player
  with no wins (or no losses) finite.
  """
  players = sorted({p for a, b, _ in games for p in (a, b)})
  index = {p: i for i, p in enumerate(players)}
  n = len(players)
  wins = np.zeros(n)
  meetings = np.zeros((n, n))
  for a, b, result in games:
    if a == b:
      raise ValueError(f"a game of {a!r} against itself")
    if result not in (0, 0.5, 1):
      raise ValueError(f"result {result!r} of {a!r} against {b!r} is not 0, 0.5 or 1")
    i, j = index[a], index[b]
    wins[i] += result
    wins[j] += 1 - result
    meetings[i, j] += 1
    meetings[j, i] += 1
  met = meetings > 0
  wins += 0.5 * prior * met.sum(axis=1)  # each virtual tie: half a win to each side
  meetings += prior * met
  strength = np.ones(n)
  for _ in range(iterations):
    denominator = (meetings / (strength[:, None] + strength[None, :])).sum(axis=1)
    updated = np.where(denominator > 0, wins / np.maximum(denominator, 1e-300), 1.0)
    updated /= math.exp(np.mean(np.log(np.maximum(updated, 1e-300))))
    done = np.max(np.abs(updated - strength)) < tolerance
    strength = updated
    if done:
      break
  return {p: 1000.0 + 400.0 * math.log10(max(strength[index[p]], 1e-300)) for p in players}


def caption_words(captions: Mapping[str, str]) -> float | None:
  """Mean words per caption (CapArena-Auto reports it beside the score)."""
  counts = [len(c.split()) for c in captions.values()]
  return float(np.mean(counts)) if counts else None
