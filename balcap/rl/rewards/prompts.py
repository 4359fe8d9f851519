"""The judge prompts (our wording) and the parsers of their replies, one pair per task.

Four tasks score a caption (METHOD.md, "Rewards"):
  decompose  text -> atomic assertions (a caption's, or a reference's units);
  verify     assertions + image -> verified and pointable, per assertion (precision);
  cover      caption + reference units -> covered, per unit (recall);
  rate       caption -> clarity, fluency, coherence on 1..5 (linguistic quality).
Inputs sit between <tags> so the judge never mistakes caption text for instructions, and
every prompt asks for bare JSON only. Change any wording and bump PROMPT_VERSION: it is part
of the reply cache's key and of every Judgement's details.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from balcap.chat import json_reply

PROMPT_VERSION = "balcap-judge-v1"
TASKS = ("decompose", "verify", "cover", "rate")
RATING_ASPECTS = ("clarity", "fluency", "coherence")
RATING_RANGE = (1, 5)

_JSON_ONLY = ("Answer with the JSON only: no explanation, no markdown code fence, nothing "
              "before or after it.")

SYSTEM_PROMPTS = {
    "decompose": (
        "You split a description of an image into atomic assertions.\n"
        "Rules:\n"
        "- Each assertion states exactly one claim: one object, one attribute of one object, "
        "one action, one spatial relation, one count, or one piece of visible text.\n"
        "- Each assertion stands alone: replace pronouns by what they refer to "
        "(\"it is red\" -> \"the car is red\").\n"
        "- Keep the description's own words where you can; do not add, correct, merge or "
        "repeat claims.\n"
        "- Include every claim, also vague, subjective or self-referential ones such as "
        "\"the mood is calm\" or \"the image shows a street\": you list claims, you do not "
        "judge them.\n"
        "Output: a JSON array of strings, one per assertion, in the order they appear, e.g. "
        "[\"a car is parked by the curb\", \"the car is red\"]. An empty description gives [].\n"
        + _JSON_ONLY),
    "verify": (
        "You check assertions about the attached image. For each assertion decide two things.\n"
        "verified: true only if the image clearly shows the assertion is true; false if it is "
        "wrong, not visible, or cannot be confirmed from the image.\n"
        "pointable: true if the assertion is about something one could point at or outline in "
        "the image: an object, a person, a region, visible text, or a visible attribute, "
        "action, count or spatial relation (\"a red car\", \"people queue at a counter\"). "
        "false for moods, atmosphere, opinions, aesthetic effects, statements about the image "
        "or photo itself, and guesses about what cannot be seen (\"this adds depth\", "
        "\"the mood is warm\", \"the image shows a scene\").\n"
        "Judge each assertion on its own; pointable does not depend on verified.\n"
        "Output: a JSON array with exactly one object per assertion, in the given order, e.g. "
        "[{\"verified\": true, \"pointable\": true}, {\"verified\": false, \"pointable\": true}]."
        "\n" + _JSON_ONLY),
    "cover": (
        "You compare a caption with units of reference information about the same image. "
        "You do not see the image: use only the two texts.\n"
        "For each reference unit answer true if the caption conveys it: states it, "
        "paraphrases it, or states something more specific that entails it. Answer false if "
        "the caption omits it, contradicts it, or only hints at it vaguely.\n"
        "Output: a JSON array of booleans, exactly one per unit, in the given order, e.g. "
        "[true, false, true].\n" + _JSON_ONLY),
    "rate": (
        "You rate the writing of an image caption, not its accuracy (you do not see the "
        "image). Give each aspect an integer score from 1 to 5 (5 excellent, 3 acceptable "
        "with clear problems, 1 very poor):\n"
        "clarity: every sentence is precise and unambiguous, easy to understand on first "
        "reading.\n"
        "fluency: grammatical, natural, idiomatic language; no broken, repeated or garbled "
        "text.\n"
        "coherence: the caption reads as one organised description with a sensible order, "
        "not a disconnected list of fragments.\n"
        "Output: a JSON object {\"clarity\": n, \"fluency\": n, \"coherence\": n}.\n"
        + _JSON_ONLY),
}

REMINDER = ("Your previous reply could not be used: {error}. Reply again, following the "
            "instructions exactly. " + _JSON_ONLY)


def _system_and_user(task: str, user: Any) -> list[dict]:
  return [{"role": "system", "content": SYSTEM_PROMPTS[task]}, {"role": "user", "content": user}]


def with_reminder(messages: Sequence[dict], error: str) -> list[dict]:
  """`messages` plus a user turn saying why the last reply was rejected (one parse retry)."""
  return list(messages) + [{"role": "user", "content": REMINDER.format(error=error)}]


def _unwrap(value: Any) -> Any:
  """An array the judge wrapped in a one-key object ({"assertions": [...]}, as JSON modes
  that only allow objects make it do) is taken as the array."""
  if isinstance(value, dict) and len(value) == 1:
    (inner,) = value.values()
    if isinstance(inner, list):
      return inner
  return value


# decompose


def decomposition_messages(text: str) -> list[dict]:
  return _system_and_user("decompose", f"Description:\n<text>\n{text.strip()}\n</text>")


def parse_decomposition(reply: str) -> list[str]:
  """The assertions, stripped, empty ones dropped."""
  def validate(value):
    items = json_reply.require_list(_unwrap(value), "assertions")
    texts = [json_reply.require_str(x, f"assertion {i}").strip() for i, x in enumerate(items)]
    return [t for t in texts if t]
  return json_reply.parse_reply(reply, validate)


# verify


def verification_messages(assertions: Sequence[str], image_url: str) -> list[dict]:
  """`image_url`: a data URL (see `image_data_url`) or an http(s) URL the judge can fetch."""
  text = (f"Assertions ({len(assertions)}):\n<assertions>\n"
          f"{json.dumps(list(assertions), ensure_ascii=False)}\n</assertions>")
  return _system_and_user("verify", [{"type": "image_url", "image_url": {"url": image_url}},
                                     {"type": "text", "text": text}])


def parse_verification(reply: str, num_assertions: int) -> list[dict[str, bool]]:
  """[{"verified": bool, "pointable": bool}] aligned with the assertions."""
  def validate(value):
    items = json_reply.require_list(_unwrap(value), "verdicts", num_assertions)
    verdicts = []
    for i, item in enumerate(items):
      item = json_reply.require_dict(item, f"verdict {i}", ("verified", "pointable"))
      verdicts.append({k: json_reply.require_bool(item[k], f"verdict {i}.{k}")
                       for k in ("verified", "pointable")})
    return verdicts
  return json_reply.parse_reply(reply, validate)


# cover


def coverage_messages(caption: str, units: Sequence[str]) -> list[dict]:
  return _system_and_user(
      "cover",
      f"Caption:\n<caption>\n{caption.strip()}\n</caption>\n\n"
      f"Reference units ({len(units)}):\n<units>\n"
      f"{json.dumps(list(units), ensure_ascii=False)}\n</units>")


def parse_coverage(reply: str, num_units: int) -> list[bool]:
  def validate(value):
    items = json_reply.require_list(_unwrap(value), "coverage", num_units)
    return [json_reply.require_bool(x, f"unit {i}") for i, x in enumerate(items)]
  return json_reply.parse_reply(reply, validate)


# rate


def rating_messages(caption: str) -> list[dict]:
  return _system_and_user("rate", f"Caption:\n<caption>\n{caption.strip()}\n</caption>")


def parse_rating(reply: str) -> dict[str, float]:
  """Each aspect normalised from 1..5 to [0, 1] as (x - 1) / 4."""
  low, high = RATING_RANGE
  def validate(value):
    value = json_reply.require_dict(value, "rating", RATING_ASPECTS)
    return {k: (json_reply.require_number(value[k], k, low, high) - low) / (high - low)
            for k in RATING_ASPECTS}
  return json_reply.parse_reply(reply, validate)


# images
