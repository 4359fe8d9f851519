"""Turns a plan of what to say about a scene into natural, varied English sentences.

A plan (`plan.py`) is a list of `Step`s: "open with the count and background", "introduce
object 2 stating its size and region", "say object 0 is above object 3", ... The `Realiser`
writes each step with a frame and words chosen at random from `lexicon.py` (existential,
subject-first, locative-first, relative clauses, relations, aggregation, compounds), and
drives a `Discourse` in textual order, so the caption's claims are recorded exactly as the
parser will read them back. Writers describe a `view` of the scene: its true attributes for
references, deliberately wrong ones for flawed captions.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from balcap.data.capworld import lexicon as lx
from balcap.data.capworld.claims import Caption, Discourse
from balcap.data.capworld.plan import (ObjectView, Step, identifying_extras, plan_reference,
                                       scene_view)
from balcap.data.capworld.world import Scene


def article(word: str) -> str:
  return "an" if word[:1].lower() in "aeiou" else "a"


def capitalise(sentence: str) -> str:
  return sentence[:1].upper() + sentence[1:]


class Realiser:
  """Writes the steps of a plan and records their claims; one instance per caption."""

  def __init__(self, view: Sequence[ObjectView], rng: np.random.Generator, plain: bool = False):
    self.view = list(view)
    self.rng = rng
    self.plain = plain  # the flat style of a weak captioner: fewer frames, no ornament
    self.discourse = Discourse()
    self.grounding: list[int] = []
    self.current: dict[int, int] = {}  # object -> the entity that last spoke of it
    self.sentences: list[tuple[str, list[tuple[Any, ...]]]] = []  # (text, ops)
    self._ops: list[tuple[Any, ...]] = []

  # --- Claims, in textual order; each is recorded so a repeated sentence can replay it. ---

  def _new(self, obj: int, descriptors: dict[str, str | None]) -> None:
    self._ops.append(("new", obj, descriptors))
    self.current[obj] = self.discourse.introduce(descriptors)
    self.grounding.append(obj)

  def _ref(self, obj: int, descriptors: dict[str, str | None]) -> None:
    self._ops.append(("ref", obj, descriptors))
    entity, is_new = self.discourse.refer(descriptors)
    if is_new:
      self.grounding.append(obj)
    self.current[obj] = entity

  def _attr(self, obj: int, kind: str, value: str) -> None:
    self._ops.append(("attr", obj, kind, value))
    self.discourse.attribute(self.current[obj], kind, value)

  def _rel(self, figure: int, relation: str, landmark: int) -> None:
    self._ops.append(("rel", figure, relation, landmark))
    self.discourse.relation(self.current[figure], relation, self.current[landmark])

  def _count(self, number: int, shape: str | None = None, colour: str | None = None) -> None:
    self._ops.append(("count", number, shape, colour))
    self.discourse.count(number, shape, colour)

  def _background(self, colour: str) -> None:
    self._ops.append(("background", colour))
    self.discourse.background(colour)

  def _replay(self, ops: list[tuple[Any, ...]]) -> None:
    """Says the claims of `ops` again (a repeated sentence introduces its objects anew)."""
    for name, *arguments in ops:
      getattr(self, "_" + name)(*arguments)

  # --- Words. ---

  def pick(self, options: Sequence[Any]) -> Any:
    return options[int(self.rng.integers(len(options)))]

  def chance(self, p: float) -> bool:
    return bool(self.rng.random() < p)

  def _label(self, word: str, predicate: bool = False) -> str:
    template = self.pick(lx.LABEL_PREDICATES if predicate else lx.LABEL_PHRASES)
    return template.format(word=word, kind="letter" if len(word) == 1 else "word")

  def _region(self, region: str) -> str:
    return self.pick(lx.REGION_PHRASES[region])

  def _descriptors(self, obj: int, parts: frozenset[str] | set[str]) -> dict[str, str | None]:
    v = self.view[obj]
    return {"shape": v.shape, "colour": v.colour, **{k: getattr(v, k) for k in parts}}

  def _nominal(self, obj: int, parts: frozenset[str] | set[str]) -> str:
    """[size] colour shape [label] [region], without a determiner."""
    v = self.view[obj]
    words = [self.pick(lx.SIZE_WORDS[v.size])] if "size" in parts else []
    # No shape: the writer does not commit to one ("a red shape", `ObjectView`).
    noun = lx.TOTAL_NOUNS_SINGULAR if v.shape is None else lx.SHAPE_NOUNS[v.shape]
    words += [self.pick(lx.COLOUR_WORDS[v.colour]), self.pick(noun)]
    text = " ".join(words)
    if "label" in parts:
      text += " " + self._label(v.label)
    if "region" in parts:
      text += " " + self._region(v.region)
    return text

  def indefinite(self, obj: int, parts: frozenset[str] | set[str]) -> str:
    """A noun phrase introducing `obj`: 'a big red circle labelled "GO"'. Records the claims."""
    text = self._nominal(obj, parts)
    self._new(obj, self._descriptors(obj, parts))
    return f"{article(text)} {text}"

  def definite(self, obj: int) -> str:
    """The shortest unambiguous description of a known object: "the red circle"."""
    parts = set(identifying_extras(self.view, obj))
    text = self._nominal(obj, parts)
    self._ref(obj, self._descriptors(obj, parts))
    return f"the {text}"

  def _verb(self, fronted: bool = False) -> str:
    if self.plain:
      return self.pick(("sits", "rests", "is"))
    # "In the corner can be found a circle" reads badly: inverted order takes a plain verb.
    return self.pick(("sits", "rests", "lies", "is") if fronted else lx.SINGULAR_VERBS)

  # --- Frames. Each returns a sentence or clause without the final full stop. ---

  def intro_clause(self, obj: int, stated: frozenset[str], fronted: bool = True) -> str:
    """A clause introducing one object, its identifying descriptors always among `stated`.

    fronted: whether the clause may open with its region ("In the top left sits ...")."""
    v = self.view[obj]
    frames = ["existential"]
    if "region" in stated:
      frames += ["subject"] * 2
      if not self.plain:
        frames += ["occupies"] + ["fronted"] * 2 * fronted
        frames += ["relative_size", "relative_tail"] * ("size" in stated)
        frames += ["relative_label"] * ("label" in stated)
    else:
      frames += ["present"]
    frame = self.pick(frames)
    # Whatever the frame, the object is introduced with everything stated in the clause (the
    # parser merges predicates and fronted regions into the introduction the same way).
    in_noun = {"existential": stated, "present": stated, "relative_tail": stated - {"size"},
               "relative_size": stated - {"size", "region"},
               "relative_label": stated - {"label", "region"}}.get(frame, stated - {"region"})
    text = self._nominal(obj, in_noun)
    noun = f"{article(text)} {text}"
    self._new(obj, self._descriptors(obj, stated))
    size, region = self.pick(lx.SIZE_WORDS[v.size]), self._region(v.region)
    if frame == "existential":
      also = self.pick(("", "also ")) if len(self.grounding) > 1 else ""  # after another object
      return f"there is {also}{noun}"
    if frame == "present":
      also = ("also present", "present") if len(self.grounding) > 1 else ("present",)
      return f"{noun} is {self.pick(also)}"
    if frame == "subject":
      return f"{noun} {self._verb()} {region}"
    if frame == "fronted":
      return f"{region}{self.pick((', there is', ' ' + self._verb(fronted=True)))} {noun}"
    if frame == "occupies":
      return f"{noun} occupies {self.pick(lx.REGION_NOUN_PHRASES[v.region])}"
    if frame == "relative_size":
      return f"{noun}, which is {size}, {self._verb()} {region}"
    if frame == "relative_tail":
      return f"there is {noun}, which is {size}"
    if frame == "relative_label":
      return (f"{noun}, which {self._label(v.label, predicate=True)}, {self._verb()} "
              f"{region}")
    raise AssertionError(frame)

  def relation_intro(self, obj: int, stated: frozenset[str], relation: str,
                     landmark: int) -> str:
    """Introduces `obj` by where it is relative to the known `landmark`."""
    frame = self.pick(("subject", "existential") if self.plain else
                      ("fronted", "fronted", "subject", "existential"))
    if frame == "fronted":
      phrase = self.pick(lx.FRONTED_RELATION_PHRASES[relation])
      anchor = self.definite(landmark)
      joint = self.pick((", there is", " " + self._verb(fronted=True)))
      noun = self.indefinite(obj, stated)
      self._rel(obj, relation, landmark)
      return f"{phrase} {anchor}{joint} {noun}"
    noun = self.indefinite(obj, stated)
    lead = f"there is {noun}" if frame == "existential" else f"{noun} {self._verb()}"
    if frame == "existential" and stated & {"label", "region"}:
      lead += ","  # "a square in the top right, to the right of ..." not "right right of"
    phrase = self.pick(lx.RELATION_PHRASES[relation])
    anchor = self.definite(landmark)
    self._rel(obj, relation, landmark)
    return f"{lead} {phrase} {anchor}"

  def relation_sentence(self, figure: int, relation: str, landmark: int) -> str:
    """Relates two known objects: "The red circle is above the blue square"."""
    if not self.plain and relation in lx.FRONTED_RELATION_PHRASES and self.chance(0.3):
      phrase = self.pick(lx.FRONTED_RELATION_PHRASES[relation])
      anchor = self.definite(landmark)
      subject = self.definite(figure)
      self._rel(figure, relation, landmark)
      return f"{phrase} {anchor} is {subject}"
    subject = self.definite(figure)
    verb = self.pick(("is", "sits", "lies"))
    phrase = self.pick(lx.RELATION_PHRASES[relation])
    anchor = self.definite(landmark)
    self._rel(figure, relation, landmark)
    return f"{subject} {verb} {phrase} {anchor}"

  def group_sentence(self, objects: Sequence[int], stated: Sequence[frozenset[str]]) -> str:
    """Several objects of one shape at once: "Two circles appear, one red and one blue"."""
    shape = self.view[objects[0]].shape
    colours = {self.view[o].colour for o in objects}
    shared = colours.pop() if len(colours) == 1 else None
    plural = self.pick(lx.SHAPE_PLURALS[shape])
    if shared is not None:
      plural = f"{self.pick(lx.COLOUR_WORDS[shared])} {plural}"
    number = lx.NUMBER_WORDS[len(objects)]
    self._count(len(objects), shape, shared)
    style = self.pick(("colon", "appear", "one"))
    members = []
    for obj, parts in zip(objects, stated):
      v = self.view[obj]
      descriptors = self._descriptors(obj, parts)
      adjectives = ([self.pick(lx.SIZE_WORDS[v.size])] if "size" in parts else []) + (
          [] if shared else [self.pick(lx.COLOUR_WORDS[v.colour])])
      tail = "".join(" " + p for p in (
          self._label(v.label) if "label" in parts else "",
          self._region(v.region) if "region" in parts else "") if p)
      if not adjectives or (style == "one" and "size" not in parts):
        members.append(" ".join(["one", *adjectives]) + tail)
      else:
        words = " ".join([*adjectives, "one"])
        members.append(f"{article(words)} {words}{tail}")
      self._new(obj, descriptors)
    listed = (" and ".join(members) if len(members) == 2
              else ", ".join(members[:-1]) + self.pick((" and ", ", and ")) + members[-1])
    if style == "colon":
      return f"there are {number} {plural}: {listed}"
    verb = self.pick(("appear", "are present", "can be found"))
    return f"{number} {plural} {verb}, {listed}"

  def summary_sentence(self, total: int | None, background: str | None) -> str:
    """The opening overview: how many objects, on what background."""
    if total is not None:
      self._count(total)
    if background is not None:
      self._background(background)
    nouns = lx.TOTAL_NOUNS if total != 1 else lx.TOTAL_NOUNS_SINGULAR
    things = (f"{lx.NUMBER_WORDS.get(total, str(total))} {self.pick(nouns)}" if total != 1
              else f"a single {self.pick(nouns)}")
    bg = None
    if background is not None:
      bg = f"{self.pick(lx.COLOUR_WORDS[background])} {self.pick(lx.BACKGROUND_NOUNS)}"
      bg = f"{article(bg)} {bg}"
    plural = total != 1
    if background is None:
      return self.pick((f"there {'are' if plural else 'is'} {things}",
                        f"{things} {'appear' if plural else 'appears'}",
                        f"in total there {'are' if plural else 'is'} {things}"))
    if total is None:
      return self.pick((f"the {self.pick(lx.BACKGROUND_NOUNS)} is "
                        f"{self.pick(lx.COLOUR_WORDS[background])}",
                        f"everything rests on {bg}"))
    if self.plain:
      return f"there {'are' if plural else 'is'} {things} on {bg}"
    be = "are" if plural else "is"
    rest = self.pick(("are scattered across", "sit on", "are arranged on", "rest on") if plural
                     else ("sits on", "rests on"))
    return self.pick((
        f"{things} {rest} {bg}",
        f"on {bg}, there {be} {things}",
        f"against {bg} {'sit' if plural else 'sits'} {things}",
        f"there {be} {things} on {bg}",
        f"{bg} holds {things}"))

  def count_sentence(self, number: int, shape: str, colour: str | None) -> str:
    self._count(number, shape, colour)
    plural = self.pick(lx.SHAPE_PLURALS[shape])
    if colour is not None:
      plural = f"{self.pick(lx.COLOUR_WORDS[colour])} {plural}"
    return f"there {'are' if number != 1 else 'is'} {lx.NUMBER_WORDS[number]} {plural}"

  def followup(self, obj: int, descriptor: str) -> str:
    """A later sentence adding one descriptor to a known object."""
    v = self.view[obj]
    subject = self.definite(obj)
    self._attr(obj, descriptor, getattr(v, descriptor))
    if descriptor == "size":
      return f"{subject} is {self.pick(lx.SIZE_WORDS[v.size])}"
    if descriptor == "label":
      return f"{subject} {self._label(v.label, predicate=True)}"
    return f"{subject} {self._verb()} {self._region(v.region)}"

  # --- Whole captions. ---

  def write(self, step: Step) -> None:
    """Writes one step as one sentence."""
    if step.kind == "repeat":
      text, ops = self.sentences[step.repeat]
      self._replay(ops)
      self.sentences.append((text, list(ops)))
      self._ops = []
      return
    if step.kind == "meta":
      sentence = step.text
    elif step.kind == "summary":
      sentence = self.summary_sentence(step.total, step.background)
    elif step.kind == "background":
      sentence = self.summary_sentence(None, step.background)
    elif step.kind == "intro":
      prefix = ""
      if step.background is not None:
        bg = self.pick(lx.COLOUR_WORDS[step.background])
        prefix = (f"{self.pick(('against', 'on'))} {article(bg)} {bg} "
                  f"{self.pick(lx.BACKGROUND_NOUNS)}, ")
        self._background(step.background)
      sentence = prefix + self.intro_clause(step.objects[0], step.stated[0], fronted=not prefix)
    elif step.kind == "compound":
      first = self.intro_clause(step.objects[0], step.stated[0])
      joint = self.pick((", and ", "; ", ", while "))
      sentence = first + joint + self.intro_clause(step.objects[1], step.stated[1])
    elif step.kind == "relation_intro":
      sentence = self.relation_intro(step.objects[0], step.stated[0], step.relation,
                                     step.objects[1])
    elif step.kind == "relation":
      sentence = self.relation_sentence(step.objects[0], step.relation, step.objects[1])
    elif step.kind == "group":
      sentence = self.group_sentence(step.objects, step.stated)
    elif step.kind == "count":
      sentence = self.count_sentence(step.total, step.shape, step.colour)
    elif step.kind == "followup":
      sentence = self.followup(step.objects[0], next(iter(step.stated[0])))
    elif step.kind == "run_on":
      sentence = ", and ".join(self.intro_clause(o, s, fronted=False)
                               for o, s in zip(step.objects, step.stated))
    elif step.kind == "listing":
      nouns = [self.indefinite(o, frozenset()) for o in step.objects]
      sentence = nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " and " + nouns[-1]
    else:
      raise ValueError(f"unknown step kind {step.kind!r}")
    if step.kind != "meta":
      sentence = capitalise(sentence) + "."
    self.sentences.append((sentence, self._ops))
    self._ops = []

  def caption(self) -> Caption:
    return Caption(" ".join(text for text, _ in self.sentences), tuple(self.discourse.claims),
                   tuple(self.grounding))


def realise(view: Sequence[ObjectView], steps: Sequence[Step], rng: np.random.Generator,
            plain: bool = False) -> Caption:
  """The caption a plan describes, with its claims and their grounding."""
  realiser = Realiser(view, rng, plain)
  for step in steps:
    realiser.write(step)
  return realiser.caption()


def write_reference(scene: Scene, rng: np.random.Generator) -> Caption:
  """A fluent, true, complete caption of the scene: every object with its shape and colour,
  unambiguous references, some secondary details left out at random; no meta commentary."""
  view = scene_view(scene)
  return realise(view, plan_reference(scene, view, rng), rng)
