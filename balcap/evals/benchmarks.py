"""The judged benchmarks, run: items + captions + a chat backend -> (summary, per-item rows).

Thin drivers: each turns its benchmark's items into judge asks (`asking.ask_all`), and hands
the parsed replies to the benchmark's scoring (`dcscore.py`, `captionqa.py`, `caparena.py`).
An item without a caption, with an unreadable image, or whose judge replies never parsed is
invalid: listed by id with the reason, never scored as zero and never dropped silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from balcap.chat import images
from balcap.chat.protocol import ChatBackend
from balcap.evals import asking, benchmark_data, caparena, captionqa, dcscore, prompts


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
  tries: int = asking.DEFAULT_TRIES       # asks of one item before it is invalid
  image_detail: str = "auto"              # the judge's image `detail` (vision prompts)
  seed: int = 0                           # option shuffles, arena positions, sample seeds
  progress: Callable[[int], None] | None = None


def _image_urls(items, invalid: dict[str, str]) -> dict[str, str]:
  urls = {}
  for item in items:
    try:
      urls[item.id] = images.file_data_url(item.image_path)
    except (OSError, ValueError) as e:
      invalid[item.id] = f"unreadable image: {e}"
  return urls


def _with_captions(items, captions: Mapping[str, str], invalid: dict[str, str]) -> list:
  kept = []
  for item in items:
    caption = captions.get(item.id)
    if caption is None:
      invalid[item.id] = "no caption"
    else:
      kept.append(item)
  return kept


def _unanswered(results: Mapping[str, Any], ids: Sequence[str]) -> str | None:
  for ask_id in ids:
    value = results.get(ask_id)
    if isinstance(value, asking.Unanswered):
      return f"{ask_id}: {value.cause} ({value.detail[:160]})"
  return None


# --- DCScore ------------------------------------------------------------------------------------


def run_dcscore(backend: ChatBackend, items: Sequence[benchmark_data.DecapItem],
                captions: Mapping[str, str], settings: JudgeSettings = JudgeSettings()
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  invalid: dict[str, str] = {}
  items = _with_captions(items, captions, invalid)
  urls = _image_urls(items, invalid)
  items = [item for item in items if item.id in urls]
  decomposed = asking.ask_all(
      backend, [asking.Ask(f"{item.id}#decompose", prompts.decompose_messages(captions[item.id]),
                           prompts.parse_decomposition) for item in items],
      tries=settings.tries, progress=settings.progress)
  asks = []
  for item in items:
    facts = decomposed[f"{item.id}#decompose"]
    if isinstance(facts, asking.Unanswered) or not facts:
      continue
    texts = [text for text, _ in facts]
    n, o = len(texts), len(item.oracle_facts)
    for k in range(dcscore.MATCH_SAMPLES):
      asks.append(asking.Ask(
          f"{item.id}#match{k}", prompts.match_messages(texts, item.oracle_facts),
          lambda reply, n=n, o=o: prompts.parse_matches(reply, n, o),
          temperature=dcscore.MATCH_TEMPERATURE, seed=settings.seed + k))
    for k in range(dcscore.VERIFY_SAMPLES):
      asks.append(asking.Ask(
          f"{item.id}#verify{k}",
          prompts.verify_messages(texts, item.oracle_caption, urls[item.id],
                                  settings.image_detail),
          lambda reply, n=n: prompts.parse_verification(reply, n),
          temperature=dcscore.VERIFY_TEMPERATURE, seed=settings.seed + k))
  checked = asking.ask_all(backend, asks, tries=settings.tries, progress=settings.progress)
  per_image: dict[str, dcscore.ImageScore | None] = {}
  rows = []
  for item in items:
    facts = decomposed[f"{item.id}#decompose"]
    match_ids = [f"{item.id}#match{k}" for k in range(dcscore.MATCH_SAMPLES)]
    verify_ids = [f"{item.id}#verify{k}" for k in range(dcscore.VERIFY_SAMPLES)]
    why = _unanswered(decomposed, [f"{item.id}#decompose"]) or (
        _unanswered(checked, match_ids + verify_ids) if facts else None)
    if why:
      invalid[item.id] = why
      continue
    if facts:
      matchings = [checked[i] for i in match_ids]
      verifications = [checked[i] for i in verify_ids]
    else:  # a caption that states nothing: precision and recall 0
      matchings, verifications = [[]], [[]]
    score = dcscore.image_score([d for _, d in facts], verifications, matchings,
                                len(item.oracle_facts))
    per_image[item.id] = score
    rows.append({"id": item.id, "caption": captions[item.id],
                 "facts": [{"fact": t, "descriptive": d} for t, d in facts],
                 "matches": matchings, "verified": verifications,
                 **dataclasses.asdict(score)})
  for item_id in invalid:
    per_image[item_id] = None
  summary = dcscore.benchmark(per_image)
  summary["invalid_reasons"] = dict(sorted(invalid.items()))
  rows += [{"id": i, "invalid": why} for i, why in sorted(invalid.items())]
  return summary, rows


# --- CaptionQA ----------------------------------------------------------------------------------


def run_captionqa(backend: ChatBackend, items: Sequence[benchmark_data.CaptionQAImage],
                  captions: Mapping[str, str], settings: JudgeSettings = JudgeSettings()
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  invalid: dict[str, str] = {}
  items = _with_captions(items, captions, invalid)
  asks, shown = [], {}
  for item in items:
    for q in item.questions:
      options = captionqa.options(q.id, q.question, q.choices, q.answer, settings.seed)
      shown[q.id] = options
      # The protocol's judge: greedy, 4 tokens, the first standalone letter; unparsable is
      # wrong, not asked again.
      asks.append(asking.Ask(
          q.id, prompts.question_messages(captions[item.id], q.question, options),
          lambda reply, k=len(options.texts): (reply, captionqa.parse_answer(reply, k)),
          temperature=0.0, max_tokens=captionqa.MAX_ANSWER_TOKENS, retry_unparsable=False))
  answers = asking.ask_all(backend, asks, tries=settings.tries, progress=settings.progress)
  scored, rows = [], []
  for item in items:
    for q in item.questions:
      answer = answers[q.id]
      if isinstance(answer, asking.Unanswered):
        invalid[q.id] = f"{answer.cause} ({answer.detail[:160]})"
        continue
      reply, chosen = answer
      value = captionqa.score(shown[q.id], chosen)
      scored.append((item.domain, value))
      rows.append({"id": q.id, "image": item.id, "domain": item.domain,
                   "question": q.question, "options": list(shown[q.id].texts),
                   "correct": shown[q.id].correct, "reply": reply, "chosen": chosen,
                   "score": value})
  summary = captionqa.aggregate(scored)
  summary.update(images=len(items), invalid=len(invalid), invalid_ids=sorted(invalid),
                 invalid_reasons=dict(sorted(invalid.items())),
                 cannot_answer_rate=(sum(1 for r in rows if r["chosen"] is not None and
                                         shown[r["id"]].cannot_answer == r["chosen"])
                                     / len(rows) if rows else None))
  rows += [{"id": i, "invalid": why} for i, why in sorted(invalid.items())]
  return summary, rows


# --- CapArena-Auto ------------------------------------------------------------------------------


def run_caparena(backend: ChatBackend, items: Sequence[benchmark_data.CapArenaItem],
                 captions: Mapping[str, str], settings: JudgeSettings = JudgeSettings()
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  invalid: dict[str, str] = {}
  items = _with_captions(items, captions, invalid)
  urls = _image_urls(items, invalid)
  items = [item for item in items if item.id in urls]
  first = {item.id: caparena.test_first(item.id, settings.seed) for item in items}
  asks = []
  for item in items:
    pair = ((captions[item.id], item.baseline_caption) if first[item.id]
            else (item.baseline_caption, captions[item.id]))
    asks.append(asking.Ask(
        f"{item.id}#arena",
        prompts.arena_messages(urls[item.id], item.human, *pair, settings.image_detail),
        prompts.parse_arena))
  verdicts = asking.ask_all(backend, asks, tries=settings.tries, progress=settings.progress)
  battles, rows = [], []
  for item in items:
    verdict = verdicts[f"{item.id}#arena"]
    if isinstance(verdict, asking.Unanswered) and verdict.cause != "unparsable":
      invalid[item.id] = f"{verdict.cause} ({verdict.detail[:160]})"
      continue
    # Still unparsable after every try: reported, neither a win nor a loss.
    result = (None if isinstance(verdict, asking.Unanswered)
              else caparena.outcome(verdict, first[item.id]))
    battles.append((item.baseline, result))
    rows.append({"id": item.id, "baseline": item.baseline, "test_first": first[item.id],
                 "verdict": None if isinstance(verdict, asking.Unanswered) else verdict,
                 "outcome": result, "caption": captions[item.id]})
  summary = caparena.score(battles)
  summary.update(caption_words=caparena.caption_words({i.id: captions[i.id] for i in items}),
                 unparsed_ids=sorted(r["id"] for r in rows if r["outcome"] is None),
                 invalid=len(invalid), invalid_ids=sorted(invalid),
                 invalid_reasons=dict(sorted(invalid.items())))
  rows += [{"id": i, "invalid": why} for i, why in sorted(invalid.items())]
  return summary, rows


# The judged benchmarks by their config name (config.eval.benchmarks).
DRIVERS = {"dcscore": run_dcscore, "captionqa": run_captionqa, "caparena": run_caparena}


def expected_asks(name: str, items: Sequence[Any]) -> int:
  """Judge asks a benchmark makes of `items` (a progress bar's total; DCScore's is exact when
  no caption decomposes into nothing)."""
  if name == "dcscore":
    return len(items) * (1 + dcscore.MATCH_SAMPLES + dcscore.VERIFY_SAMPLES)
  if name == "captionqa":
    return sum(len(item.questions) for item in items)
  return len(items)
