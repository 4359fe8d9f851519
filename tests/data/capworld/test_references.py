"""Reference captions are true, complete, unambiguous, free of meta talk, and varied."""

import collections
import re

import numpy as np

from balcap.data.capworld import lexicon, parse_caption, sample_scene, scene_facts, write_reference
from balcap.data.capworld.flaws import META_SENTENCES

NUM_SCENES = 150


def _scenes_with_references(count=NUM_SCENES, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(count):
    scene = sample_scene(rng, 224, 224)
    yield scene, [write_reference(scene, rng) for _ in range(2)]


CASES = list(_scenes_with_references())


def test_every_fact_a_reference_states_is_true():
  for scene, references in CASES:
    true = set(scene_facts(scene))
    for reference in references:
      false = [f for f in reference.facts if f not in true]
      assert not false, (reference.text, false)


def test_reference_mentions_every_object_with_shape_and_colour():
  for scene, references in CASES:
    for reference in references:
      facts = set(reference.facts)
      for i, obj in enumerate(scene.objects):
        assert ("object", i, obj.shape) in {(f.kind, f.subject, f.value) for f in facts}, (
            reference.text, obj)
        assert ("colour", i, obj.colour) in {(f.kind, f.subject, f.value) for f in facts}


def test_references_of_one_image_differ():
  for _, (first, second) in CASES:
    assert first.text != second.text


def test_references_have_no_meta_or_unreadable_phrases():
  meta_words = set(lexicon.META_WORDS)
  for _, references in CASES:
    for reference in references:
      words = set(re.findall(r"[a-z]+", reference.text.lower()))
      assert not words & meta_words, reference.text
      assert not parse_caption(reference.text).spans, reference.text
      assert not any(m.lower() in reference.text.lower() for m in META_SENTENCES)


def test_each_introduction_singles_out_one_object():
  """Read back with the parser, every entity's first description fits exactly one object."""
  for scene, references in CASES:
    for reference in references:
      parsed = parse_caption(reference.text)
      introduced = {}
      for sentence in parsed.sentences:
        said = collections.defaultdict(dict)
        for claim in sentence.claims:
          if claim.subject is not None and claim.kind != "relation":
            said[claim.subject]["shape" if claim.kind == "object" else claim.kind] = claim.value
        for entity, descriptors in said.items():
          introduced.setdefault(entity, descriptors)
      for entity, descriptors in introduced.items():
        matches = [o for o in scene.objects
                   if all(getattr(o, k) == v for k, v in descriptors.items())]
        assert len(matches) == 1, (reference.text, descriptors)


def _sentence_shape(sentence):
  """The sentence as word classes: "A big red circle sits in ..." -> det size colour shape ..."""
  table = lexicon.phrase_table()
  classes = []
  for word in re.findall(r'"[^"]*"|[a-z]+', sentence.lower()):
    category = "label" if word.startswith('"') else table.get((word,), (word, None))[0]
    if not classes or classes[-1] != category:
      classes.append(category)
  return tuple(classes)


def test_references_are_varied_not_templated():
  sentences = [s for _, references in CASES[:100] for r in references
               for s in re.split(r"(?<=\.)\s+", r.text)]
  openings = {tuple(s.lower().split()[:3]) for s in sentences}
  shapes = {_sentence_shape(s) for s in sentences}
  first_sentences = {_sentence_shape(r.text.split(". ")[0]) for _, refs in CASES for r in refs}
  assert len(sentences) > 600
  assert len(openings) > 150, len(openings)
  assert len(shapes) > 300, len(shapes)
  assert len(first_sentences) > 60, len(first_sentences)
