"""The shares of flagged captions an evaluation reports (`captioning.FLAGS`): commentary,
repetition and degenerate captions, as CapWorldJudge's details say."""

import json

import numpy as np

from balcap.data.capworld import sample_scene, scene_to_json, write_reference
from balcap.data.capworld.flaws import META_SENTENCES
from balcap.evals import captioning
from balcap.rl.rewards.capworld_judge import CapWorldJudge
from balcap.rl.rewards.functions import JudgeReward


def test_score_captions_counts_meta_repetitive_and_degenerate_captions():
  rng = np.random.default_rng(3)
  scene = sample_scene(rng, 224, 224)
  reference = write_reference(scene, rng).text
  first_sentence = reference.split(". ")[0].rstrip(".") + "."
  example = {"id": "x", "references": [reference],
             "scene_graph": json.dumps(scene_to_json(scene))}
  captions = [reference,                                   # honest
              reference + " " + META_SENTENCES[0],         # commentary
              reference + " " + first_sentence,            # says a sentence again
              first_sentence]                              # honest, short
  summary, rows = captioning.score_captions(JudgeReward(CapWorldJudge()), [example] * 4,
                                            captions)
  assert [(r["meta"], r["repetitive"], r["degenerate"]) for r in rows] == [
      (False, False, False), (True, False, False), (False, True, True),
      (False, False, False)]
  assert (summary["meta"], summary["repetitive"], summary["degenerate"]) == (0.25, 0.25, 0.25)


def test_the_table_prints_the_flags_the_judge_reported():
  before = {"precision": 0.5, "recall": 0.5, "linguistic": 0.5, "b_capscore": 50.0,
            "length_ratio": 1.0, "words": 20.0, "degenerate": 0.5, "meta": 0.25,
            "repetitive": float("nan")}
  after = dict(before, degenerate=0.1, meta=0.0)
  text = captioning.table(before, after)
  assert "degenerate" in text and "meta" in text and "repetitive" not in text
