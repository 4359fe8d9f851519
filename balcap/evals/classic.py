"""Classic reference metrics: BLEU-1..4, ROUGE-L and CIDEr-D in pure Python (always), plus
METEOR and the same three through `pycocoevalcap` where it and Java are installed.

The pure-Python scorers follow the COCO caption evaluation's definitions (corpus BLEU with the
closest reference length, ROUGE-L's F-measure with beta 1.2, CIDEr-D with sigma 6, clipped
tf-idf and document frequencies from the references, x10), and equal pycocoevalcap's on the same
tokens (tests/evals/test_classic_metrics.py). Their tokenizer is a simple lower-case word split
standing in for the Stanford PTB tokenizer pycocoevalcap runs in Java, so the two columns can
differ slightly on punctuation-heavy text. SPICE is not run: it needs Stanford CoreNLP models
downloaded at first use, which this project cannot assume.

Long detailed captions score low on all of these against short references; they are reported
because readers expect them, not because the paper's claims rest on them.
"""

from __future__ import annotations

import collections
import math
import re
import shutil
from typing import Any, Mapping, Sequence

import numpy as np

Ngrams = collections.Counter
SPICE_SKIPPED = ("SPICE is not run: it downloads Stanford CoreNLP models at first use and "
                 "needs ~8 GB of Java heap")


def tokenize(text: str) -> list[str]:
  """Lower-case words and numbers, punctuation dropped (as the PTB tokenizer's output is used
  by the COCO scorers)."""
  return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def _ngrams(words: Sequence[str], n: int = 4) -> Ngrams:
  counts: Ngrams = collections.Counter()
  for k in range(1, n + 1):
    for i in range(len(words) - k + 1):
      counts[tuple(words[i:i + k])] += 1
  return counts


# --- BLEU ---------------------------------------------------------------------------------------


def bleu(candidates: Sequence[list[str]], references: Sequence[Sequence[list[str]]],
         n: int = 4) -> list[float]:
  """Corpus BLEU-1..n: clipped n-gram counts summed over the corpus, the brevity penalty from
  the summed lengths, each candidate measured against its closest reference length."""
  tiny, small = 1e-15, 1e-9
  correct, guessed = [0] * n, [0] * n
  test_length = ref_length = 0
  for words, refs in zip(candidates, references):
    counts = _ngrams(words, n)
    most: dict[tuple, int] = {}
    for ref in refs:
      for gram, count in _ngrams(ref, n).items():
        most[gram] = max(most.get(gram, 0), count)
    for gram, count in counts.items():
      correct[len(gram) - 1] += min(count, most.get(gram, 0))
    for k in range(n):
      guessed[k] += max(len(words) - k, 0)
    test_length += len(words)
    ref_length += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
  scores, product = [], 1.0
  for k in range(n):
    product *= (correct[k] + tiny) / (guessed[k] + small)
    scores.append(product ** (1.0 / (k + 1)))
  ratio = (test_length + tiny) / (ref_length + small)
  if ratio < 1:
    scores = [s * math.exp(1 - 1 / ratio) for s in scores]
  return scores


# --- ROUGE-L ------------------------------------------------------------------------------------


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
  previous = [0] * (len(b) + 1)
  for x in a:
    current = [0]
    for j, y in enumerate(b):
      current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
    previous = current
  return previous[-1]


def rouge_l(words: list[str], refs: Sequence[list[str]], beta: float = 1.2) -> float:
  """ROUGE-L of one candidate: F-measure of the best LCS precision and recall over refs."""
  if not words:
    return 0.0
  lcs = [_lcs(words, ref) for ref in refs]
  precision = max(l / len(words) for l in lcs)
  recall = max(l / len(ref) if ref else 0.0 for l, ref in zip(lcs, refs))
  if precision == 0 or recall == 0:
    return 0.0
  return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


# --- CIDEr-D ------------------------------------------------------------------------------------


def cider_d(candidates: Sequence[list[str]], references: Sequence[Sequence[list[str]]],
            n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
  """(corpus CIDEr-D, per-candidate scores): tf-idf n-gram vectors (idf from the references'
  document frequencies over this corpus), the candidate's weights clipped at the reference's,
  a Gaussian penalty on the length difference, averaged over n-gram orders and references,
  x10."""
  ref_counts = [[_ngrams(r, n) for r in refs] for refs in references]
  frequency: Ngrams = collections.Counter()
  for counts in ref_counts:
    frequency.update(set(gram for c in counts for gram in c))
  log_images = math.log(float(len(references)))

  def vector(counts: Ngrams):
    vec = [dict() for _ in range(n)]
    norms = [0.0] * n
    length = 0
    for gram, tf in counts.items():
      k = len(gram) - 1
      vec[k][gram] = tf * (log_images - math.log(max(1.0, frequency[gram])))
      norms[k] += vec[k][gram] ** 2
      if k == 1:  # the COCO scorer's length is its bigram count (kept for equal numbers)
        length += tf
    return vec, [math.sqrt(x) for x in norms], length

  def similarity(hyp, ref) -> np.ndarray:
    (vh, nh, lh), (vr, nr, lr) = hyp, ref
    values = np.zeros(n)
    for k in range(n):
      for gram, weight in vh[k].items():
        values[k] += min(weight, vr[k].get(gram, 0.0)) * vr[k].get(gram, 0.0)
      if nh[k] != 0 and nr[k] != 0:
        values[k] /= nh[k] * nr[k]
      values[k] *= math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
    return values

  scores = []
  for words, counts in zip(candidates, ref_counts):
    hyp = vector(_ngrams(words, n))
    total = sum(similarity(hyp, vector(c)) for c in counts)
    scores.append(float(np.mean(total)) / len(counts) * 10.0)
  return float(np.mean(scores)), scores


# --- the evaluator ------------------------------------------------------------------------------


def pure_python(pairs: Mapping[str, tuple[str, Sequence[str]]]) -> tuple[dict, dict]:
  """({metric: corpus score}, {id: {metric: score}}) for {id: (caption, references)}."""
  ids = sorted(pairs)
  candidates = [tokenize(pairs[i][0]) for i in ids]
  references = [[tokenize(r) for r in pairs[i][1]] for i in ids]
  bleus = bleu(candidates, references)
  rouges = [rouge_l(c, r) for c, r in zip(candidates, references)]
  cider, ciders = cider_d(candidates, references)
  corpus = {**{f"bleu_{k + 1}": s for k, s in enumerate(bleus)},
            "rouge_l": float(np.mean(rouges)), "cider_d": cider}
  return corpus, {i: {"rouge_l": r, "cider_d": c} for i, r, c in zip(ids, rouges, ciders)}


def coco_unavailable() -> str | None:
  """Why pycocoevalcap cannot run here, or None."""
  try:
    import pycocoevalcap  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
  except ImportError:
    return "pycocoevalcap is not installed (pip install pycocoevalcap)"
  if shutil.which("java") is None:
    return "no `java` on PATH (pycocoevalcap's tokenizer and METEOR run in Java)"
  return None


def coco(sources: Mapping[str, Mapping[str, tuple[str, Sequence[str]]]]
         ) -> dict[str, dict[str, float]]:
  """{source: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D} by pycocoevalcap (its PTB tokenizer
  first). One tokenizer pass and one METEOR process for every source: each starts a JVM."""
  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.meteor.meteor import Meteor
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  keys = {(source, i): f"{n}:{i}" for n, source in enumerate(sources) for i in sources[source]}
  tokenizer = PTBTokenizer()
  gts = tokenizer.tokenize({k: [{"caption": r} for r in sources[s][i][1]]
                            for (s, i), k in keys.items()})
  res = tokenizer.tokenize({k: [{"caption": sources[s][i][0]}] for (s, i), k in keys.items()})
  meteor = Meteor()
  scores: dict[str, dict[str, float]] = {}
  try:
    for source in sources:
      mine = [k for (s, _), k in keys.items() if s == source]
      g, r = {k: gts[k] for k in mine}, {k: res[k] for k in mine}
      scores[source] = {}
      for scorer, names in ((Bleu(4), [f"bleu_{k}" for k in range(1, 5)]),
                            (meteor, ["meteor"]), (Rouge(), ["rouge_l"]), (Cider(), ["cider_d"])):
        value, _ = (scorer.compute_score(g, r, verbose=0) if isinstance(scorer, Bleu)
                    else scorer.compute_score(g, r))
        for name, v in zip(names, value if isinstance(value, list) else [value]):
          scores[source][name] = float(v)
  finally:  # its Java process lives until closed
    with meteor.lock:
      meteor.meteor_p.stdin.close()
      meteor.meteor_p.kill()
      meteor.meteor_p.wait()
  return scores


def evaluate(sources: Mapping[str, Mapping[str, tuple[str, Sequence[str]]]]
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Scores of each source ({source: {id: (caption, references)}}) and one row per caption."""
  why_not = coco_unavailable()
  summary: dict[str, Any] = {"sources": {}, "spice": SPICE_SKIPPED,
                             "pycocoevalcap": why_not or "used"}
  rows = []
  theirs = coco(sources) if why_not is None and sources else {}
  for source, pairs in sources.items():
    corpus, per_item = pure_python(pairs)
    entry = {"items": len(pairs), "pure_python": corpus}
    if source in theirs:
      entry["pycocoevalcap"] = theirs[source]
    summary["sources"][source] = entry
    rows += [{"source": source, "id": i, "caption": pairs[i][0], **per_item[i]}
             for i in sorted(pairs)]
  first = next(iter(summary["sources"].values()), None)
  summary["cider_d"] = first["pure_python"]["cider_d"] if first else None
  summary["items"] = sum(len(p) for p in sources.values())
  return summary, rows
