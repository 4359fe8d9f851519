"""`<workdir>/eval/report.md`: one table over every benchmark result in the folder."""

from __future__ import annotations

import json
import os
from typing import Any

from balcap import paths

# The headline number of each benchmark's <name>.json (all on a 0-100 scale except classic's
# CIDEr-D, which is COCO's 0-10).
MAIN_SCORE = {"dcscore": "score", "captionqa": "overall", "caparena": "score_avg",
              "capscore": "b_capscore", "classic": "cider_d"}
_LABELS = {"dcscore": "DCScore", "captionqa": "CaptionQA (Overall)",
           "caparena": "CapArena-Auto (Score_avg)", "capscore": "b-CapScore",
           "classic": "CIDEr-D (pure Python)"}
ORDER = tuple(MAIN_SCORE)


def _number(value: Any, digits: int = 1) -> str:
  return "—" if value is None else f"{value:.{digits}f}"


def format_score(result: dict[str, Any]) -> str:
  name = result["benchmark"]
  return f"{_LABELS[name]} {_number(result['score'], 3 if name == 'classic' else 1)}"


def _details(result: dict[str, Any]) -> str:
  name = result["benchmark"]
  if name == "dcscore":
    return (f"F1 {_number(result.get('f1'), 3)}, F1_rel {_number(result.get('f1_relevant'), 3)}"
            f", P {_number(result.get('precision'), 3)}, R {_number(result.get('recall'), 3)}")
  if name == "captionqa":
    domains = ", ".join(f"{d} {v:.1f}" for d, v in result.get("domains", {}).items())
    return f"micro {_number(result.get('micro'))}; {domains}"
  if name == "caparena":
    return ", ".join(f"vs {b} {v['score']:+.0f}" for b, v in result.get("baselines", {}).items())
  if name == "capscore":
    return (f"P {_number(result.get('precision'), 3)}, R {_number(result.get('recall'), 3)}, "
            f"L {_number(result.get('linguistic'), 3)}, length ratio "
            f"{_number(result.get('length_ratio'), 2)}")
  parts = []
  for source, entry in result.get("sources", {}).items():
    scores = entry["pure_python"]
    parts.append(f"{source}: B4 {scores['bleu_4']:.3f}, R-L {scores['rouge_l']:.3f}, "
                 f"CIDEr-D {scores['cider_d']:.3f}"
                 + (f", METEOR {entry['pycocoevalcap']['meteor']:.3f}"
                    if "pycocoevalcap" in entry else ""))
  return "; ".join(parts)


def _items(result: dict[str, Any]) -> str:
  items = result.get("items", result.get("images"))
  invalid = result.get("invalid", 0)
  return f"{items} ({invalid} invalid)" if invalid else str(items)


def table(results: list[dict[str, Any]]) -> str:
  lines = ["| benchmark | score | details | items | words (mean/median) | tokens (mean) "
           "| judge | s / caption |", "|---|---:|---|---:|---|---:|---|---:|"]
  for r in results:
    length = r.get("caption_length") or {}
    words, tokens = length.get("words"), length.get("tokens")
    judge = r.get("judge") or {}
    who = judge.get("model") or judge.get("rewards_judge") or "—"
    if judge.get("prompt_version"):
      who += f" ({judge['prompt_version']})"
    lines.append(
        f"| {_LABELS[r['benchmark']]} "
        f"| {_number(r['score'], 3 if r['benchmark'] == 'classic' else 1)} "
        f"| {_details(r)} | {_items(r)} "
        f"| {_number(words and words['mean'])} / {_number(words and words['median'])} "
        f"| {_number(tokens and tokens['mean'])} | {who} | {r.get('seconds_per_caption', '—')} |")
  return "\n".join(lines)


def write(folder: str) -> str:
  """Writes folder/report.md from every <benchmark>.json there; returns the table."""
  results = []
  for path in paths.glob(folder, "*.json"):
    name = os.path.splitext(os.path.basename(path))[0]
    if name in MAIN_SCORE:
      results.append(json.loads(paths.read_text(path)))
  results.sort(key=lambda r: ORDER.index(r["benchmark"]))
  text = table(results)
  captioner = results[0].get("captioner") if results else None
  header = f"Captions: `{json.dumps(captioner)}`\n\n" if captioner else ""
  paths.write_text(os.path.join(folder, "report.md"),
                   "# balcap evaluation\n\n" + header + text
                   + "\n\nScores judged by a model other than each benchmark's official judge "
                   "are comparable only with each other (README, Evaluating).\n")
  return text
