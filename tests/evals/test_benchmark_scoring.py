"""The benchmarks' scoring formulas on cases worked by hand."""

import math

import pytest

from balcap.evals import caparena, captionqa, dcscore

# --- DCScore -----------------------------------------------------------------------------------
# Three oracle facts; five predicted facts:
#   p0 -> o0, correct, descriptive      p1 -> o0, correct, not descriptive (o0 shared: c_0 = 2)
#   p2 -> none, correct, descriptive    p3 -> o1, wrong, descriptive    p4 -> none, wrong
VERIFIED = [True, True, True, False, False]
MATCHES = [0, 0, None, 1, None]
RELEVANT = [True, False, True, True, False]


def test_dcscore_trial_shares_an_oracle_fact_matched_twice():
  every = dcscore.trial(VERIFIED, MATCHES, num_oracle=3)
  assert every.precision == pytest.approx(3 / 5)
  # recall: (1 unmatched correct + 1/2 + 1/2) / (3 oracle + 1 extra)
  assert every.recall == pytest.approx(2 / 4)
  assert every.f1 == pytest.approx(2 * 0.6 * 0.5 / (1.1 + 1e-8))


def test_dcscore_relevant_subset_keeps_shares_over_all_facts():
  relevant = dcscore.trial(VERIFIED, MATCHES, num_oracle=3, subset=RELEVANT)
  assert relevant.precision == pytest.approx(2 / 3)       # p0, p2 right of p0, p2, p3
  assert relevant.recall == pytest.approx(1.5 / 4)        # p2 + p0's half of o0 (p1 shares it)
  assert relevant.f1 == pytest.approx(2 * (2 / 3) * 0.375 / (2 / 3 + 0.375))


def test_dcscore_image_averages_every_verify_by_match_trial():
  wrong = [False] * 5
  score = dcscore.image_score(RELEVANT, [VERIFIED, wrong, VERIFIED], [MATCHES] * 3,
                              num_oracle=3)
  assert score.trials == 9
  f1, f1_rel = 2 * 0.6 * 0.5 / 1.1, 0.5 / (2 / 3 + 0.375)
  assert score.f1 == pytest.approx(2 / 3 * f1)            # a wrong trial scores 0
  assert score.f1_relevant == pytest.approx(2 / 3 * f1_rel)
  assert score.dcscore == pytest.approx(2 / 3 * (f1 + f1_rel) / 2)


def test_dcscore_correct_facts_the_oracle_lacks_raise_recall():
  # Every oracle fact covered once, plus two correct facts it lacks: recall (2 + 2) / (2 + 2).
  result = dcscore.trial([True] * 4, [0, 1, None, None], num_oracle=2)
  assert result.recall == pytest.approx(1.0) and result.precision == 1.0
  # Only one of two oracle facts covered, nothing extra: recall 1/2.
  assert dcscore.trial([True], [0], num_oracle=2).recall == pytest.approx(0.5)


def test_dcscore_invalid_image_is_listed_not_averaged():
  good = dcscore.image_score([True], [[True]], [[0]], num_oracle=1)
  result = dcscore.benchmark({"a.jpg": good, "b.jpg": None})
  assert result["score"] == pytest.approx(100 * good.dcscore)
  assert (result["items"], result["valid"], result["invalid"]) == (2, 1, 1)
  assert result["invalid_ids"] == ["b.jpg"]


def test_dcscore_rejects_matches_to_missing_oracle_facts():
  with pytest.raises(ValueError, match="name no oracle fact"):
    dcscore.trial([True], [3], num_oracle=2)


# --- CaptionQA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("question, choices, expected", [
    ("Is the dog asleep?", ["sleeping", "running"], True),          # auxiliary verb first
    ("What color is the car?", ["No", "yes"], True),                # yes and no among choices
    ("How many cups are on the table?", ["1", "2", "3"], False),
    ("Where does the cat sit?", ["sofa", "floor"], False),          # "does" not first
    ("Could it rain later?", ["maybe", "surely"], True),
])
def test_captionqa_yes_no_detection(question, choices, expected):
  assert captionqa.is_yes_no(question, choices) is expected


def test_captionqa_options_are_shuffled_by_seed_with_cannot_answer_last():
  first = captionqa.options("q1", "What is on the plate?", ["bread", "fish", "rice"], "fish")
  again = captionqa.options("q1", "What is on the plate?", ["bread", "fish", "rice"], 1)
  assert first == again                                   # fixed seed, answer by text or index
  assert first.texts[first.correct] == "fish"
  assert first.cannot_answer == 3 and first.texts[3] == captionqa.CANNOT_ANSWER
  assert sorted(first.texts[:3]) == ["bread", "fish", "rice"]
  orders = {captionqa.options(f"q{i}", "What?", ["a", "b", "c"], "a").texts for i in range(20)}
  assert len(orders) > 1                                   # shuffled, not kept in order
  yes_no = captionqa.options("q2", "Is it red?", ["yes", "no"], "no")
  assert yes_no.cannot_answer is None and len(yes_no.texts) == 2


@pytest.mark.parametrize("reply, expected", [
    ("B", 1), ("b", 1), ("(C)", 2), ("Answer: D", 3), ("A dog. Answer: C.", 2),
    ("2", 1), ("E", None), ("none", None), ("", None), ("The answer is A", 0),
])
def test_captionqa_parses_the_first_standalone_letter(reply, expected):
  assert captionqa.parse_answer(reply, num_options=4) == expected


def test_captionqa_scores_right_wrong_unparsable_and_cannot_answer():
  option = captionqa.Options(("x", "y", "z", captionqa.CANNOT_ANSWER), correct=1,
                             cannot_answer=3, num_choices=3)
  assert captionqa.score(option, 1) == 1.0
  assert captionqa.score(option, 0) == 0.0
  assert captionqa.score(option, None) == 0.0
  assert captionqa.score(option, 3) == pytest.approx(1 / 3 + 0.05)


def test_captionqa_overall_is_the_mean_of_domains_not_of_questions():
  result = captionqa.aggregate([("nature", 1.0), ("nature", 1.0), ("nature", 0.0),
                                ("text", 0.0)])
  assert result["domains"] == {"nature": pytest.approx(200 / 3), "text": 0.0}
  assert result["overall"] == pytest.approx(100 / 3)
  assert result["micro"] == pytest.approx(50.0) and result["questions"] == 4


# --- CapArena-Auto -----------------------------------------------------------------------------


@pytest.mark.parametrize("reply, expected", [
    ("Caption 1 mentions the sign. Caption 2 is better", 2),
    ("Reasoning... caption 1 is better.", 1),
    ("Both are equally detailed.\nTie", 0),
    ("Verdict: Tie.", 0),
    ("The man wears a tie and a hat.", None),               # "tie" in a sentence is no verdict
    ("Caption 2 is better at first glance, but on balance: Caption 1 is better", 1),
    ("I cannot decide.", None),
])
def test_caparena_parses_the_last_verdict(reply, expected):
  assert caparena.parse_verdict(reply) == expected


def test_caparena_outcome_follows_the_test_captions_position():
  assert caparena.outcome(1, first=True) == caparena.WIN
  assert caparena.outcome(1, first=False) == caparena.LOSS
  assert caparena.outcome(2, first=False) == caparena.WIN
  assert caparena.outcome(0, first=True) == caparena.TIE
  assert caparena.outcome(None, first=True) is None
  positions = [caparena.test_first(f"img{i}") for i in range(100)]
  assert 30 < sum(positions) < 70 and positions == [caparena.test_first(f"img{i}")
                                                    for i in range(100)]


def test_caparena_scores_per_baseline_with_ties_and_unparsed_in_the_count():
  battles = [("gpt", "win"), ("gpt", "loss"), ("gpt", "loss"), ("gpt", "tie"),
             ("cog", "win"), ("cog", None)]
  result = caparena.score(battles)
  assert result["baselines"]["gpt"]["score"] == pytest.approx(-25.0)   # (1 - 2) / 4
  assert result["baselines"]["cog"]["score"] == pytest.approx(50.0)    # (1 - 0) / 2
  assert result["score_avg"] == pytest.approx(12.5)
  assert result["unparsed"] == 1 and result["images"] == 6


def test_bradley_terry_recovers_the_odds_of_two_players():
  games = [("a", "b", 1)] * 3 + [("a", "b", 0)]
  elo = caparena.bradley_terry(games, prior=0.0)
  assert elo["a"] - elo["b"] == pytest.approx(400 * math.log10(3), abs=1e-6)
  assert (elo["a"] + elo["b"]) / 2 == pytest.approx(1000.0)


def test_bradley_terry_ranks_a_chain_and_stays_finite_without_losses():
  games = ([("a", "b", 1)] * 4 + [("b", "c", 1)] * 4 + [("a", "c", 0.5)] * 2)
  elo = caparena.bradley_terry(games)
  assert elo["a"] > elo["b"] and all(math.isfinite(v) for v in elo.values())
  with pytest.raises(ValueError, match="against itself"):
    caparena.bradley_terry([("a", "a", 1)])
