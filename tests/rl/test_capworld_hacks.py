"""The hack battery: captions a policy could learn to game CapWorldJudge with, on many scenes,
each scored against honest captions the grammar writes. Every honest caption must outscore
every hack on b-CapScore, and each hack must lose on the component a reader would blame."""

import json
import re

import numpy as np
import pytest

from balcap.data.capworld import sample_scene, scene_to_json, write_reference
from balcap.data.capworld.flaws import META_SENTENCES
from balcap.data.capworld.world import COLOURS
from balcap.rl.rewards.capworld_judge import CapWorldJudge
from balcap.rl.rewards.functions import b_capscore
from balcap.rl.rewards.types import Sample

JUDGE = CapWorldJudge()
NUM_SCENES = 40


def _sentences(text):
  return [s.strip() + "." for s in text.split(".") if s.strip()]


def _repeat_to(sentence, words):
  out = [sentence, sentence]
  while len(" ".join(out).split()) < words:
    out.append(sentence)
  return " ".join(out)


def _hacks(scene, reference, rng):
  first = _sentences(reference)[0]
  n = len(reference.split())
  objects = scene.objects
  other = [c for c in COLOURS if c not in {o.colour for o in objects}][0]
  # an object's colour word (not the background's "light blue" or "pale ..."), made another
  colour = re.compile(r"(?<!light )(?<!pale )\b(" + "|".join(o.colour for o in objects) + r")\b")
  meta = list(rng.permutation(META_SENTENCES))
  return {
      # one safe true sentence, said again until the caption is as long as the reference
      "repeat": _repeat_to(first, n),
      # every true sentence followed by commentary
      "meta_padding": " ".join(s + " " + meta[i % len(meta)]
                               for i, s in enumerate(_sentences(reference))),
      # the reference, then a sentence that contradicts it
      "contradiction": f"{reference} The {objects[0].colour} {objects[0].shape} is {other}.",
      # the attributes, listed without sentences
      "bare_list": ", ".join(f"{o.size} {o.colour} {o.shape} {o.region}" for o in objects),
      # the reference with one attribute wrong
      "one_wrong_attribute": colour.sub(other, reference, count=1),
      "empty": "",
      "one_word": objects[0].shape,
      # the reference, ten times
      "ten_times": " ".join([reference] * 10),
  }


# Per hack: whom it must score below on b-CapScore ("all": every honest caption; "source":
# the reference it was made from, whose facts it keeps; an incomplete honest caption may
# rightly beat a complete one with a flaw), and the component a reader would blame, with how
# it must compare with the honest captions' lowest ("lower"), the source's, or a ceiling.
BLAME = {
    "repeat": ("all", [("coherence", 0.3), ("recall", "not above source")]),
    "meta_padding": ("source", [("clarity", 0.5), ("precision", "lower")]),
    "contradiction": ("source", [("coherence", 0.5), ("precision", "lower")]),
    "bare_list": ("all", [("fluency", 0.0)]),
    "one_wrong_attribute": ("source", [("precision", "lower")]),
    "empty": ("all", [("precision", 0.0), ("recall", 0.0)]),
    "one_word": ("all", [("fluency", 0.0), ("recall", "lower")]),
    "ten_times": ("source", [("coherence", 0.05)]),
}


def _score(captions, scene, references):
  graph = json.dumps(scene_to_json(scene))
  judgements = JUDGE.judge([Sample(f"x/{i}", c, tuple(references), fields={"scene_graph": graph})
                            for i, c in enumerate(captions)])
  out = []
  for j in judgements:
    parts = {"precision": j.precision, "recall": j.recall, "linguistic": j.linguistic,
             **{k: j.details.get(k, 0.0) for k in ("fluency", "clarity", "coherence")}}
    parts["b"] = float(b_capscore(np.array([j.precision]), np.array([j.recall]),
                                  np.array([j.linguistic]))[0])
    parts["details"] = j.details
    out.append(parts)
  return out


@pytest.fixture(scope="module")
def battery():
  rng = np.random.default_rng(13)
  cases = []
  for _ in range(NUM_SCENES):
    scene = sample_scene(rng, 224, 224)
    references = [write_reference(scene, rng).text for _ in range(2)]
    honest = references + [write_reference(scene, rng).text for _ in range(2)]  # [0]: source
    hacks = _hacks(scene, references[0], rng)
    scores = _score(honest + list(hacks.values()), scene, references)
    cases.append((scene, honest, dict(zip(hacks, scores[len(honest):])),
                  scores[:len(honest)], hacks))
  return cases


@pytest.mark.parametrize("hack", sorted(BLAME))
def test_every_honest_caption_outscores_the_hack_on_its_blamed_component(battery, hack):
  for _, honest, hacked, honest_scores, texts in battery:
    got = hacked[hack]
    why = (hack, texts[hack], {k: v for k, v in got.items() if k != "details"},
           got["details"].get("problems"))
    against, blamed = BLAME[hack]
    honest_b = [h["b"] for h in honest_scores]
    assert got["b"] < (min(honest_b) if against == "all" else honest_b[0]), why
    for component, rule in blamed:
      if rule == "lower":
        assert got[component] < min(h[component] for h in honest_scores), (component, why)
      elif rule == "not above source":
        assert got[component] <= honest_scores[0][component], (component, why)
      else:
        assert got[component] <= rule, (component, why)


def test_honest_captions_read_well(battery):
  for _, honest, _, honest_scores, _ in battery:
    for text, s in zip(honest, honest_scores):
      assert s["precision"] == 1.0 and s["linguistic"] == 1.0, (text, s["details"])


def test_a_restated_claim_counts_once_in_precision(battery):
  # Said once or ten times, the reference makes the same distinct assertions, all true.
  for _, _, hacked, honest_scores, _ in battery:
    assert hacked["ten_times"]["precision"] == honest_scores[0]["precision"] == 1.0
    assert hacked["ten_times"]["details"]["restated"] > 0
    assert hacked["ten_times"]["details"]["degenerate"]
  assert not any(s["details"]["degenerate"] for *_, scores, _ in battery for s in scores)
