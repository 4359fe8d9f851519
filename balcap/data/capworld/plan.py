"""Decides what a caption says, and in what order, before any word is chosen.

A plan is a list of `Step`s, one per sentence: an overview, introductions of objects (alone,
in pairs, relative to a known object, or aggregated by shape), later details, relations and a
closing background. `plan_reference` draws a different plan on every call: object order,
which secondary descriptors to state or leave out, and how sentences are grouped, so two
references of one image differ in more than their words. `grammar.py` writes the words.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from balcap.data.capworld.world import Scene

SECONDARY = ("size", "label", "region")  # descriptors a caption may leave out


@dataclasses.dataclass(frozen=True)
class ObjectView:
  """One object as a caption presents it (a flawed caption may present it wrongly, or
  hedge: shape None names no shape, "a red shape", which is true of any object)."""
  shape: str | None
  colour: str
  size: str
  region: str
  label: str | None


def scene_view(scene: Scene) -> list[ObjectView]:
  """The scene's objects as they truly are."""
  return [ObjectView(o.shape, o.colour, o.size, o.region, o.label) for o in scene.objects]


def identifying_extras(view: Sequence[ObjectView], index: int) -> tuple[str, ...]:
  """The fewest descriptors beyond shape and colour that single out object `index`, so every
  referring expression is unambiguous ("the large red circle" when there are two)."""
  me = view[index]
  for extras in ((), ("size",), ("region",), ("label",), ("size", "region"),
                 ("size", "label"), ("size", "region", "label")):
    if "label" in extras and me.label is None:
      continue
    keys = ("shape", "colour", *extras)
    if all(any(getattr(o, k) != getattr(me, k) for k in keys)
           for j, o in enumerate(view) if j != index):
      return extras
  raise ValueError(f"object {index} cannot be told apart from another: {me}")


@dataclasses.dataclass(frozen=True)
class Step:
  """One sentence of a plan. Which fields a kind uses:
    summary         total and/or background ("Three shapes sit on a cream background.")
    background      background ("The backdrop is white.")
    intro           objects=(o,), stated=({...},); background set: "Against a ... background, ..."
    compound        two intros in one sentence: objects=(o1, o2), stated per object
    relation_intro  introduce objects[0], which is `relation` of the known objects[1]
    relation        objects[0] is `relation` of objects[1], both known
    group           objects of one shape, aggregated: "Two circles: a red one ... and ..."
    count           total objects of `shape` (and `colour`): "There are three circles."
    followup        objects=(o,), stated=({descriptor},): "The red circle is large."
    run_on          many intros chained with ", and" (a padded, list-like caption)
    listing         bare noun phrases: "A red circle and a blue square."
    meta            text, verbatim (flawed captions only)
    repeat          say sentence number `repeat` (one per step) again, word for word
  """
  kind: str
  objects: tuple[int, ...] = ()
  stated: tuple[frozenset[str], ...] = ()
  relation: str | None = None
  total: int | None = None
  background: str | None = None
  shape: str | None = None
  colour: str | None = None
  text: str | None = None
  repeat: int | None = None


# How often a reference states a secondary descriptor that does not identify the object.
STATE_PROBABILITY = {"size": 0.7, "region": 0.8, "label": 0.85}


def _chance(rng: np.random.Generator, p: float) -> bool:
  return bool(rng.random() < p)


def true_relations(scene: Scene, figure: int, landmark: int) -> list[str]:
  """The relations a caption may state as "figure is <relation> landmark", most salient
  first (the one along the axis the two objects are further apart on)."""
  found = []
  for i, relation, j in scene.relations:
    if (i, j) == (figure, landmark):
      found.append(relation)
    elif (i, j) == (landmark, figure):
      found.append({"left of": "right of", "above": "below"}[relation])
  a, b = scene.objects[figure], scene.objects[landmark]
  horizontal = abs(a.cx - b.cx) / scene.width >= abs(a.cy - b.cy) / scene.height
  return sorted(found, key=lambda r: (r in ("left of", "right of")) != horizontal)


def _object_order(scene: Scene, include: Sequence[int], rng: np.random.Generator) -> list[int]:
  """Objects in one of several natural orders: as they come, reading order, biggest first,
  left to right."""
  order = [include[k] for k in rng.permutation(len(include))]
  strategy = int(rng.integers(4))
  objects = scene.objects
  if strategy == 1:
    order.sort(key=lambda o: (objects[o].cy * 3 // scene.height, objects[o].cx))
  elif strategy == 2:
    order.sort(key=lambda o: -objects[o].extent)
  elif strategy == 3:
    order.sort(key=lambda o: objects[o].cx)
  return order


def choose_stated(view: Sequence[ObjectView], obj: int, rng: np.random.Generator,
                  everything: bool = False) -> frozenset[str]:
  """The secondary descriptors to state about `obj`: its identifying ones always, the others
  at random (all of them when `everything`)."""
  stated = set(identifying_extras(view, obj))
  for descriptor in SECONDARY:
    if descriptor == "label" and view[obj].label is None:
      continue
    if everything or _chance(rng, STATE_PROBABILITY[descriptor]):
      stated.add(descriptor)
  return frozenset(stated)


def _groups(scene: Scene, view: Sequence[ObjectView], include: Sequence[int],
            rng: np.random.Generator) -> dict[int, tuple[int, ...]]:
  """Shapes to describe together ("Two circles: ..."): object -> its group. Only whole
  groups: the sentence claims how many of that shape there are."""
  groups = {}
  # Sorted: iterating a set of strings follows PYTHONHASHSEED, and the world must not.
  for shape in sorted({view[o].shape for o in include}):
    members = tuple(o for o in include if view[o].shape == shape)
    everyone = [i for i, o in enumerate(scene.objects) if o.shape == shape]
    if 2 <= len(members) <= 3 and len(everyone) == len(members) and _chance(rng, 0.45):
      groups.update({o: members for o in members})
  return groups


def plan_reference(scene: Scene, view: Sequence[ObjectView], rng: np.random.Generator,
                   plain: bool = False, include: Sequence[int] | None = None) -> list[Step]:
  """A random plan describing every object in `include` (default: all).

  plain: the flat style of a weak captioner (no aggregation, relative introductions or
  follow-up details). Counts and the background are the scene's own.
  """
  include = list(range(len(view))) if include is None else list(include)
  order = _object_order(scene, include, rng)
  stated = {o: choose_stated(view, o, rng) for o in include}
  later: list[tuple[int, str]] = []  # (object, descriptor) told in a follow-up sentence
  if not plain:
    for o in include:
      for descriptor in sorted(stated[o] - set(identifying_extras(view, o))):
        if _chance(rng, 0.15):
          stated[o] -= {descriptor}
          later.append((o, descriptor))
  total, background = len(scene.objects), scene.background

  opening = ["total+background", "total", "background", None][
      int(rng.choice(4, p=[0.4, 0.15, 0.1, 0.35] if not plain else [0.6, 0.1, 0.0, 0.3]))]
  steps: list[Step] = []
  if opening is not None:
    steps.append(Step("summary", total=total if "total" in opening else None,
                      background=background if "background" in opening else None))
  background_at = None  # where the background goes when the opening does not say it
  if opening is None or "background" not in opening:
    background_at = ["prefix", "closing", None][int(rng.choice(3, p=[0.35, 0.4, 0.25]))]

  groups = {} if plain else _groups(scene, view, include, rng)
  counted = None
  if not plain and _chance(rng, 0.15):
    shapes = [s for s in sorted({view[o].shape for o in include}) if s not in
              {view[o].shape for o in groups}
              and sum(o.shape == s for o in scene.objects) >= 2]
    counted = shapes[int(rng.integers(len(shapes)))] if shapes else None

  introduced: list[int] = []
  object_steps: list[Step] = []
  for o in order:
    if o in introduced:
      continue
    if counted is not None and view[o].shape == counted:
      object_steps.append(Step("count", total=sum(x.shape == counted for x in scene.objects),
                               shape=counted))
      counted = None
    if o in groups:
      members = groups[o]
      object_steps.append(Step("group", members, tuple(stated[m] for m in members)))
      introduced += members
      continue
    anchors = [(true_relations(scene, o, k)[0], k) for k in introduced
               if true_relations(scene, o, k)]
    if anchors and _chance(rng, 0.15 if plain else 0.35):
      relation, landmark = anchors[int(rng.integers(len(anchors)))]
      object_steps.append(Step("relation_intro", (o, landmark), (stated[o],), relation))
    else:
      object_steps.append(Step("intro", (o,), (stated[o],)))
    introduced.append(o)

  # Pair up neighbouring introductions into compound sentences now and then.
  merged: list[Step] = []
  for step in object_steps:
    if (merged and step.kind == "intro" and merged[-1].kind == "intro"
        and _chance(rng, 0.15 if plain else 0.3)):
      previous = merged.pop()
      step = Step("compound", previous.objects + step.objects, previous.stated + step.stated)
    merged.append(step)
  if background_at == "prefix" and merged[0].kind == "intro":
    merged[0] = dataclasses.replace(merged[0], background=background)
  elif background_at is not None:
    background_at = "closing"
  steps += merged

  # Details told later and relations between known objects, each after its objects' intros.
  def position_after(objects: Sequence[int]) -> int:
    first_free = 1 + max(k for k, s in enumerate(steps) if set(s.objects) & set(objects))
    return int(rng.integers(first_free, len(steps) + 1))

  for o, descriptor in later:
    steps.insert(position_after([o]), Step("followup", (o,), (frozenset([descriptor]),)))
  related = {frozenset(s.objects) for s in steps if s.kind == "relation_intro"}
  pairs = [(a, b) for a in include for b in include
           if a < b and true_relations(scene, a, b) and {a, b} not in related]
  num_relations = int(rng.choice(3, p=[0.5, 0.35, 0.15] if not plain else [0.7, 0.3, 0.0]))
  for k in rng.permutation(len(pairs))[:num_relations]:
    a, b = pairs[k]
    if _chance(rng, 0.5):
      a, b = b, a
    steps.insert(position_after([a, b]), Step("relation", (a, b),
                                              relation=true_relations(scene, a, b)[0]))
  if background_at == "closing":
    steps.append(Step("background", background=background))
  return steps
