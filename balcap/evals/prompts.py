"""The evaluation judges' prompts and the parsers of their replies.

balcap's own wording of each benchmark's protocol (the upstream repositories publish no
licence for theirs): numbers from these prompts are comparable with each other, not with
figures computed by the official scripts and judges. Change any wording and bump
`PROMPT_VERSION`: it keys the reply cache and is written into every result.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from balcap.chat import images, json_reply
from balcap.chat.json_reply import ReplyError
from balcap.evals import caparena, captionqa

PROMPT_VERSION = "balcap-eval-v1"

REMINDER = ("Your previous reply could not be used ({error}). Reply again, following the "
            "format asked for exactly.")


def with_reminder(messages: Sequence[dict], error: str) -> list[dict]:
  """`messages` plus a user turn saying why the last reply was rejected (a retry)."""
  return list(messages) + [{"role": "user", "content": REMINDER.format(error=error)}]


def _numbered(items: Sequence[str]) -> str:
  return "\n".join(f"{i + 1}. {item}" for i, item in enumerate(items))


def _unwrap(value: Any) -> Any:
  # JSON modes that allow only objects make judges wrap a list: {"facts": [...]}.
  if isinstance(value, dict) and len(value) == 1:
    (inner,) = value.values()
    if isinstance(inner, list):
      return inner
  return value


# --- DCScore ------------------------------------------------------------------------------------

_DECOMPOSE = """\
Break the image description below into atomic facts. An atomic fact states exactly one thing: \
that an object is present, one attribute of one object (colour, size, material, state, \
count), one relation between two objects, or one piece of text visible in the image. Rewrite \
each fact as a short standalone sentence that names its object, and keep every fact the \
description states, once.

Tag each fact "descriptive": true when it describes what can be seen, false when it is an \
interpretation, a feeling, a guess, or a comment about the image or the photograph itself.

Reply with a JSON list only, e.g. [{{"fact": "A dog lies on a sofa.", "descriptive": true}}].

Description:
<text>
{caption}
</text>"""

_MATCH = """\
Below are facts stated by a description of an image (the candidates) and facts a human \
annotator listed for the same image (the references). For each candidate, give the number \
of the reference fact that states the same thing (the same object and the same attribute or \
relation, allowing different words), or null when no reference states it.

Candidates:
{candidates}

References:
{references}

Reply with a JSON list only: one entry per candidate, in order, each a reference number or \
null. There are {count} candidates."""

_VERIFY = """\
Here is an image, a human-written description of it, and numbered facts a model stated \
about it. Using the image first and the human description to resolve details that are hard \
to see, decide whether each fact is true of the image.

Human description:
<text>
{oracle}
</text>

Facts:
{facts}

Reply with a JSON list only: one true or false per fact, in order. There are {count} facts."""


def decompose_messages(caption: str) -> list[dict]:
  return [{"role": "user", "content": _DECOMPOSE.format(caption=caption)}]


def parse_decomposition(reply: str) -> list[tuple[str, bool]]:
  """[(fact, descriptive)]; a caption with no facts is an empty list."""
  def validate(value):
    value = json_reply.require_list(_unwrap(value), "the facts")
    facts = []
    for k, item in enumerate(value):
      where = f"fact {k + 1}"
      item = json_reply.require_dict(item, where, ("fact", "descriptive"))
      text = json_reply.require_str(item["fact"], f"{where}'s fact").strip()
      if text:
        facts.append((text, json_reply.require_bool(item["descriptive"],
                                                      f"{where}'s descriptive")))
    return facts
  return json_reply.parse_reply(reply, validate)


def match_messages(facts: Sequence[str], oracle_facts: Sequence[str]) -> list[dict]:
  return [{"role": "user", "content": _MATCH.format(
      candidates=_numbered(facts), references=_numbered(oracle_facts), count=len(facts))}]


def parse_matches(reply: str, num_facts: int, num_oracle: int) -> list[int | None]:
  """0-based oracle indices (None: no match) for each fact."""
  def validate(value):
    value = json_reply.require_list(_unwrap(value), "the matches", num_facts)
    out = []
    for k, item in enumerate(value):
      if item is None or (isinstance(item, str) and item.strip().lower() in ("null", "none")):
        out.append(None)
        continue
      number = json_reply.require_number(item, f"match {k + 1}", 1, num_oracle)
      if number != int(number):
        raise ReplyError(f"match {k + 1} is {item!r}, not a reference number")
      out.append(int(number) - 1)
    return out
  return json_reply.parse_reply(reply, validate)


def verify_messages(facts: Sequence[str], oracle_caption: str, image_url: str,
                    detail: str = "auto") -> list[dict]:
  text = _VERIFY.format(oracle=oracle_caption, facts=_numbered(facts), count=len(facts))
  return [{"role": "user", "content": [images.image_part(image_url, detail),
                                       {"type": "text", "text": text}]}]


def parse_verification(reply: str, num_facts: int) -> list[bool]:
  def validate(value):
    value = json_reply.require_list(_unwrap(value), "the verdicts", num_facts)
    return [json_reply.require_bool(v, f"verdict {k + 1}") for k, v in enumerate(value)]
  return json_reply.parse_reply(reply, validate)


# --- CaptionQA ----------------------------------------------------------------------------------

_QUESTION = """\
You cannot see the image. Answer the multiple-choice question about it using only this \
description of the image.

Description:
<text>
{caption}
</text>

Question: {question}
{options}

Reply with the letter of one option only.
Answer:"""


def question_messages(caption: str, question: str, options: captionqa.Options) -> list[dict]:
  return [{"role": "user", "content": _QUESTION.format(
      caption=caption, question=question, options=options.prompt_lines())}]


# --- CapArena-Auto ------------------------------------------------------------------------------

_ARENA = """\
Here is an image, a reference description written by a person, and two captions of the \
image written by models. Decide which caption describes the image better: judge first \
accuracy (nothing stated that the image does not show), then how much of the image's content \
it covers, then clarity. Do not prefer a caption for being longer. Use the reference to \
check details, not as the standard of style.

Reference:
<text>
{human}
</text>

Caption 1:
<text>
{first}
</text>

Caption 2:
<text>
{second}
</text>

Explain your comparison briefly, then end your reply with one line that is exactly \
"Caption 1 is better", "Caption 2 is better" or "Tie"."""


def arena_messages(image_url: str, human: str, first: str, second: str,
                   detail: str = "auto") -> list[dict]:
  text = _ARENA.format(human=human, first=first, second=second)
  return [{"role": "user", "content": [images.image_part(image_url, detail),
                                       {"type": "text", "text": text}]}]


def parse_arena(reply: str) -> int:
  """1, 2 (that caption is better) or 0 (tie); ReplyError when the reply holds no verdict."""
  verdict = caparena.parse_verdict(reply)
  if verdict is None:
    raise ReplyError('no verdict ("Caption 1 is better", "Caption 2 is better" or "Tie")')
  return verdict


def describe() -> dict[str, Any]:
  """What a result records of the prompts it was judged with."""
  wording = "\n".join((_DECOMPOSE, _MATCH, _VERIFY, _QUESTION, _ARENA, REMINDER))
  return {"prompt_version": PROMPT_VERSION,
          "prompts_sha256": hashlib.sha256(wording.encode()).hexdigest()[:16]}
