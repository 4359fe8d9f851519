"""A toy judge for balcap's eval prompts (evals/prompts.py): every answer follows a rule, so a
test knows every score.

  decompose  the caption split at "."; a fact is descriptive unless it says "lovely";
             "NOFACTS" -> []; "BROKEN" -> never JSON (the item goes invalid)
  match      a fact matches the reference with the same words (case and final "." aside)
  verify     true unless the fact says "unicorn"
  question   the letter of the first option the caption contains as a word; else the
             "cannot answer" letter (the last letter for yes/no questions); "GIBBERISH" captions -> "??" (unparsable)
  arena      the caption with more words is better; equal -> Tie; "CONFUSED" -> no verdict
"""

from __future__ import annotations

import json
import re

from balcap.evals import captionqa


def _text(messages) -> str:
  content = messages[0]["content"]
  if isinstance(content, list):
    content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
  return content


def _block(text: str, index: int = 0) -> str:
  return re.findall(r"<text>\n(.*?)\n</text>", text, re.DOTALL)[index]


def _numbered(text: str, heading: str) -> list[str]:
  section = text.split(heading + ":\n", 1)[1].split("\n\n", 1)[0]
  return [line.split(". ", 1)[1] for line in section.splitlines() if line.strip()]


def _norm(fact: str) -> str:
  return fact.strip().rstrip(".").lower()


def answer(messages) -> str:
  text = _text(messages)
  if text.startswith("Break the image description"):
    caption = _block(text)
    if "BROKEN" in caption:
      return "I would rather not."
    if "NOFACTS" in caption:
      return "[]"
    facts = [f.strip() for f in caption.split(".") if f.strip()]
    return json.dumps([{"fact": f + ".", "descriptive": "lovely" not in f} for f in facts])
  if text.startswith("Below are facts"):
    candidates, references = _numbered(text, "Candidates"), _numbered(text, "References")
    refs = [_norm(r) for r in references]
    return json.dumps([refs.index(_norm(c)) + 1 if _norm(c) in refs else None
                       for c in candidates])
  if text.startswith("Here is an image, a human-written"):
    return json.dumps(["unicorn" not in f for f in _numbered(text, "Facts")])
  if text.startswith("You cannot see the image"):
    caption = _block(text).lower()
    if "gibberish" in caption:
      return "??"
    options = re.findall(r"^([A-Z])\. (.*)$", text, re.MULTILINE)
    for letter, option in options:
      if option != captionqa.CANNOT_ANSWER and re.search(
          rf"\b{re.escape(option.lower())}\b", caption):
        return letter
    # No match: "cannot answer", or the last option when there is none (yes/no questions).
    return next((letter for letter, option in options if option == captionqa.CANNOT_ANSWER),
                options[-1][0])
  if text.startswith("Here is an image, a reference"):
    first, second = _block(text, 1), _block(text, 2)
    if "CONFUSED" in first + second:
      return "Both have merit."
    a, b = len(first.split()), len(second.split())
    verdict = "Tie" if a == b else "Caption 1 is better" if a > b else "Caption 2 is better"
    return f"Compared the two.\n{verdict}"
  return "echo"
