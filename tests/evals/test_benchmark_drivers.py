"""The judged benchmarks run against a scripted judge (scripted_judge.py) on fixture folders:
each score worked by hand from the judge's rules."""

import pytest

from balcap.chat.protocol import ChatReply
from balcap.chat.scripted_backend import ScriptedChatBackend
from balcap.evals import asking, benchmark_data, benchmarks
from evals import benchmark_fixtures, scripted_judge


def backend():
  return ScriptedChatBackend(lambda request: scripted_judge.answer(request.messages))


def test_dcscore_scores_valid_images_and_reports_the_rest(tmp_path):
  items = benchmark_data.load_decapbench(benchmark_fixtures.decapbench(str(tmp_path), 3))
  judge = backend()
  captions = {"dc0.jpg": "A red cube 0. A blue ball. A unicorn flies. A lovely scene",
              "dc1.jpg": "BROKEN"}
  summary, rows = benchmarks.run_dcscore(judge, items, captions)
  # dc0: facts red cube (o0), blue ball (o1), unicorn (wrong), lovely scene (right, not
  # descriptive, no oracle fact). All: P 3/4, R (1 extra + 2) / (3 + 1). Descriptive: P 2/3,
  # R 2/3.
  f1, f1_rel = 0.75, 2 / 3
  assert summary["score"] == pytest.approx(100 * (f1 + f1_rel) / 2, abs=1e-5)
  assert summary["valid"] == 1 and summary["invalid_ids"] == ["dc1.jpg", "dc2.jpg"]
  assert summary["invalid_reasons"]["dc2.jpg"] == "no caption"
  assert "unparsable" in summary["invalid_reasons"]["dc1.jpg"]
  asked = [r.id for r in judge.requests]
  assert asked.count("dc1.jpg#decompose") == asking.DEFAULT_TRIES    # retried, then invalid
  assert asked.count("dc0.jpg#match1") == 1 and asked.count("dc0.jpg#verify2") == 1
  # The three match samples are distinct requests at temperature 1.0 (seeds 0, 1, 2).
  matches = [r for r in judge.requests if "#match" in r.id]
  assert [(r.temperature, r.seed) for r in matches] == [(1.0, 0), (1.0, 1), (1.0, 2)]
  (row,) = [r for r in rows if r["id"] == "dc0.jpg"]
  assert row["matches"][0] == [0, 1, None, None] and row["verified"][0] == [
      True, True, False, True]


def test_dcscore_retry_carries_a_reminder_and_a_caption_without_facts_scores_zero(tmp_path):
  items = benchmark_data.load_decapbench(benchmark_fixtures.decapbench(str(tmp_path), 1))
  replies = iter(["not json", '[{"fact": "A red cube 0.", "descriptive": true}]'])

  def respond(request):
    if request.id.endswith("#decompose"):
      return next(replies)
    return scripted_judge.answer(request.messages)
  judge = ScriptedChatBackend(respond)
  summary, _ = benchmarks.run_dcscore(judge, items, {"dc0.jpg": "whatever"})
  second = [r for r in judge.requests if r.id == "dc0.jpg#decompose"][1]
  assert "could not be used" in second.messages[-1]["content"]
  # one right fact covering one of three oracle facts: P 1, R 1/3, F1 0.5 (both subsets)
  assert summary["score"] == pytest.approx(50.0, abs=1e-5)
  summary, _ = benchmarks.run_dcscore(backend(), items, {"dc0.jpg": "NOFACTS"})
  assert summary["score"] == 0.0 and summary["valid"] == 1


def test_captionqa_scores_per_domain_with_cannot_answer_and_unparsable(tmp_path):
  items = benchmark_data.load_captionqa(benchmark_fixtures.captionqa(str(tmp_path)))
  judge = backend()
  summary, rows = benchmarks.run_captionqa(
      judge, items, {"nat_000": "A red cube. Yes, a ball.", "nat_001": "GIBBERISH"})
  # nat_000 (natural): red -> right, yes -> right, no count -> cannot answer (1/4 + 0.05).
  # nat_001 (document): unparsable replies score 0 and are not asked again.
  assert summary["domains"] == {"natural": pytest.approx(100 * 2.3 / 3), "document": 0.0}
  assert summary["overall"] == pytest.approx(100 * 2.3 / 6)
  assert summary["questions"] == 6 and summary["invalid"] == 0
  assert len(judge.requests) == 6
  assert all(r.max_tokens == 4 and r.temperature == 0.0 for r in judge.requests)
  assert summary["cannot_answer_rate"] == pytest.approx(1 / 6)
  assert {r["id"]: r["score"] for r in rows}["nat_000/2"] == pytest.approx(0.3)


def test_captionqa_judge_failures_are_invalid_not_wrong(tmp_path):
  items = benchmark_data.load_captionqa(benchmark_fixtures.captionqa(str(tmp_path), 1))

  class Down:
    def complete(self, requests, deadline=None):
      return [ChatReply(r.id, failure="timeout") for r in requests]
  summary, _ = benchmarks.run_captionqa(Down(), items, {"nat_000": "A red cube."},
                                        benchmarks.JudgeSettings(tries=2))
  assert summary["invalid"] == 3 and summary["questions"] == 0 and summary["overall"] is None


def test_caparena_wins_losses_and_an_unparsed_verdict(tmp_path):
  items = benchmark_data.load_caparena(benchmark_fixtures.caparena(str(tmp_path)))
  captions = {"ca0.jpg": "a much longer test caption here",      # vs 3 words: win
              "ca1.jpg": "short one",                            # vs 3 words: loss
              "ca2.jpg": "CONFUSED caption"}                     # never a verdict
  summary, rows = benchmarks.run_caparena(backend(), items, captions)
  assert {b: v["score"] for b, v in summary["baselines"].items()} == {
      "gpt": 100.0, "cog": -100.0, "cpm": 0.0}
  assert summary["score_avg"] == 0.0 and summary["unparsed_ids"] == ["ca2.jpg"]
  assert summary["caption_words"] == pytest.approx((6 + 2 + 2) / 3)
  assert {r["id"]: r["outcome"] for r in rows} == {"ca0.jpg": "win", "ca1.jpg": "loss",
                                                  "ca2.jpg": None}
