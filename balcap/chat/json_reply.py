"""Reading JSON out of a judge's chat reply: lenient about where the JSON sits, strict about
what it holds.

Judges wrap their answer in ```json fences, put a sentence before or after it, or leave one
trailing comma; `parse_reply` finds every plausible JSON value in the text and returns the
first one its validator accepts. A reply with no acceptable value raises `ReplyError`, which
the judge answers with one reminder-carrying retry before giving up on the component.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

# Scanning every bracket of a long rambling reply would be quadratic; a real answer starts
# within the first few dozen.
_MAX_START_POSITIONS = 64
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_DECODER = json.JSONDecoder()


class ReplyError(ValueError):
  """A reply holds no JSON value of the expected shape."""


def parse_reply(text: str, validate: Callable[[Any], T]) -> T:
  """The first JSON value in `text` that `validate` accepts, as `validate` returns it.

  `validate` raises `ReplyError` for a value of the wrong shape; the error of the first
  candidate is reported when none fits, since that is the one the judge most likely meant.
  """
  if not isinstance(text, str) or not text.strip():
    raise ReplyError("empty reply")
  first_error = None
  for value in _candidates(text):
    try:
      return validate(value)
    except ReplyError as e:
      first_error = first_error or e
  if first_error is not None:
    raise first_error
  raise ReplyError(f"no JSON value found in reply starting {text.strip()[:80]!r}")


def _candidates(text: str) -> Iterator[Any]:
  """Every JSON value found: the whole text, fenced blocks, then values embedded in prose."""
  stripped = text.strip()
  yield from _loads(stripped)
  for block in _FENCE.findall(text):
    yield from _loads(block.strip())
  starts = [m.start() for m in re.finditer(r"[\[{]", text)][:_MAX_START_POSITIONS]
  for fix in (False, True):
    for start in starts:
      source = _drop_trailing_commas(text[start:]) if fix else text[start:]
      try:
        value, _ = _DECODER.raw_decode(source)
      except ValueError:
        continue
      yield value


def _loads(text: str) -> Iterator[Any]:
  for source in (text, _drop_trailing_commas(text)):
    try:
      yield json.loads(source)
      return
    except ValueError:
      continue


def _drop_trailing_commas(text: str) -> str:
  """`text` without commas that directly precede a closing bracket, outside strings.

  Only one comma per closer is dropped: `[1,,]` stays invalid, as it should.
  """
  out = []
  in_string = escaped = False
  for i, char in enumerate(text):
    if in_string:
      if escaped:
        escaped = False
      elif char == "\\":
        escaped = True
      elif char == '"':
        in_string = False
    elif char == '"':
      in_string = True
    elif char == ",":
      j = i + 1
      while j < len(text) and text[j].isspace():
        j += 1
      if j < len(text) and text[j] in "]}":
        continue
    out.append(char)
  return "".join(out)


# Shape checks shared by the prompt parsers. `where` names the spot in the reply for errors.


def require_list(value: Any, where: str, length: int | None = None) -> list:
  if not isinstance(value, list):
    raise ReplyError(f"{where}: expected a JSON array, got {_kind(value)}")
  if length is not None and len(value) != length:
    raise ReplyError(f"{where}: expected {length} items, got {len(value)}")
  return value


def require_dict(value: Any, where: str, keys: tuple[str, ...]) -> dict:
  if not isinstance(value, dict):
    raise ReplyError(f"{where}: expected a JSON object, got {_kind(value)}")
  missing = [k for k in keys if k not in value]
  if missing:
    raise ReplyError(f"{where}: missing key(s) {missing}")
  return value


def require_bool(value: Any, where: str) -> bool:
  if not isinstance(value, bool):
    raise ReplyError(f"{where}: expected true or false, got {_kind(value)}")
  return value


def require_str(value: Any, where: str) -> str:
  if not isinstance(value, str):
    raise ReplyError(f"{where}: expected a string, got {_kind(value)}")
  return value


def require_number(value: Any, where: str, low: float, high: float) -> float:
  # bool is an int in Python; `true` is not a rating.
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ReplyError(f"{where}: expected a number, got {_kind(value)}")
  if not low <= value <= high:
    raise ReplyError(f"{where}: {value} is outside [{low}, {high}]")
  return float(value)


def _kind(value: Any) -> str:
  names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
           int: "a number", float: "a number", type(None): "null"}
  return names.get(type(value), type(value).__name__)
