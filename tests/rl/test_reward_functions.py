"""Reward functions: length ratio, b-CapScore, judge accounting, threads, and io_callback."""

import math
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from balcap.rl.rewards import functions, in_jit
from balcap.rl.rewards.types import Judgement, Sample


class ScriptedJudge:
  """Scores from a table keyed by caption; 'broken' captions fail their precision."""
  name = "scripted"

  def __init__(self, delay=0.0):
    self.delay, self.threads = delay, []

  def judge(self, samples):
    self.threads.append(threading.current_thread().name)
    time.sleep(self.delay)
    out = []
    for s in samples:
      j = Judgement(s.id, precision=0.5, recall=len(s.caption) / 100, linguistic=1.0)
      if "broken" in s.caption:
        j.fail("precision", "timeout")
      out.append(j)
    return out


def sample(i, caption, references=("a red circle on the left",)):
  return Sample(id=f"ex{i}/0", caption=caption, references=references)


def test_length_ratio_in_words_and_tokens():
  assert functions.length_ratio("one two three", ["a b c d e f"]) == 0.5
  assert functions.length_ratio("one two", ["a b", "a b c d e f"]) == 0.5  # mean reference
  assert math.isnan(functions.length_ratio("one", []))
  assert functions.length_ratio("abcd", ["ab"], count=len) == 2.0


def test_b_capscore_is_the_harmonic_mean_times_100():
  np.testing.assert_allclose(functions.b_capscore([1.0, 0.5, 0.0], [1.0, 1.0, 1.0],
                                                  [1.0, 1.0, 1.0]), [100.0, 75.0, 0.0])
  assert np.isnan(functions.b_capscore([np.nan], [1.0], [1.0]))[0]


def test_judge_reward_components_and_failure_counts():
  reward = functions.JudgeReward(ScriptedJudge())
  batch = reward([sample(0, "a red circle"), sample(1, "broken thing here")])
  np.testing.assert_allclose(batch.components["recall"], [0.12, 0.17])
  assert np.isnan(batch.components["precision"][1])
  np.testing.assert_allclose(batch.components["length_ratio"], [3 / 6, 3 / 6])
  assert batch.failures == {("precision", "timeout"): 1}
  metrics = batch.metrics()
  assert metrics["reward/precision/nan"] == 1.0 and metrics["reward/precision/mean"] == 0.5
  assert metrics["reward/failures/precision/timeout"] == 1.0
  assert metrics["reward/b_capscore"] == pytest.approx(
      float(np.nanmean(functions.b_capscore([0.5, np.nan], [0.12, 0.17], [1, 1]))))


def test_a_crashing_judge_costs_rewards_not_the_run():
  class Crashing:
    name = "crashing"

    def judge(self, samples):
      raise ConnectionError("judge server on fire")
  batch = functions.JudgeReward(Crashing())([sample(0, "a"), sample(1, "b")])
  assert all(np.isnan(batch.components[c]).all() for c in ("precision", "recall", "linguistic"))
  assert batch.failures == {("precision", "judge_error"): 2, ("recall", "judge_error"): 2,
                            ("linguistic", "judge_error"): 2}


def test_judgements_out_of_order_are_refused_not_misattributed():
  class Shuffling(ScriptedJudge):
    def judge(self, samples):
      return list(reversed(super().judge(samples)))
  batch = functions.JudgeReward(Shuffling())([sample(0, "a b"), sample(1, "c d e")])
  assert np.isnan(batch.components["recall"]).all()  # nothing lands on the wrong caption


def test_submit_runs_on_a_host_thread_while_the_device_works():
  judge = ScriptedJudge(delay=0.3)
  reward = functions.JudgeReward(judge)
  started = time.perf_counter()
  future = reward.submit([sample(0, "a red circle")])
  assert time.perf_counter() - started < 0.1  # returned at once
  device = jax.jit(lambda x: (x @ x).sum())(jnp.ones((256, 256)))  # meanwhile
  batch = future.result(timeout=10)
  assert float(device) == 256.0 ** 3 and batch.components["precision"][0] == 0.5
  assert judge.threads[0].startswith("reward")
  reward.close()


def test_make_samples_ids_trace_each_caption():
  examples = [{"id": "cw-1", "references": ["r1"], "scene_graph": "{}"},
              {"id": "cw-2", "references": ["r2", "r3"]}]
  samples = functions.make_samples(examples, ["a", "b", "c", "d"], 2)
  assert [s.id for s in samples] == ["cw-1/0", "cw-1/1", "cw-2/0", "cw-2/1"]
  assert samples[1].fields == {"scene_graph": "{}"} and samples[3].references == ("r2", "r3")
  with pytest.raises(ValueError, match="3 captions for 2 examples x 2"):
    functions.make_samples(examples, ["a", "b", "c"], 2)


def test_io_callback_reward_under_jit_equals_the_host_function():
  tokens = np.array([[5, 5, 5, 9], [1, 2, 3, 4], [7, 8, 0, 0]], np.int32)
  lengths = np.array([4, 4, 2], np.int32)
  reward = in_jit.in_jit(in_jit.distinct_token_fraction, ("diversity",))
  out = jax.jit(lambda t, l: reward(t, l)["diversity"] * 2.0)(tokens, lengths)
  np.testing.assert_allclose(out, 2.0 * in_jit.distinct_token_fraction(tokens, lengths)[
      "diversity"])
  np.testing.assert_allclose(out, [1.0, 2.0, 2.0])


def test_io_callback_reward_missing_a_component_is_named():
  reward = in_jit.in_jit(lambda t, l: {"other": np.zeros(l.shape)}, ("diversity",))
  with pytest.raises(Exception, match="missing \\['diversity'\\]"):
    jax.block_until_ready(jax.jit(reward)(np.zeros((2, 3), np.int32), np.ones(2, np.int32)))


def test_a_judge_past_the_deadline_gives_timeouts_not_a_wait():
  reward = functions.JudgeReward(ScriptedJudge(delay=2.0))
  samples = [sample(0, "a red circle"), sample(1, "a blue square")]
  started = time.perf_counter()
  batch = reward.result(reward.submit(samples), samples, deadline_s=0.2)
  assert time.perf_counter() - started < 1.5
  assert np.isnan(batch.components["precision"]).all()
  assert batch.failures[("precision", "timeout")] == 2
  assert batch.ids == ["ex0/0", "ex1/0"]


class HangingJudge:
  """Hangs on the batches whose first caption says 'hang' (until released), answers the rest."""
  name = "hanging"

  def __init__(self):
    self.release = threading.Event()
    self.calls = 0

  def judge(self, samples):
    self.calls += 1
    if "hang" in samples[0].caption:
      self.release.wait(timeout=30)
    return [Judgement(s.id, precision=1.0, recall=1.0, linguistic=1.0) for s in samples]


def test_a_batch_past_its_deadline_does_not_delay_the_next():
  judge = HangingJudge()
  reward = functions.JudgeReward(judge)
  stuck = [sample(0, "hang")]
  late = reward.result(reward.submit(stuck), stuck, deadline_s=0.2)
  assert np.isnan(late.components["precision"]).all()
  # The next step's batch is judged at once, not queued behind the hung one (before, with
  # one worker thread, it waited and timed out too).
  fresh = [sample(1, "a red circle")]
  started = time.perf_counter()
  batch = reward.result(reward.submit(fresh), fresh, deadline_s=5.0)
  assert time.perf_counter() - started < 1.0
  assert batch.components["precision"][0] == 1.0 and not batch.failures
  judge.release.set()
  reward.close()


def test_batches_in_flight_are_bounded_and_the_excess_fails_fast():
  judge = HangingJudge()
  reward = functions.JudgeReward(judge, max_in_flight=2)
  stuck = [sample(0, "hang")]
  for _ in range(2):
    reward.submit(stuck)
  third = [sample(1, "a red circle")]
  started = time.perf_counter()
  batch = reward.result(reward.submit(third), third, deadline_s=5.0)
  assert time.perf_counter() - started < 0.5  # refused, not queued
  assert batch.failures[("precision", "timeout")] == 1
  assert judge.calls == 2  # no third thread was started for it
  judge.release.set()
  reward.close()
  # Slots come back once the hung batches finish.
  fourth = [sample(2, "a red circle")]
  batch = reward.result(reward.submit(fourth), fourth, deadline_s=5.0)
  assert batch.components["precision"][0] == 1.0
  reward.close()


def test_a_collective_judge_runs_on_the_calling_thread():
  judge = ScriptedJudge()
  judge.collective = True
  reward = functions.JudgeReward(judge)
  future = reward.submit([sample(0, "a red circle")])
  assert future.done() and judge.threads == [threading.current_thread().name]
