"""Classic caption metrics: hand-worked cases, and balcap's pure-Python scorers equal to
pycocoevalcap's (the COCO caption evaluation code) on the same tokens."""

import math

import numpy as np
import pytest

from balcap.evals import classic

PAIRS = {
    "a": ("A red cube sits left of a blue ball.",
          ["A red cube is left of a blue sphere.", "Red cube and blue ball."]),
    "b": ("Two green cylinders on the floor, near a small yellow cone",
          ["Two green cylinders stand near a yellow cone."]),
    "c": ("A dog.", ["A large brown dog runs across the grass.", "A dog running."]),
    "d": ("a small yellow cone and a red cube on a wooden table in a bright room",
          ["A wooden table holds a red cube.", "A yellow cone on a table."]),
}


def test_rouge_l_by_hand():
  # LCS(a b c d, a c d e f) = 3: P 3/4, R 3/5, F_1.2 = 2.44 * 0.45 / (0.6 + 1.44 * 0.75).
  assert classic.rouge_l(list("abcd"), [list("acdef")]) == pytest.approx(1.098 / 1.68)
  assert classic.rouge_l(list("abcd"), [list("xyz"), list("abcd")]) == pytest.approx(1.0)
  assert classic.rouge_l([], [list("ab")]) == 0.0


def test_bleu_by_hand():
  same = classic.bleu([list("abcd")], [[list("abcd")]])
  np.testing.assert_allclose(same, [1, 1, 1, 1], rtol=1e-6)
  # Half the reference's length: p1 = p2 = 1, brevity penalty exp(1 - 4/2).
  short = classic.bleu([list("ab")], [[list("abcd")]])
  assert short[0] == pytest.approx(math.exp(-1)) and short[1] == pytest.approx(math.exp(-1))
  # The closest reference length (3, not 6) sets the penalty: none here.
  closest = classic.bleu([list("abc")], [[list("abcxyz"), list("abq")]])
  assert closest[0] == pytest.approx(1.0)


def test_cider_d_by_hand():
  # Each caption equals its only reference and the references share no n-gram: every order's
  # cosine is 1, no length penalty -> 10 each.
  score, each = classic.cider_d([list("abcde"), list("vwxyz")],
                                [[list("abcde")], [list("vwxyz")]])
  assert score == pytest.approx(10.0) and each == pytest.approx([10.0, 10.0])
  # An n-gram in every image's references has idf log(2) - log(2) = 0: it earns nothing.
  score, _ = classic.cider_d([list("q"), list("q")], [[list("q")], [list("q")]])
  assert score == 0.0


def test_pure_python_equals_pycocoevalcap_on_the_same_tokens():
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=import-outside-toplevel
  gts = {i: [" ".join(classic.tokenize(r)) for r in refs] for i, (_, refs) in PAIRS.items()}
  res = {i: [" ".join(classic.tokenize(c))] for i, (c, _) in PAIRS.items()}
  mine, per_item = classic.pure_python(PAIRS)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  rouge, _ = Rouge().compute_score(gts, res)
  cider, cider_each = Cider().compute_score(gts, res)
  np.testing.assert_allclose([mine[f"bleu_{k}"] for k in range(1, 5)], bleu, rtol=1e-12)
  assert mine["rouge_l"] == pytest.approx(rouge, rel=1e-12)
  assert mine["cider_d"] == pytest.approx(cider, rel=1e-12)
  np.testing.assert_allclose([per_item[i]["cider_d"] for i in sorted(PAIRS)], cider_each,
                             rtol=1e-12)


def test_evaluate_runs_pycocoevalcap_with_java_and_reports_spice_skipped():
  assert classic.coco_unavailable() is None, "Java and pycocoevalcap are on these machines"
  other = {"z": ("A dog runs on the grass.", ["A large brown dog runs across the grass."])}
  summary, rows = classic.evaluate({"set": PAIRS, "other": other})
  assert summary["sources"]["other"]["pycocoevalcap"]["meteor"] > 0
  entry = summary["sources"]["set"]
  coco = entry["pycocoevalcap"]
  assert 0 < coco["meteor"] < 1
  # Its PTB tokenizer and balcap's word split agree on this plain text.
  assert coco["cider_d"] == pytest.approx(entry["pure_python"]["cider_d"], rel=1e-9)
  assert coco["bleu_4"] == pytest.approx(entry["pure_python"]["bleu_4"], rel=1e-9)
  assert "SPICE is not run" in summary["spice"] and summary["items"] == 5
  assert [r["id"] for r in rows] == sorted(PAIRS) + ["z"]
