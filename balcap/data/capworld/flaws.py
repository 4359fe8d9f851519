"""Deliberately flawed "SFT" captions: plausible text with the failure modes the method targets.

A warm-started captioner should arrive at RL with the habits BalCapRL fixes, so each SFT
caption is written in a flat style with one to three injected flaws (`FLAW_TYPES`): a missed
object, a wrong colour/shape/count/relation, meta commentary, repetition, or a length far
outside the reference's. The flaws a caption is labelled with are re-detected from its text
and claims against the scene (`detect_flaws`), so a label is never wrong and never missing.
Some captions (HEDGE_PROBABILITY) also hedge: they name no object's shape ("a red shape"),
which is true but covers no shape in recall, the choice an honest captioner that cannot tell
shapes apart would make. `terse_share` (CapWorldSpec.terse_share, default 0) makes that share
of the captions too_short on purpose: the terse habit of a captioner fine-tuned on short human
captions, which leaves out what it could see.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from balcap.data.capworld.claims import Caption
from balcap.data.capworld.grammar import Realiser, write_reference
from balcap.data.capworld.parse import parse_caption, split_sentences
from balcap.data.capworld.plan import (ObjectView, Step, choose_stated, identifying_extras,
                                       plan_reference, scene_view, true_relations)
from balcap.data.capworld.world import (COLOURS, CONVERSE_RELATION, SHAPES, Scene,
                                        fact_holds, scene_facts)

FLAW_TYPES = ("missed_object", "wrong_color", "wrong_shape", "wrong_count", "wrong_relation",
              "meta_commentary", "repetition", "too_short", "too_long")
# Which false claim each wrong_* flaw is.
FALSE_CLAIM_FLAWS = {"object": "wrong_shape", "colour": "wrong_color", "count": "wrong_count",
                     "relation": "wrong_relation"}
# Length flaws, in words relative to the reference (the linguistic reward's band edges).
TOO_SHORT_RATIO, TOO_LONG_RATIO = 0.5, 2.0
# Flaws that cannot share a caption with too_short: each adds the words it must not have.
_NOT_WITH_TOO_SHORT = ("too_long", "repetition", "meta_commentary", "wrong_relation",
                       "wrong_count")
NUM_FLAWS_PROBABILITIES = (0.45, 0.35, 0.2)  # of 1, 2, 3 injected flaws
# Share of SFT captions that name no shape ("a red shape", "the blue object"): a weak
# captioner's hedge, not a flaw (nothing false is said). It puts "say less, but say it true"
# in the SFT policy's distribution, where RL can find it: a small policy that cannot tell
# shapes apart earns more precision hedging than guessing (the judge counts "a shape" as a
# verified claim, and it covers no shape in recall).
HEDGE_PROBABILITY = 0.3

META_SENTENCES = (
    "The image shows a simple arrangement of geometric shapes.",
    "The composition feels balanced and calm.",
    "This picture evokes a playful, cheerful mood.",
    "Overall, the scene has a clean, minimalist style.",
    "The bright colours add a sense of depth and energy.",
    "We can see several shapes in this picture.",
    "The shapes seem to float in harmony.",
    "It is a visually pleasing and harmonious design.",
    "The arrangement creates a sense of order and balance.",
    "This minimalist artwork conveys a serene atmosphere.",
    "The scene feels lively and inviting.",
    "The image captures a whimsical, modern aesthetic.",
)


@dataclasses.dataclass(frozen=True)
class FlawedCaption(Caption):
  """A caption with its flaws; its claims include the false ones."""
  flaws: tuple[str, ...] = ()


def detect_flaws(caption: Caption, scene: Scene, reference_words: int) -> tuple[str, ...]:
  """Every flaw of FLAW_TYPES the caption has, from its claims, grounding and text."""
  true = set(scene_facts(scene))
  found = {FALSE_CLAIM_FLAWS[f.kind] for f in caption.facts
           if f.kind in FALSE_CLAIM_FLAWS and not fact_holds(f, true)}
  if set(range(len(scene.objects))) - set(caption.grounding):
    found.add("missed_object")
  if any(span.kind == "meta" for span in parse_caption(caption.text).spans):
    found.add("meta_commentary")
  sentences = [s.lower() for s in split_sentences(caption.text)]
  if len(set(sentences)) < len(sentences):
    found.add("repetition")
  if caption.num_words < TOO_SHORT_RATIO * reference_words:
    found.add("too_short")
  if caption.num_words > TOO_LONG_RATIO * reference_words:
    found.add("too_long")
  return tuple(f for f in FLAW_TYPES if f in found)


def _choose_flaws(scene: Scene, rng: np.random.Generator, reference_words: int,
                  terse: bool = False) -> list[str]:
  """1-3 flaws drawn from those the scene allows; too_short among them when `terse` (and a
  listing can be that short)."""
  available = [f for f in FLAW_TYPES if not (
      (f == "missed_object" and len(scene.objects) < 2)
      or (f == "wrong_relation" and not scene.relations)
      # a one-object listing ("A teal plus sign.") has at most 4 words
      or (f == "too_short" and 4 >= TOO_SHORT_RATIO * reference_words))]
  wanted = 1 + int(rng.choice(3, p=NUM_FLAWS_PROBABILITIES))
  chosen: list[str] = []
  while len(chosen) < wanted and available:
    if terse and "too_short" in available:
      flaw = available.pop(available.index("too_short"))
    else:
      flaw = available.pop(int(rng.integers(len(available))))
    chosen.append(flaw)
    if flaw == "too_short":
      available = [f for f in available if f not in _NOT_WITH_TOO_SHORT]
    elif flaw in _NOT_WITH_TOO_SHORT:
      available = [f for f in available if f != "too_short"]
  return chosen


def _misdescribe(view: list[ObjectView], rng: np.random.Generator, field: str,
                 candidates: list[int]) -> None:
  """Gives one object a wrong colour or shape, keeping every object describable."""
  values = list(COLOURS) if field == "colour" else list(SHAPES)
  for obj in [candidates[k] for k in rng.permutation(len(candidates))]:
    for value in [values[k] for k in rng.permutation(len(values))]:
      if value == getattr(view[obj], field):
        continue
      trial = list(view)
      trial[obj] = dataclasses.replace(view[obj], **{field: value})
      if _describable(trial):
        view[obj] = trial[obj]
        return


def _describable(view: list[ObjectView]) -> bool:
  """Whether every object of `view` can be told apart from the others in words."""
  try:
    for i in range(len(view)):
      identifying_extras(view, i)
  except ValueError:
    return False
  return True


def _hedged(view: list[ObjectView]) -> list[ObjectView]:
  """`view` with no shape named, if every object can still be told apart without one
  (by colour, size, region or label); else `view` unchanged."""
  hedged = [dataclasses.replace(v, shape=None) for v in view]
  return hedged if _describable(hedged) else view


def _wrong_count_step(scene: Scene, rng: np.random.Generator, steps: list[Step]) -> None:
  """Makes the overview's total false, or adds a false count of one shape."""
  summaries = [k for k, s in enumerate(steps) if s.kind == "summary" and s.total is not None]
  total = len(scene.objects)
  if summaries and rng.random() < 0.5:
    wrong = total + 1 if total == 1 or rng.random() < 0.5 else total - 1
    steps[summaries[0]] = dataclasses.replace(steps[summaries[0]], total=wrong)
    return
  shape = scene.objects[int(rng.integers(total))].shape
  true_count = sum(o.shape == shape for o in scene.objects)
  # Never "one circle": with "one" as the number, the sentence reads as an introduction.
  wrong = true_count - 1 if true_count > 2 and rng.random() < 0.5 else true_count + 1
  steps.insert(int(rng.integers(len(steps) + 1)), Step("count", total=wrong, shape=shape))


def _wrong_relation_step(scene: Scene, rng: np.random.Generator, include: list[int],
                         steps: list[Step]) -> None:
  """Adds a relation between two described objects, turned the wrong way round."""
  pairs = [(a, b) for a in include for b in include if a != b and true_relations(scene, a, b)]
  if not pairs:
    return
  a, b = pairs[int(rng.integers(len(pairs)))]
  wrong = CONVERSE_RELATION[true_relations(scene, a, b)[0]]
  last_intro = max(k for k, s in enumerate(steps) if set(s.objects) & {a, b})
  steps.insert(int(rng.integers(last_intro + 1, len(steps) + 1)),
               Step("relation", (a, b), relation=wrong))


def _too_short(view: list[ObjectView], rng: np.random.Generator, reference_words: int,
               include: list[int], first: list[int]) -> Caption:
  """The longest bare listing ("A red circle and a blue square.") of `include`, `first`
  first, under the length band."""
  order = first + [include[k] for k in rng.permutation(len(include)) if include[k] not in first]
  for count in range(len(order), 0, -1):
    realiser = Realiser(view, rng, plain=True)
    realiser.write(Step("listing", tuple(order[:count])))
    caption = realiser.caption()
    if caption.num_words < TOO_SHORT_RATIO * reference_words:
      return caption
  return caption


def _too_long(scene: Scene, view: list[ObjectView], rng: np.random.Generator,
              reference_words: int, include: list[int], steps: list[Step],
              repeat: bool) -> Caption:
  """A run-on, exhaustive caption padded with restated relations and details until it is
  over TOO_LONG_RATIO times the reference (by a random margin), repeating sentences when the
  padding runs out (or when `repeat`)."""
  stated = [choose_stated(view, o, rng, everything=True) for o in include]
  total = next((s.total for s in steps if s.kind == "summary" and s.total is not None),
               len(scene.objects))
  realiser = Realiser(view, rng, plain=True)
  realiser.write(Step("summary", total=total, background=scene.background))
  realiser.write(Step("run_on", tuple(include), tuple(stated)))
  required = [s for s in steps if s.kind in ("relation", "count", "meta")]
  if repeat:
    required.append(Step("repeat"))  # of a sentence drawn when it is written
  padding = [Step("relation", (a, b), relation=true_relations(scene, a, b)[0])
             for a in include for b in include if a != b and true_relations(scene, a, b)]
  padding += [Step("followup", (o,), (frozenset([d]),)) for o, parts in zip(include, stated)
              for d in sorted(parts)]
  padding = [padding[k] for k in rng.permutation(len(padding))]
  for step in required:  # the flaws asked for must be said: early, before padding may stop
    padding.insert(int(rng.integers(min(len(padding), 4) + 1)), step)
  stop_at = TOO_LONG_RATIO * reference_words * (1 + 0.25 * rng.random())
  for step in padding:
    if realiser.caption().num_words > stop_at and not any(s in required for s in padding):
      break
    if step in required:
      required.remove(step)
    if step.kind == "repeat":
      step = Step("repeat", repeat=int(rng.integers(1, len(realiser.sentences))))
    realiser.write(step)
  while realiser.caption().num_words <= TOO_LONG_RATIO * reference_words:
    realiser.write(Step("repeat", repeat=int(rng.integers(1, len(realiser.sentences)))))
  return realiser.caption()


def write_sft_caption(scene: Scene, rng: np.random.Generator,
                      reference_words: int | None = None,
                      terse_share: float = 0.0) -> FlawedCaption:
  """A plausible but flawed caption of the scene, with 1-3 injected flaws.

  reference_words: word count of the reference the length flaws are measured against (the
  example's first reference); by default a reference is written here to measure.
  terse_share: the probability that too_short is one of the flaws (where a listing can be that
  short); 0 draws nothing, so the captions are those of a writer without it.
  """
  if reference_words is None:
    reference_words = write_reference(scene, rng).num_words
  terse = terse_share > 0 and bool(rng.random() < terse_share)
  flaws = _choose_flaws(scene, rng, reference_words, terse)
  view = scene_view(scene)
  include = list(range(len(view)))
  if "missed_object" in flaws:
    droppable = include
    if "wrong_relation" in flaws:  # keep a related pair for the wrong relation to turn round
      droppable = [o for o in include if any(
          true_relations(scene, a, b) for a in include for b in include
          if o not in (a, b) and a != b)]
    if droppable:
      include.remove(droppable[int(rng.integers(len(droppable)))])
    else:
      flaws.remove("missed_object")
  if "wrong_shape" not in flaws and rng.random() < HEDGE_PROBABILITY:
    view = _hedged(view)
  misdescribed = [int(include[rng.integers(len(include))])]
  if "wrong_color" in flaws:
    _misdescribe(view, rng, "colour", misdescribed)
  if "wrong_shape" in flaws:
    _misdescribe(view, rng, "shape", misdescribed)

  if "too_short" in flaws:
    caption = _too_short(view, rng, reference_words, include, misdescribed)
  else:
    steps = plan_reference(scene, view, rng, plain=True, include=include)
    if "wrong_count" in flaws:
      _wrong_count_step(scene, rng, steps)
    if "wrong_relation" in flaws:
      _wrong_relation_step(scene, rng, include, steps)
    for _ in range("meta_commentary" in flaws and 1 + int(rng.integers(2))):
      where = (0, len(steps), int(rng.integers(len(steps) + 1)))[int(rng.integers(3))]
      steps.insert(where, Step("meta", text=META_SENTENCES[int(rng.integers(len(META_SENTENCES)))]))
    if "too_long" in flaws:
      caption = _too_long(scene, view, rng, reference_words, include, steps,
                          repeat="repetition" in flaws)
    else:
      if "repetition" in flaws:
        said = [k for k, s in enumerate(steps) if s.kind != "meta"]
        source = said[int(rng.integers(len(said)))]
        steps.insert(int(rng.integers(source + 1, len(steps) + 1)), Step("repeat",
                                                                         repeat=source))
      realiser = Realiser(view, rng, plain=True)
      for step in steps:
        realiser.write(step)
      caption = realiser.caption()

  found = detect_flaws(caption, scene, reference_words)
  if not set(flaws) <= set(found):
    raise AssertionError(f"injected {flaws} but the caption has {found}: {caption.text!r}")
  return FlawedCaption(caption.text, caption.claims, caption.grounding, found)
