"""Reads a caption back into the claims it makes, with CapWorld's lexicon.

`parse_caption` splits a caption into sentences, each sentence into lexicon phrases (longest
match over `lexicon.phrase_table`), groups them into noun phrases (determiner, size, colour,
shape, and any label or region right after the shape) and interprets them with the same
`Discourse` rules the writers use: indefinites introduce entities, definites refer back,
predicates, relations, counts and the background add claims. Whatever it cannot interpret is
kept as a `Span` (meta commentary, mood, unknown words, negated sentences, claims left
dangling), because precision counts those as assertions that failed.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from balcap.data.capworld import lexicon as lx
from balcap.data.capworld.claims import Discourse, Mention
from balcap.data.capworld.world import Fact

# Categories that can start a noun phrase.
_NP_START = ("det_indefinite", "det_definite", "one", "number", "size", "colour", "shape",
             "shapes", "total", "total_singular")
# Categories skipped when looking for a region or label right after a noun ("... in the top
# left corner", '... labelled "GO"'), and after a conjunction.
_LINKING = ("filler", "det_definite", "region_preposition")
_PLURAL = -1  # `current` value while the clause is about a plural ("two circles")


@dataclasses.dataclass(frozen=True)
class Span:
  """Part of a sentence that makes no checkable claim. kind: "meta" (commentary, mood),
  "negated" (a negation: CapWorld states no negative facts), "unparsed" (anything else)."""
  text: str
  kind: str


@dataclasses.dataclass(frozen=True)
class ParsedSentence:
  text: str
  claims: tuple[Fact, ...]
  spans: tuple[Span, ...]


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
  """The claims of a caption (subjects are entity indices into `entities`) and its spans."""
  sentences: tuple[ParsedSentence, ...]
  entities: tuple[Mention, ...]

  @property
  def claims(self) -> tuple[Fact, ...]:
    return tuple(c for s in self.sentences for c in s.claims)

  @property
  def spans(self) -> tuple[Span, ...]:
    return tuple(x for s in self.sentences for x in s.spans)


@dataclasses.dataclass
class _Item:
  """One lexicon phrase of a sentence: its category, canonical value and character span."""
  category: str
  value: object
  start: int
  end: int


_TOKEN = re.compile(r'"[^"]*"|[A-Za-z0-9]+(?:\'[A-Za-z]+)?|[,;:]')
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+')


def _words(sentence: str) -> list[tuple[str, int, int]]:
  """(normalised word or punctuation or quoted label, start, end); contractions expanded."""
  words = []
  for m in _TOKEN.finditer(sentence):
    token, start, end = m.group(), m.start(), m.end()
    if token.startswith('"'):
      words.append((token, start, end))
      continue
    lower = token.lower()
    if lower.endswith("n't"):
      parts = [lower[:-3] or "not", "not"]
    elif lower.endswith("'s") and lower[:-2] in ("there", "it", "here", "that", "what"):
      parts = [lower[:-2], "is"]
    else:
      parts = list(lx.normalise_words(lower)) or [lower]
    words += [(p, start, end) for p in parts]
  return words


@functools.cache
def _longest_phrase() -> int:
  return max(len(k) for k in lx.phrase_table())


def _lex(sentence: str) -> list[_Item]:
  """Longest-match lexicon lookup; unknown words become category "unknown"."""
  table = lx.phrase_table()
  longest = _longest_phrase()
  words = _words(sentence)
  items, k = [], 0
  while k < len(words):
    word, start, end = words[k]
    if word.startswith('"'):
      items.append(_Item("label", word.strip('"').strip(), start, end))
      k += 1
      continue
    if word in ",;:":
      items.append(_Item({",": "comma", ";": "semicolon", ":": "colon"}[word], None, start, end))
      k += 1
      continue
    for length in range(min(longest, len(words) - k), 0, -1):
      key = tuple(w for w, _, _ in words[k:k + length])
      if key in table:
        category, value = table[key]
        items.append(_Item(category, value, start, words[k + length - 1][2]))
        k += length
        break
    else:
      items.append(_Item("unknown", word, start, end))
      k += 1
  return items


class _SentenceReader:
  """Interprets one sentence's items against the caption's discourse."""

  def __init__(self, items: list[_Item], discourse: Discourse):
    self.items = items
    self.discourse = discourse
    self.used = [False] * len(items)       # the item is part of a claim
    self.failed = [False] * len(items)     # the item is a claim we cannot interpret
    self.current: int | None = None        # entity the clause is about (or _PLURAL)
    self.plural: dict[str, str] = {}       # shape (and colour) of the last plural, for "one"
    self.pending: list[tuple[int, str, str]] = []  # (item, kind, value) before their noun
    self.relation: tuple | None = None     # ("figure", entity, rel) or ("landmark", rel, entity)
    self.relation_item = -1

  def category(self, k: int) -> str | None:
    return self.items[k].category if 0 <= k < len(self.items) else None

  def _next_content(self, k: int, skip: tuple[str, ...]) -> int:
    while self.category(k) in skip:
      k += 1
    return k

  def read(self) -> None:
    k = 0
    while k < len(self.items):
      k = self._step(k)
    for item, _, _ in self.pending:
      self.failed[item] = True
    if self.relation is not None:
      self.failed[self.relation_item] = True

  def _step(self, k: int) -> int:
    item, category = self.items[k], self.items[k].category
    if category in ("det_indefinite", "det_definite", "colour"):
      colour_at = k + 1 if category != "colour" else k
      if self.category(colour_at) == "colour" and self.category(colour_at + 1) == "background":
        self._background(colour_at, range(k, colour_at + 2))
        return colour_at + 2
    if category in _NP_START:
      end = self._noun_phrase(k)
      if end is not None:
        return end
      if category in ("size", "colour"):
        self._attribute(k, category, item.value)
      return k + 1
    if category == "background":
      colour_at = self._next_content(k + 1, ("verb", "det_indefinite", "det_definite", "filler"))
      if self.category(colour_at) == "colour" and colour_at > k + 1:
        self._background(colour_at, range(k, colour_at + 1))
        return colour_at + 1
    elif category in ("region", "label"):
      self._attribute(k, category, item.value)
    elif category == "relation":
      self.relation_item = k
      if self.current is None:
        self.relation = ("landmark", item.value, None)
      elif self.current == _PLURAL:
        self.failed[k] = True
      else:
        self.relation = ("figure", self.current, item.value)
    elif category in ("semicolon", "colon"):
      self.current = None
    elif category == "conjunction":
      following = self._next_content(k + 1, _LINKING + ("verb",))
      if self.category(following) not in ("size", "colour", "label"):
        self.current = None  # a new clause, not "... is red and large"
    elif category == "region_preposition":
      following = self._next_content(k + 1, ("det_definite",))
      if self.category(following) != "region":
        self.failed[k] = True
    elif category in ("unknown", "meta"):
      self.failed[k] = True
    return k + 1

  def _background(self, colour_at: int, covered: range) -> None:
    self.discourse.background(self.items[colour_at].value)
    for j in covered:
      self.used[j] = True

  def _attribute(self, k: int, kind: str, value: str) -> None:
    """A descriptor outside a noun phrase: it describes the clause's current entity."""
    if self.current is None:
      self.pending.append((k, kind, value))
    elif self.current == _PLURAL:
      self.failed[k] = True
    else:
      self.discourse.attribute(self.current, kind, value)
      self.used[k] = True

  def _noun_phrase(self, k: int) -> int | None:
    """Reads a noun phrase starting at item k; returns the index after it, or None."""
    start, determiner, number = k, None, None
    if self.category(k) in ("det_indefinite", "det_definite"):
      determiner = self.category(k)
      k += 1
    if self.category(k) == "number":
      number = self.items[k].value
      k += 1
    elif self.category(k) == "one" and determiner is None:
      determiner = "one"
      k += 1
    adjectives: dict[str, str] = {}
    while self.category(k) in ("size", "colour") and not (
        self.category(k) == "colour" and self.category(k + 1) == "background"):
      adjectives[self.category(k)] = self.items[k].value
      k += 1
    head = self.category(k)
    if head in ("shape", "shapes", "total", "total_singular") or (
        head == "one" and (determiner or adjectives)):
      k += 1
    elif determiner == "one" and self.plural:
      head = "one"  # "one red": the noun is the plural's, left out
    else:
      return None
    end = k
    for j in range(start, end):
      self.used[j] = True
    if head in ("shapes", "total") or (head == "total_singular" and number is not None):
      self._plural(head, number, adjectives, start, end)
      return end
    descriptors = dict(adjectives)
    if head == "shape":
      descriptors["shape"] = self.items[end - 1].value
    elif head == "one":
      descriptors = {**self.plural, **adjectives}
    # A label or region right after the noun belongs to the phrase.
    while True:
      after = self._next_content(end, _LINKING)
      if self.category(after) not in ("label", "region"):
        break
      descriptors[self.category(after)] = self.items[after].value
      for j in range(end, after + 1):
        self.used[j] = True
      end = after + 1
    if determiner == "det_definite":
      entity, _ = self.discourse.refer(descriptors)
      for item, kind, value in self.pending:
        self.discourse.attribute(entity, kind, value)
        self.used[item] = True
    else:
      for item, kind, value in self.pending:
        descriptors.setdefault(kind, value)
        self.used[item] = True
      entity = self.discourse.introduce(descriptors)
    self.pending = []
    self._relate(entity)
    self.current = entity
    return end

  def _plural(self, head: str, number: int | None, adjectives: dict[str, str], start: int,
              end: int) -> None:
    if head == "shapes":
      self.plural = {"shape": self.items[end - 1].value, **adjectives}
    if number is not None:
      shape = self.items[end - 1].value if head == "shapes" else None
      colour = adjectives.get("colour") if head == "shapes" else None
      self.discourse.count(number, shape, colour)
    else:
      for j in range(start, end):
        self.used[j] = False
    self.current = _PLURAL

  def _relate(self, entity: int) -> None:
    """Completes a pending relation with the noun phrase just read."""
    if self.relation is None:
      return
    if self.relation[0] == "figure":
      self.discourse.relation(self.relation[1], self.relation[2], entity)
    elif self.relation[2] is None:
      self.relation = ("landmark", self.relation[1], entity)
      return
    else:
      self.discourse.relation(entity, self.relation[1], self.relation[2])
    self.used[self.relation_item] = True
    self.relation = None

  def spans(self, sentence: str) -> tuple[Span, ...]:
    """Runs of failed items not separated by any item that made a claim."""
    spans, run = [], []
    for k, item in enumerate(self.items):
      if self.used[k] and run:
        spans.append(run)
        run = []
      if self.failed[k]:
        run.append(k)
    if run:
      spans.append(run)
    return tuple(Span(sentence[self.items[r[0]].start:self.items[r[-1]].end],
                      "meta" if any(self.items[j].category == "meta" for j in r) else "unparsed")
                 for r in spans)


def parse_sentence(sentence: str, discourse: Discourse) -> ParsedSentence:
  """The claims and spans of one sentence, added to the caption's discourse."""
  items = _lex(sentence)
  if any(item.category == "negation" for item in items):
    return ParsedSentence(sentence, (), (Span(sentence, "negated"),))
  before = len(discourse.claims)
  reader = _SentenceReader(items, discourse)
  reader.read()
  return ParsedSentence(sentence, tuple(discourse.claims[before:]), reader.spans(sentence))


def split_sentences(text: str) -> list[str]:
  return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def parse_caption(text: str) -> ParsedCaption:
  """Every claim the caption makes, in CapWorld's terms, and every span it could not read."""
  discourse = Discourse()
  sentences = tuple(parse_sentence(s, discourse) for s in split_sentences(text))
  return ParsedCaption(sentences, discourse.mentions())
