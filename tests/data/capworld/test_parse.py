"""The parser reads back exactly what the writers claim, and keeps what it cannot read."""

import collections
import time

import numpy as np

from balcap.data.capworld import (Fact, parse_caption, sample_scene, write_reference,
                                  write_sft_caption)


def test_parse_recovers_exactly_the_claims_of_every_written_caption():
  rng = np.random.default_rng(11)
  start, captions = time.perf_counter(), 0
  for _ in range(300):
    scene = sample_scene(rng, 224, 224)
    reference = write_reference(scene, rng)
    for caption in (reference, write_sft_caption(scene, rng, reference.num_words)):
      parsed = parse_caption(caption.text)
      assert collections.Counter(parsed.claims) == collections.Counter(caption.claims), (
          caption.text)
      assert len(parsed.entities) == len(caption.grounding)
      captions += 1
  assert (time.perf_counter() - start) / captions < 0.02  # tens of ms at most, per caption


def _claims(text):
  return set(parse_caption(text).claims)


def test_noun_phrase_with_synonyms_region_and_label():
  assert _claims('There is a big red disc labelled "GO" in the upper-left corner.') == {
      Fact("object", 0, "circle"), Fact("size", 0, "large"), Fact("colour", 0, "red"),
      Fact("label", 0, "GO"), Fact("region", 0, "top left")}


def test_case_punctuation_and_spelling_do_not_matter():
  variants = ['A little violet rhombus, labeled "OK", sits in the center.',
              'a little purple diamond, labelled "OK", sits in the centre',
              'A LITTLE VIOLET RHOMBUS, LABELLED "OK", SITS IN THE MIDDLE!']
  expected = {Fact("object", 0, "diamond"), Fact("size", 0, "small"),
              Fact("colour", 0, "purple"), Fact("label", 0, "OK"),
              Fact("region", 0, "center")}
  for text in variants:
    assert _claims(text) == expected, text
  assert _claims("The backdrop is pale gray.") == {Fact("background", value="pale grey")}
  assert _claims("The background is light grey.") == {Fact("background", value="pale grey")}


def test_definite_reference_and_fronted_relation():
  text = "There is a red circle. To the left of the red circle is a small blue square."
  assert _claims(text) == {Fact("object", 0, "circle"), Fact("colour", 0, "red"),
                           Fact("object", 1, "square"), Fact("size", 1, "small"),
                           Fact("colour", 1, "blue"), Fact("relation", 1, "left of", 0)}
  # Converses are normalised: "the circle is below the square" = "the square is above".
  assert Fact("relation", 1, "above", 0) in _claims(
      "A green circle sits at the bottom. A blue square is at the top. "
      "The green circle is below the blue square.")


def test_aggregated_counts_and_elliptical_members():
  text = "There are two red squares: a large one at the top and a small one on the left."
  assert _claims(text) == {
      Fact("count", value=2, shape="square", colour="red"),
      Fact("object", 0, "square"), Fact("colour", 0, "red"), Fact("size", 0, "large"),
      Fact("region", 0, "top"), Fact("object", 1, "square"), Fact("colour", 1, "red"),
      Fact("size", 1, "small"), Fact("region", 1, "left")}
  assert _claims("Three shapes are scattered across a cream background.") == {
      Fact("count", value=3), Fact("background", value="cream")}


def test_meta_commentary_is_kept_as_a_non_pointable_span():
  parsed = parse_caption("The composition feels balanced and calm. A red star is present.")
  assert parsed.sentences[0].claims == ()
  assert [s.kind for s in parsed.spans] == ["meta"]
  assert "composition feels balanced and calm" in parsed.spans[0].text
  assert set(parsed.claims) == {Fact("object", 0, "star"), Fact("colour", 0, "red")}


def test_negations_and_unknown_words_are_not_read_as_claims():
  parsed = parse_caption("There is no red circle.")
  assert parsed.claims == () and parsed.spans[0].kind == "negated"
  parsed = parse_caption("A red circle sits next to a blue square.")
  assert {s.text for s in parsed.spans} == {"next"}
  assert Fact("object", 1, "square") in parsed.claims
  parsed = parse_caption("A red circle sits near the blue square.")
  assert [s.text for s in parsed.spans] == ["near"]
  parsed = parse_caption("The shapes look happy.")
  assert parsed.claims == () and parsed.spans
