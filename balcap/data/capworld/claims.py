"""What a caption claims: its entities, the claims about them, and their grounding in a scene.

A caption talks about *entities* (the things its noun phrases introduce), not about scene
objects, so its claims are `Fact`s whose subject/other are entity indices. `Discourse` is the
single implementation of how noun phrases become entities and claims; the caption writers and
the parser both drive it, which is what makes `parse_caption(write_reference(...).text)`
recover exactly the writer's claims. A writer also knows which object each entity is (its
grounding), so a `Caption` can state its claims as scene facts too.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from balcap.data.capworld.world import Fact, relation_fact

# Descriptors a noun phrase can give an entity, in the order their claims are recorded.
DESCRIPTORS = ("shape", "size", "colour", "label", "region")


@dataclasses.dataclass(frozen=True)
class Mention:
  """Everything a caption has said about one entity (None: not said)."""
  shape: str | None = None
  size: str | None = None
  colour: str | None = None
  label: str | None = None
  region: str | None = None


class Discourse:
  """Entities and claims of one caption, built up noun phrase by noun phrase.

  Rules (the parser and the writers rely on exactly these):
  - an indefinite noun phrase ("a red circle") introduces a new entity and claims its shape
    and every descriptor it carries;
  - a definite one ("the red circle") refers to the most recent entity whose known
    descriptors include all of its own, and claims nothing; when none matches it introduces
    a new entity, like an indefinite one;
  - predicates ("... is large", "... sits in the top left") claim one descriptor of an entity
    and make it known;
  - relations, counts and the background are claims of their own.
  """

  def __init__(self):
    self.entities: list[dict[str, str]] = []
    self.claims: list[Fact] = []

  def introduce(self, descriptors: Mapping[str, str | None]) -> int:
    entity = len(self.entities)
    self.entities.append({})
    shape = descriptors.get("shape")
    self.claims.append(Fact("object", entity, shape))
    if shape is not None:
      self.entities[entity]["shape"] = shape
    for kind in DESCRIPTORS[1:]:
      if descriptors.get(kind) is not None:
        self.attribute(entity, kind, descriptors[kind])
    return entity

  def resolve(self, descriptors: Mapping[str, str | None]) -> int | None:
    """The entity a definite description refers to, or None."""
    wanted = {k: v for k, v in descriptors.items() if v is not None}
    for entity in reversed(range(len(self.entities))):
      known = self.entities[entity]
      if all(known.get(k) == v for k, v in wanted.items()):
        return entity
    return None

  def refer(self, descriptors: Mapping[str, str | None]) -> tuple[int, bool]:
    """(entity, is_new) for a definite noun phrase."""
    entity = self.resolve(descriptors)
    if entity is not None:
      return entity, False
    return self.introduce(descriptors), True

  def attribute(self, entity: int, kind: str, value: str) -> None:
    self.claims.append(Fact(kind, entity, value))
    self.entities[entity][kind] = value

  def relation(self, figure: int, relation: str, landmark: int) -> None:
    self.claims.append(relation_fact(figure, relation, landmark))

  def count(self, number: int, shape: str | None = None, colour: str | None = None) -> None:
    self.claims.append(Fact("count", value=number, shape=shape, colour=colour))

  def background(self, colour: str) -> None:
    self.claims.append(Fact("background", value=colour))

  def mentions(self) -> tuple[Mention, ...]:
    return tuple(Mention(**entity) for entity in self.entities)


def ground(fact: Fact, grounding: tuple[int, ...]) -> Fact:
  """A claim about caption entities as a fact about scene objects."""
  if fact.subject is None:
    return fact
  other = None if fact.other is None else grounding[fact.other]
  return dataclasses.replace(fact, subject=grounding[fact.subject], other=other)


@dataclasses.dataclass(frozen=True)
class Caption:
  """A written caption and what it says.

  claims: the claims in the caption's own terms (entity indices), as `parse_caption` reads
  them back; grounding[e]: the scene object entity e is about.
  """
  text: str
  claims: tuple[Fact, ...]
  grounding: tuple[int, ...]

  @property
  def facts(self) -> tuple[Fact, ...]:
    """The claims as facts about scene objects, comparable with `scene_facts(scene)`."""
    return tuple(ground(c, self.grounding) for c in self.claims)

  @property
  def num_words(self) -> int:
    return len(self.text.split())
