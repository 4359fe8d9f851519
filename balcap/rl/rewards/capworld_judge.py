"""An exact judge for CapWorld: precision, recall and linguistic quality from the scene graph.

No model is involved: a caption is read with CapWorld's own parser and checked against the
example's scene graph (`sample.fields["scene_graph"]`, the JSON string CapWorld stores), so
every score is a deterministic function of (caption, scene, references).

Assertions. Every claim the parser reads (object/shape, colour, size, region, label,
relation, count, background) is one assertion, and so is every `Span` it could not turn into
claims: one assertion per span, where a span is a run of unreadable words not interrupted by
a claim (the parser's own unit). A "meta" span (commentary, mood, style) is non-pointable; a
"negated" span (CapWorld states no negative facts) and an "unparsed" span are unverifiable.
Claims are all pointable (each names something visible). `CapWorldJudge(pointability=False)`
(`config.rewards.capworld.pointability`, an ablation) stops counting meta spans: precision
then ignores commentary, which only clarity still charges. A claim made again (the same fact
about the same grounded objects, in other words or in a repeated sentence) is one assertion:
saying a true thing twice adds no information, so it must not add precision either. Spans are
never merged (a repeated aside is still an aside). So
  precision = #distinct verified claims / (#distinct claims + #spans)   (0 assertions -> 0.0)

Grounding. Claims are about the caption's entities; `ground_entities` maps each entity to a
scene object or to none so that the most claims are verified (a claim is verified when,
grounded, it is one of `scene_facts(scene)`; "a shape" of no named kind holds for any grounded
entity; a relation with an ungrounded end is false). Two entities may share an object only
when they come from different sentences and nothing said about them conflicts: a thing
described again ("There is a red circle. ... There is a red circle.") is repetition, which
coherence scores, not a second object; "a red circle and a red circle" in one sentence, or
"a red circle" and later "a blue circle", are two. Exact branch and bound (`_assign`); a
pathological caption stops after MAX_GROUNDING_NODES nodes with the best grounding found
(CapWorld's own captions need < 50). Ties: the first best found, taking entities by the most
claims each can verify (then in caption order), each trying objects by its claims there,
then objects no entity is on yet, then index, then none. An entity left with no verified
claim is ungrounded. A definite description with no antecedent ("The red circle is large."
first) introduces its entity, as captions of an image often do, unpenalised.

Recall. The units are the verified grounded facts of all the example's references (each
reference is parsed and grounded the same way; written by CapWorld's grammar, the parse is
exact), as one set of scene facts: object indices, converse relations normalised by `Fact`,
so a fact two references state differently is one unit. recall = #units among the caption's
verified grounded facts / #units. No references (or none with a checkable fact) -> NaN,
cause "no_reference". A reference by itself covers only the units it states: against the
union of two references it scores below 1 when the other states more details.

Linguistic = (fluency x clarity x coherence)^(1/3): a caption that fails one quality entirely
(all fragments, all commentary, all repetition) does not read well whatever the others say.
Each sub-score falls steeply with how much of the caption its problems take, so padding a
caption with repeats, commentary or run-ons cannot pay:
  score = (1 - s)^2,  s = the share of the caption's words in sentences with a problem of its
  kind (a third of the words: 0.44; half: 0.25; a reference said ten times: 0.01),
and coherence is halved again for each contradiction (one false restatement makes the whole
caption untrustworthy). A caption with no sentence scores 0. The problems:
  fluency    - an unparsed span; a fragment: no verb of the lexicon (`lexicon.VERBS`) in a
               sentence that is not pure commentary or negation ("A red circle."); a run-on:
               more than MAX_CLAUSES new entities (the members of a counted group, "two
               circles: a red one and ...", are one clause), MAX_CLAIMS claims or MAX_WORDS
               words. `write_reference` writes at most 2 clauses, 16 claims, ~40 words.
  clarity    - a meta span; a vague word (VAGUE_WORDS); an ambiguous definite description
               (one that fits earlier entities grounded to different objects).
  coherence  - a sentence repeated word for word; a claim already made (same grounded fact);
               a contradiction of an earlier claim (a second shape/colour/size/region/label
               for one object, a second number for one count, a second background, a relation
               and its reverse); a new entity that grounds to no object.
`details` also counts the claims restated, the distinct claims and verified ones of each kind
(`by_kind`: which attributes a captioner reads right, e.g. colours but not regions), the
recall units and covered ones of each kind (`units_by_kind`: what it leaves out), and flags
a "degenerate" caption (a repeated sentence, a restated claim or a contradiction), whose share
the demo reports. The hack battery (tests/rl/test_capworld_hacks.py) attacks these rules
with repeats to length, commentary padding, self-contradiction, bare attribute lists, one
wrong attribute, empty and one-word captions and ten-fold repetition: each must score below
honest captions, on the component a reader would blame.

What each CapWorld flaw (`flaws.FLAW_TYPES`) does, as the tests check it on captions that
differ from a reference by that flaw alone (= unchanged, 1 when nothing else is wrong):
  flaw             precision  recall  linguistic
  missed_object    =          < 1     =
  wrong_color      < 1        < 1     =        (every reference states each object's colour)
  wrong_shape      < 1        < 1     =        (... and its shape)
  wrong_count      < 1        =       coherence < 1 iff the caption gives that count too
  wrong_relation   < 1        =       coherence < 1 iff the caption states the true one too
  meta_commentary  < 1        =       clarity < 1
  repetition       =          =       coherence < 1
  too_short        =          < 1     fluency < 1: `flaws` writes a verbless listing
  too_long         =          <= 1    fluency < 1 with 3+ objects (one ", and" run-on);
                                      coherence < 1 once padded (details said again)
A hedged caption (`flaws.HEDGE_PROBABILITY`: "a red shape", no shape named) keeps precision
and linguistic and loses the shape units of recall, as a wrong shape does, so a captioner
that cannot tell shapes apart earns more by hedging than by guessing
(tests/rl/test_capworld_judge.py). Recall under too_short stays 1 only if the reference said
nothing but the shapes and colours listed; too_long says every detail but may miss a shape
count or relation. A caption over twice a one-sentence reference can read well (linguistic
1): length masking handles it. The
SFT captions `flaws.write_sft_caption` ships (1-3 flaws) keep these directions, except that
their length labels come from word counts alone (a plain caption can be "too_short") and a
"wrong" description that happens to be true of an unmentioned object is verified: the judge
reads the text, not the writer's intent.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Any, Callable, Mapping, Sequence

from balcap.data.capworld import lexicon
from balcap.data.capworld.claims import Discourse
from balcap.data.capworld.parse import ParsedCaption, parse_sentence, split_sentences
from balcap.data.capworld.world import (Fact, Scene, fact_holds, scene_facts,
                                        scene_from_json)
from balcap.rl.rewards.types import Judgement, Sample

# Run-on limits per sentence, each above anything `write_reference` writes (2 clauses: a
# compound sentence; 16 claims: a group of three with every detail; about 40 words), below
# the flawed writer's run-ons and listings of 3 or more objects.
MAX_CLAUSES = 2
MAX_CLAIMS = 16
MAX_WORDS = 45
# Words that make a sentence vague: quantities without a number, hedges, placeholders.
# None of them is in CapWorld's lexicon, so a reference never uses one.
VAGUE_WORDS = frozenset((
    "several", "some", "various", "many", "few", "couple", "numerous", "multiple", "lots",
    "bunch", "somewhat", "kind", "sort", "maybe", "perhaps", "possibly", "probably", "seem",
    "seems", "seemingly", "might", "thing", "things", "stuff", "something", "etc", "roughly",
    "nearby", "around", "whatever", "certain"))
# Branch and bound nodes per caption before the grounding search settles for the best found
# (tens of ms): CapWorld's own captions need < 50, and on random look-alike captions (tests)
# the best found within 2,000 was always the optimum.
MAX_GROUNDING_NODES = 2_000
MAX_LISTED = 8  # failed assertions, missed units and problems kept in details, each

# Claims about one entity; each names one value of one attribute, so two different values
# of the same kind for one object contradict each other.
ENTITY_KINDS = ("object", "colour", "size", "region", "label")
# Verbs as single normalised words ("can be found" has "be"); "s" is "'s" in "there's".
_VERB_WORDS = frozenset(w for phrase in lexicon.VERBS for w in lexicon.normalise_words(phrase)
                        ) | {"s"}
_WORD = re.compile(r"[a-z]+")


class _RecordingDiscourse(Discourse):
  """The parser's `Discourse`, also noting which sentence introduced each entity and which
  earlier entities each definite description fits (for run-ons and ambiguity). It changes
  nothing the parser reads."""

  def __init__(self):
    super().__init__()
    self.sentence = 0
    self.introduced_in: list[int] = []
    self.definites: list[tuple[int, tuple[int, ...]]] = []

  def introduce(self, descriptors):
    entity = super().introduce(descriptors)
    self.introduced_in.append(self.sentence)
    return entity

  def refer(self, descriptors):
    wanted = {k: v for k, v in descriptors.items() if v is not None}
    fits = tuple(e for e, known in enumerate(self.entities)
                 if all(known.get(k) == v for k, v in wanted.items()))
    self.definites.append((self.sentence, fits))
    return super().refer(descriptors)


@dataclasses.dataclass(frozen=True)
class Reading:
  """A caption as `parse_caption` reads it, plus what the linguistic rules need."""
  parsed: ParsedCaption
  introduced_in: tuple[int, ...]                    # entity -> sentence that introduced it
  definites: tuple[tuple[int, tuple[int, ...]], ...]  # (sentence, earlier entities it fits)

  @property
  def claim_sentence(self) -> tuple[int, ...]:
    """Claim index (into parsed.claims) -> its sentence."""
    return tuple(i for i, s in enumerate(self.parsed.sentences) for _ in s.claims)


def read_caption(text: str) -> Reading:
  """Parses `text` exactly as `parse_caption` does (same sentences, claims, spans)."""
  discourse = _RecordingDiscourse()
  sentences = []
  for i, sentence in enumerate(split_sentences(text)):
    discourse.sentence = i
    sentences.append(parse_sentence(sentence, discourse))
  return Reading(ParsedCaption(tuple(sentences), discourse.mentions()),
                 tuple(discourse.introduced_in), tuple(discourse.definites))


def _normalised(sentence: str) -> str:
  return " ".join(sentence.lower().split())


# --- Grounding. ---------------------------------------------------------------------------

def _grounded(claim: Fact, grounding: Sequence[int | None]) -> Fact:
  """The claim about scene objects (subject/other None where an entity is ungrounded)."""
  if claim.subject is None:
    return claim
  other = None if claim.other is None else grounding[claim.other]
  return Fact(claim.kind, grounding[claim.subject], claim.value, other, claim.shape,
              claim.colour)


def ground_entities(claims: Sequence[Fact], num_entities: int, facts: frozenset[Fact],
                    num_objects: int, introduced_in: Sequence[int] | None = None
                    ) -> tuple[int | None, ...]:
  """entity -> object index or None: the grounding that verifies the most claims, where two
  entities share an object only if they come from different sentences and nothing said
  about them conflicts (see the module docstring for ties and ungrounded entities).

  introduced_in: entity -> the sentence that introduced it. None: each in one of its own.
  """
  true = {(f.kind, f.subject, f.value, f.other) for f in facts}  # tuples: cheap to hash
  unary = [[0] * num_objects for _ in range(num_entities)]
  values = [collections.defaultdict(set) for _ in range(num_entities)]
  relations = []
  for c in claims:
    if c.kind == "relation":
      relations.append((c.subject, c.value, c.other))
    elif c.subject is not None:
      if c.value is not None:
        values[c.subject][c.kind].add(c.value)
      for o in range(num_objects):
        unary[c.subject][o] += c.value is None or (c.kind, o, c.value, None) in true
  sentence = list(range(num_entities)) if introduced_in is None else list(introduced_in)
  apart = [{b for b in range(num_entities) if b != a and (sentence[a] == sentence[b] or any(
      values[a][k] and values[b][k] and not values[a][k] & values[b][k] for k in ENTITY_KINDS))}
           for a in range(num_entities)]
  return tuple(_assign(unary, relations, apart, sentence, true, num_objects))


def _assign(unary: list[list[int]], relations: list[tuple[int, str, int]],
            apart: list[set[int]], sentence: list[int], true: set,
            num_objects: int) -> list[int | None]:
  """Entity -> object or None, entities in `apart[e]` never on e's object, verifying the most
  unary claims (`unary[e][object]`) plus relations (a, value, b), true when
  ("relation", object of a, value, object of b) is in `true`.

  Branch and bound, entities that can verify most first (then in caption order), each trying
  objects by its claims there, then objects nothing is on yet, then index, then none; the
  first best found wins. Bound: each entity left its best object that no entity it must
  stay apart from is on, but a sentence's entities (all apart) at most each object's best
  one; each relation left verified if some pair of objects makes it true.
  """
  num_entities = len(unary)
  related = {e for a, _, b in relations for e in (a, b)}
  options = [sorted((o for o in range(num_objects) if unary[e][o] > 0 or e in related),
                    key=lambda o: (-unary[e][o], o)) for e in range(num_entities)]
  order = sorted(range(num_entities), key=lambda e: (-max(unary[e], default=0), e))
  position = {e: i for i, e in enumerate(order)}
  relations_at = [[] for _ in range(num_entities)]  # decided when the later one is placed
  for r in relations:
    relations_at[max(position[r[0]], position[r[2]])].append(r)
  possible = [sum(any(("relation", x, value, y) in true for x in range(num_objects)
                      for y in range(num_objects)) for _, value, _ in relations_at[i])
              for i in range(num_entities)]
  possible_from = [0] * (num_entities + 1)
  alone = [0] * (num_entities + 1)  # the bound with nothing placed: each its best object
  for i in reversed(range(num_entities)):
    possible_from[i] = possible_from[i + 1] + possible[i]
    alone[i] = alone[i + 1] + possible[i] + max(unary[order[i]], default=0)
  assignment: list[int | None] = [None] * num_entities
  on: list[list[int]] = [[] for _ in range(num_objects)]  # entities on each object

  def allowed(e: int, o: int) -> bool:
    return not any(x in apart[e] for x in on[o])

  def bound(i: int) -> int:
    by_sentence: dict[int, list[int]] = collections.defaultdict(list)
    for e in order[i:]:
      by_sentence[sentence[e]].append(e)
    total = possible_from[i]
    for group in by_sentence.values():
      room = [[unary[e][o] if allowed(e, o) else 0 for o in options[e]] for e in group]
      each = sum(max(r, default=0) for r in room)
      if len(group) > 1:
        per_object = [0] * num_objects
        for e, r in zip(group, room):
          for o, u in zip(options[e], r):
            per_object[o] = max(per_object[o], u)
        each = min(each, sum(per_object))
      total += each
    return total

  best, best_assignment, nodes = -1, assignment[:], 0

  def visit(i: int, verified: int) -> None:
    nonlocal best, best_assignment, nodes
    nodes += 1
    if i == num_entities:
      if verified > best:
        best, best_assignment = verified, assignment[:]
      return
    if best >= 0 and (nodes > MAX_GROUNDING_NODES or verified + alone[i] <= best
                      or verified + bound(i) <= best):
      return
    e = order[i]
    for o in sorted((o for o in options[e] if allowed(e, o)),
                    key=lambda o: (-unary[e][o], bool(on[o]), o)) + [None]:
      assignment[e] = o
      gained = (unary[e][o] if o is not None else 0) + sum(
          ("relation", assignment[a], value, assignment[b]) in true
          for a, value, b in relations_at[i])
      if o is not None:
        on[o].append(e)
      visit(i + 1, verified + gained)
      if o is not None:
        on[o].pop()
    assignment[e] = None

  visit(0, 0)
  useful = {e for e, o in enumerate(best_assignment) if o is not None and unary[e][o]}
  useful |= {e for a, value, b in relations
             if ("relation", best_assignment[a], value, best_assignment[b]) in true
             for e in (a, b)}
  return [o if e in useful else None for e, o in enumerate(best_assignment)]


def _coverable(facts: Sequence[Fact]) -> set[Fact]:
  """Verified grounded facts as recall compares them: an object fact also says "a shape"."""
  out = set(facts)
  out |= {Fact("object", f.subject, None) for f in facts if f.kind == "object"}
  return out


def reference_units(scene: Scene, references: Sequence[str],
                    facts: frozenset[Fact] | None = None) -> frozenset[Fact]:
  """The recall units: every verified grounded fact any reference states."""
  facts = frozenset(scene_facts(scene)) if facts is None else facts
  units: set[Fact] = set()
  for reference in references:
    reading = read_caption(reference)
    claims = reading.parsed.claims
    grounding = ground_entities(claims, len(reading.parsed.entities), facts,
                                len(scene.objects), reading.introduced_in)
    units |= {f for f in (_grounded(c, grounding) for c in claims) if fact_holds(f, facts)}
  return frozenset(units)


# --- Linguistic rules: each returns (fraction of sentences without a problem, problems). ---

def _words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def _clauses(reading: Reading, index: int) -> int:
  """New entities of a sentence, the members of a counted group as one clause."""
  sentence = reading.parsed.sentences[index]
  counted = {c.shape for c in sentence.claims if c.kind == "count" and c.shape is not None}
  new = [e for e, s in enumerate(reading.introduced_in) if s == index]
  grouped = {reading.parsed.entities[e].shape for e in new} & counted
  return sum(reading.parsed.entities[e].shape not in counted for e in new) + len(grouped)


def fluency(reading: Reading) -> tuple[float, list[str]]:
  """Sentences with no unparsed span, that are no fragment and no run-on."""
  problems: dict[int, list[str]] = collections.defaultdict(list)
  for i, sentence in enumerate(reading.parsed.sentences):
    kinds = {span.kind for span in sentence.spans}
    problems[i] += [f'unparsed "{span.text}"' for span in sentence.spans
                    if span.kind == "unparsed"]
    if not kinds & {"meta", "negated"} and not set(_words(sentence.text)) & _VERB_WORDS:
      problems[i].append("fragment: no verb")
    clauses, claims = _clauses(reading, i), len(sentence.claims)
    words = len(sentence.text.split())
    if clauses > MAX_CLAUSES or claims > MAX_CLAIMS or words > MAX_WORDS:
      problems[i].append(f"run-on: {clauses} clauses, {claims} claims, {words} words")
  return _report(problems, reading)


def clarity(reading: Reading, grounding: Sequence[int | None]) -> tuple[float, list[str]]:
  """Sentences with no meta span, no vague word and no ambiguous definite description."""
  problems: dict[int, list[str]] = collections.defaultdict(list)
  for i, sentence in enumerate(reading.parsed.sentences):
    problems[i] += [f'meta "{span.text}"' for span in sentence.spans if span.kind == "meta"]
    vague = sorted(set(_words(sentence.text)) & VAGUE_WORDS)
    if vague:
      problems[i].append("vague: " + ", ".join(vague))
  for i, fits in reading.definites:
    things = {("object", grounding[e]) if grounding[e] is not None else ("entity", e)
              for e in fits}
    if len(things) > 1:
      problems[i].append(f"ambiguous reference: fits entities {list(fits)}")
  return _report(problems, reading)


def _subject_key(entity: int | None, grounding: Sequence[int | None]) -> Any:
  if entity is None:
    return None
  return ("object", grounding[entity]) if grounding[entity] is not None else ("entity", entity)


def _said_as(claim: Fact, grounding: Sequence[int | None]) -> tuple:
  """What a claim says about the scene: claims with the same key state the same thing."""
  return (claim.kind, _subject_key(claim.subject, grounding), claim.value,
          _subject_key(claim.other, grounding), claim.shape, claim.colour)


def coherence(reading: Reading, grounding: Sequence[int | None]) -> tuple[float, list[str]]:
  """Sentences that repeat, restate and contradict nothing, about objects of the scene."""
  problems: dict[int, list[str]] = collections.defaultdict(list)
  seen_sentences: dict[str, int] = {}
  said: set[tuple] = set()
  values: dict[tuple, Any] = {}  # (kind, subject / count key) -> the value first stated
  claim_sentence = reading.claim_sentence
  for i, sentence in enumerate(reading.parsed.sentences):
    text = _normalised(sentence.text)
    if text in seen_sentences:
      problems[i].append(f"repeats sentence {seen_sentences[text]}")
    seen_sentences.setdefault(text, i)
  for claim, i in zip(reading.parsed.claims, claim_sentence):
    subject = _subject_key(claim.subject, grounding)
    other = _subject_key(claim.other, grounding)
    said_as = _said_as(claim, grounding)
    if said_as in said and not problems[i]:  # one note is enough for a repeated sentence
      problems[i].append(f"restates {_describe(claim, reading)}")
    said.add(said_as)
    if claim.kind == "relation":
      if (claim.kind, other, claim.value, subject, None, None) in said:
        problems[i].append(f"contradicts: {_describe(claim, reading)} and its reverse")
      continue
    if claim.kind == "count":
      key = ("count", claim.shape, claim.colour)
    elif claim.kind in ENTITY_KINDS:
      key = (claim.kind, subject)
    else:
      key = (claim.kind,)
    if claim.value is None:
      continue
    if values.setdefault(key, claim.value) != claim.value:
      problems[i].append(f"contradicts: {_describe(claim, reading)} after {values[key]}")
  for entity, i in enumerate(reading.introduced_in):
    if grounding[entity] is None:
      problems[i].append(f"{_entity_name(reading, entity)} is no object of the scene")
  score, listed = _report(problems, reading)
  contradictions = sum(p.startswith("contradicts") for found in problems.values() for p in found)
  return score * 0.5 ** contradictions, listed


def _report(problems: dict[int, list[str]], reading: Reading) -> tuple[float, list[str]]:
  """((1 - share of the caption's words in sentences with a problem)^2, the problems as text);
  0 for a caption without sentences."""
  problems = {i: p for i, p in problems.items() if p}
  listed = [f"sentence {i}: {p}" for i in sorted(problems) for p in problems[i]]
  words = [max(len(s.text.split()), 1) for s in reading.parsed.sentences]
  if not words:
    return 0.0, listed
  share = sum(words[i] for i in problems) / sum(words)
  return (1.0 - share) ** 2, listed


def degenerate(problems: Sequence[str]) -> bool:
  """Whether coherence found a repeated sentence, a restated claim or a contradiction: the
  patterns of a policy gaming the judge (the demo reports their share)."""
  return any(marker in p for p in problems
             for marker in ("repeats sentence", "restates", "contradicts"))


# --- Readable claims and facts for details. ---

def _entity_name(reading: Reading, entity: int) -> str:
  m = reading.parsed.entities[entity]
  words = [w for w in (m.size, m.colour, m.shape or "shape") if w]
  return f'e{entity} "{" ".join(words)}"'


def _object_name(scene: Scene, index: int) -> str:
  o = scene.objects[index]
  return f'object {index} "{o.size} {o.colour} {o.shape}"'


def _readable(fact: Fact, name: Callable[[int], str]) -> str:
  """A claim or fact as text for details; `name` names its subject and other."""
  if fact.kind == "relation":
    return f"{name(fact.subject)} {fact.value} {name(fact.other)}"
  if fact.kind == "count":
    return f"count {fact.value} {' '.join(w for w in (fact.colour, fact.shape) if w) or 'total'}"
  if fact.kind == "background":
    return f"background {fact.value}"
  return f"{name(fact.subject)} {fact.kind} {fact.value}"


def _describe(claim: Fact, reading: Reading) -> str:
  return _readable(claim, lambda e: _entity_name(reading, e))


def _fact_order(fact: Fact) -> tuple:
  return (fact.kind, -1 if fact.subject is None else fact.subject, str(fact.value),
          -1 if fact.other is None else fact.other, fact.shape or "", fact.colour or "")


# --- The judge. ---------------------------------------------------------------------------

def _scene(graph: Any) -> Scene:
  """A Scene from what CapWorld stores: a JSON string (or bytes), a dict, or a Scene."""
  if isinstance(graph, Scene):
    return graph
  if isinstance(graph, (str, bytes)):
    graph = json.loads(graph)
  if not isinstance(graph, Mapping):
    raise TypeError(f"scene_graph must be JSON, a dict or a Scene, got {type(graph).__name__}")
  return scene_from_json(dict(graph))


@dataclasses.dataclass(frozen=True)
class _Example:
  scene: Scene
  facts: frozenset[Fact]
  units: frozenset[Fact]


class CapWorldJudge:
  """Exact precision, recall and linguistic scores of CapWorld captions (module docstring).

  Needs `sample.fields["scene_graph"]`; a sample without a readable one gets NaN for every
  component with cause "judge_error". References are parsed once per (scene, references)
  within a call, and a caption text once per call.
  """
  name = "capworld"

  def __init__(self, pointability: bool = True):
    # False: meta spans are no assertions (precision without pointability, an ablation).
    self.pointability = pointability

  def __repr__(self) -> str:
    return f"CapWorldJudge(pointability={self.pointability})"

  def judge(self, samples: Sequence[Sample]) -> list[Judgement]:
    examples: dict[tuple, _Example | str] = {}  # (scene graph, references) -> it, or an error
    readings: dict[str, Reading] = {}
    out = []
    for sample in samples:
      judgement = Judgement(id=sample.id)
      try:
        example = self._example(sample, examples)
        if isinstance(example, _Example):
          if sample.caption not in readings:
            readings[sample.caption] = read_caption(sample.caption)
          self._score(judgement, readings[sample.caption], example)
      except Exception as e:  # pylint: disable=broad-except
        example = f"{type(e).__name__}: {e}"
      if isinstance(example, str):
        # The protocol: a sample that cannot be scored is NaN with a cause, never a crash.
        for component in ("precision", "recall", "linguistic"):
          judgement.fail(component, "judge_error")
        judgement.details = {"error": example}
      out.append(judgement)
    return out

  def _example(self, sample: Sample, examples: dict) -> _Example | str:
    """The sample's scene, facts and reference units (or why not), once per call."""
    graph = sample.fields.get("scene_graph")
    graph_key = graph if isinstance(graph, (str, bytes)) else repr(graph)
    key = (graph_key, tuple(sample.references))
    if key not in examples:
      try:
        scene = _scene(graph)
        facts = frozenset(scene_facts(scene))
        examples[key] = _Example(scene, facts, reference_units(scene, sample.references, facts))
      except Exception as e:  # pylint: disable=broad-except
        examples[key] = f"scene_graph: {type(e).__name__}: {e}"
    return examples[key]

  def _score(self, judgement: Judgement, reading: Reading, example: _Example) -> None:
    parsed, scene, facts = reading.parsed, example.scene, example.facts
    claims = parsed.claims
    grounding = ground_entities(claims, len(parsed.entities), facts, len(scene.objects),
                                reading.introduced_in)
    grounded = [_grounded(c, grounding) for c in claims]
    verified = [fact_holds(f, facts) for f in grounded]
    distinct: dict[tuple, bool] = {}  # a claim said again is one assertion
    for claim, ok in zip(claims, verified):
      key = _said_as(claim, grounding)
      distinct[key] = distinct.get(key, False) or ok
    by_kind: dict[str, list[int]] = {}  # kind -> [distinct claims, verified]: what it reads
    for key, ok in distinct.items():
      counts = by_kind.setdefault(key[0], [0, 0])
      counts[0] += 1
      counts[1] += int(ok)
    spans = [s for s in parsed.spans if self.pointability or s.kind != "meta"]
    num_assertions = len(distinct) + len(spans)
    judgement.precision = sum(distinct.values()) / num_assertions if num_assertions else 0.0

    covered = example.units & _coverable([f for f, ok in zip(grounded, verified) if ok])
    if example.units:
      judgement.recall = len(covered) / len(example.units)
    else:
      judgement.fail("recall", "no_reference")

    scores, problems, incoherent = {}, [], []
    for rule, (score, found) in (("fluency", fluency(reading)),
                                 ("clarity", clarity(reading, grounding)),
                                 ("coherence", coherence(reading, grounding))):
      scores[rule] = score
      problems += [f"{rule}: {p}" for p in found]
      incoherent = found if rule == "coherence" else incoherent
    judgement.linguistic = (scores["fluency"] * scores["clarity"] * scores["coherence"]) ** (1 / 3)

    failed = [_describe(c, reading) for c, ok in zip(claims, verified) if not ok]
    failed += [f'{s.kind} "{s.text}"' for s in spans]
    missed = sorted(example.units - covered, key=_fact_order)
    units_by_kind: dict[str, list[int]] = {}  # kind -> [units, covered]: what it leaves out
    for unit in example.units:
      counts = units_by_kind.setdefault(unit.kind, [0, 0])
      counts[0] += 1
      counts[1] += int(unit in covered)
    judgement.details = {
        "assertions": num_assertions,
        "verified": sum(distinct.values()),
        "restated": len(claims) - len(distinct),
        "by_kind": by_kind,
        "units_by_kind": units_by_kind,
        "degenerate": degenerate(incoherent),
        "non_pointable": sum(s.kind == "meta" for s in parsed.spans),
        "unverifiable": sum(s.kind != "meta" for s in parsed.spans),
        "units": len(example.units),
        "covered": len(covered),
        **scores,
        "grounding": list(grounding),
        "failed": failed[:MAX_LISTED],
        "missed": [_readable(f, lambda i: _object_name(scene, i)) for f in missed[:MAX_LISTED]],
        "problems": problems[:MAX_LISTED],
    }
