"""Flawed SFT captions really have the flaws they are labelled with, and only those."""

import collections
import re

import numpy as np

from balcap.data.capworld import (FLAW_TYPES, parse_caption, sample_scene, scene_facts,
                                  write_reference, write_sft_caption)
from balcap.data.capworld.flaws import HEDGE_PROBABILITY, META_SENTENCES
from balcap.data.capworld.world import fact_holds

NUM_EXAMPLES = 250


def _examples():
  rng = np.random.default_rng(7)
  examples = []
  for _ in range(NUM_EXAMPLES):
    scene = sample_scene(rng, 224, 224)
    reference = write_reference(scene, rng)
    examples.append((scene, reference, write_sft_caption(scene, rng, reference.num_words)))
  return examples


EXAMPLES = _examples()
FALSE_KIND = {"wrong_color": "colour", "wrong_shape": "object", "wrong_count": "count",
              "wrong_relation": "relation"}


def test_every_flaw_type_occurs_and_the_mixture_varies():
  counts = collections.Counter(f for _, _, caption in EXAMPLES for f in caption.flaws)
  assert set(counts) == set(FLAW_TYPES), counts
  assert min(counts.values()) >= 0.05 * NUM_EXAMPLES, counts
  sizes = collections.Counter(len(caption.flaws) for _, _, caption in EXAMPLES)
  assert min(sizes) == 1 and sizes[1] < 0.8 * NUM_EXAMPLES and sizes[2] and sizes[3]
  assert len({caption.flaws for _, _, caption in EXAMPLES}) > 30


def test_wrong_claims_are_false_and_false_claims_are_labelled():
  for scene, _, caption in EXAMPLES:
    true = set(scene_facts(scene))
    false_kinds = {f.kind for f in caption.facts if not fact_holds(f, true)}
    for flaw, kind in FALSE_KIND.items():
      assert (flaw in caption.flaws) == (kind in false_kinds), (caption.text, caption.flaws)
    # Nothing else is ever false: sizes, regions, labels, background stay true.
    assert false_kinds <= set(FALSE_KIND.values())


def test_missed_object_means_an_object_is_never_mentioned():
  for scene, _, caption in EXAMPLES:
    unmentioned = set(range(len(scene.objects))) - set(caption.grounding)
    assert ("missed_object" in caption.flaws) == bool(unmentioned), caption.text


def test_meta_commentary_is_present_exactly_when_labelled():
  for _, _, caption in EXAMPLES:
    spans = parse_caption(caption.text).spans
    has_meta = any(m in caption.text for m in META_SENTENCES)
    assert ("meta_commentary" in caption.flaws) == has_meta == bool(spans), caption.text
    assert all(span.kind == "meta" for span in spans)


def test_repetition_repeats_a_sentence():
  for _, _, caption in EXAMPLES:
    sentences = [s.lower() for s in re.split(r"(?<=\.)\s+", caption.text)]
    repeated = len(set(sentences)) < len(sentences)
    assert ("repetition" in caption.flaws) == repeated, caption.text


def test_length_flaws_are_measured_against_the_first_reference():
  for _, reference, caption in EXAMPLES:
    ratio = len(caption.text.split()) / len(reference.text.split())
    assert ("too_short" in caption.flaws) == (ratio < 0.5), (ratio, caption.flaws)
    assert ("too_long" in caption.flaws) == (ratio > 2.0), (ratio, caption.flaws)
  # Padded, not absurd: just over the band as a rule (short references are hard to pad).
  too_long = [len(c.text.split()) / len(r.text.split()) for _, r, c in EXAMPLES
              if "too_long" in c.flaws]
  assert np.median(too_long) < 3.0 and max(too_long) < 8.0, sorted(too_long)


def test_some_captions_hedge_every_shape_and_say_nothing_false_by_it():
  hedged = [(scene, caption) for scene, _, caption in EXAMPLES
            if any(c.kind == "object" and c.value is None for c in caption.claims)]
  eligible = sum("wrong_shape" not in caption.flaws for _, _, caption in EXAMPLES)
  # HEDGE_PROBABILITY of the captions that may hedge, less the scenes that need shapes to
  # tell two objects apart.
  assert 0.5 * HEDGE_PROBABILITY < len(hedged) / eligible < 1.5 * HEDGE_PROBABILITY
  for scene, caption in hedged:
    assert "wrong_shape" not in caption.flaws, caption.text
    # All or nothing: a caption that names one shape and hedges another could not tell a
    # reader which of two same-coloured objects "the red shape" is.
    assert all(c.value is None for c in caption.claims if c.kind == "object"), caption.text
    true = set(scene_facts(scene))
    assert all(fact_holds(f, true) for f in caption.facts if f.kind == "object")
    words = set(re.findall(r"[a-z]+", caption.text.lower()))
    assert not words & {"circle", "square", "triangle", "star", "hexagon", "heart", "cross",
                        "diamond", "disc", "rhombus"} or any(
                            c.kind == "count" and c.shape for c in caption.claims), caption.text


def test_terse_share_makes_that_share_of_captions_too_short():
  """terse_share=0 is the default; terse_share=1 makes every caption that can be too short
  too short; a share in between adds that share to the captions too_short anyway."""
  shares = {0.0: 0, 0.5: 0, 1.0: 0}
  possible = 0
  for seed in range(300):
    scene = sample_scene(np.random.default_rng([seed, 0]), 224, 224, 1, 1)
    words = write_reference(scene, np.random.default_rng([seed, 1])).num_words
    sft_rng = lambda: np.random.default_rng([seed, 2])  # noqa: E731
    plain = write_sft_caption(scene, sft_rng(), words)
    assert write_sft_caption(scene, sft_rng(), words, terse_share=0.0) == plain
    possible += 4 < 0.5 * words  # a one-object listing has up to 4 words
    for share in shares:
      caption = write_sft_caption(scene, sft_rng(), words, terse_share=share)
      shares[share] += "too_short" in caption.flaws
      if "too_short" in caption.flaws:
        assert caption.num_words < 0.5 * words, caption.text
  assert possible > 250 and shares[1.0] == possible, (possible, shares)
  natural = shares[0.0] / possible
  assert 0.1 < natural < 0.35, shares
  # 0.5 + 0.5 * natural of the captions that can be too short, within ~3 standard errors
  assert abs(shares[0.5] / possible - (0.5 + 0.5 * natural)) < 0.1, shares
