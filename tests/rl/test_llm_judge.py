"""The LLM judge and its OpenAI-compatible client against a real local HTTP server.

The fake server (fake_chat_server.py) answers the judge prompts by a toy rule, so every
expected score below is exact; cue words in a caption make it slow, failing or garbled.
"""

import dataclasses
import logging
import math
import time

import numpy as np
import pytest

from balcap.chat import json_reply
from balcap.chat.openai_backend import OpenAIChatBackend
from balcap.chat.protocol import ChatReply, ChatRequest
from balcap.rl.rewards import prompts
from balcap.rl.rewards.llm_judge import LLMJudge, OpenAIChatJudge
from balcap.rl.rewards.types import Sample
from rl.fake_chat_server import FakeChatServer, Reply

IMAGE = np.full((8, 8, 3), 200, np.uint8)
KEY_ENV = "BALCAP_TEST_JUDGE_KEY"
SECRET = "sk-test-0123456789-very-secret"


def make_backend(server, **overrides):
  options = dict(timeout_s=2.0, max_retries=2, backoff_s=0.001, deadline_s=10.0)
  options.update(overrides)
  return OpenAIChatBackend(server.url, "judge-model", **options)


def sample(sample_id, caption, references=("a red car",), image=IMAGE):
  return Sample(sample_id, caption, tuple(references), image)


def chat(request_id, text):
  return ChatRequest(request_id, [{"role": "user", "content": text}])


# Scores


def test_valid_answers_give_exact_rewards_and_details():
  samples = [
      sample("ex0/0", "a red car; people queue at a counter. the mood is warm",
             ["a red car. a blue bus"]),
      sample("ex0/1", "a unicorn grazes. this adds depth. a clumsy dog sleeps",
             ["a red car. a blue bus"]),
      sample("ex1/0", "a cat sits", []),
      sample("ex2/0", "   ", ["a red car"]),
  ]
  with FakeChatServer() as server:
    judge = OpenAIChatJudge(server.url, "judge-model", timeout_s=2.0, backoff_s=0.001)
    first, second, no_reference, empty = judge.judge(samples)
  assert judge.name == "openai"
  assert [first.id, second.id, no_reference.id, empty.id] == [s.id for s in samples]
  assert (first.precision, first.recall, first.linguistic) == (2 / 3, 0.5, 0.75)
  assert first.details["assertions"] == ["a red car", "people queue at a counter",
                                         "the mood is warm"]
  assert first.details["verdicts"][2] == {"verified": True, "pointable": False}
  assert first.details["units"] == ["a red car", "a blue bus"]
  assert first.details["covered"] == [True, False]
  assert first.details["prompt_version"] == prompts.PROMPT_VERSION == "balcap-judge-v1"
  assert (second.precision, second.recall, second.linguistic) == (1 / 3, 0.0, 0.25)
  assert math.isnan(no_reference.recall) and no_reference.failures == {"recall": "no_reference"}
  assert no_reference.precision == 1.0
  assert (empty.precision, empty.recall) == (0.0, 0.0) and not empty.failures
  assert all(not j.failures for j in (first, second))


def test_identical_references_are_decomposed_once_and_remembered():
  samples = [sample(f"ex/{j}", f"a red car number {j}", ["a red car", " a red car "])
             for j in range(4)]
  with FakeChatServer() as server:
    judge = LLMJudge(make_backend(server))
    judgements = judge.judge(samples)
    assert server.count("decompose", contains="a red car") == 4 + 1
    judge.judge(samples)   # the reference's units are remembered
    assert server.count("decompose", contains="a red car") == 2 * 4 + 1
  assert all(j.recall == 1.0 and j.details["units"] == ["a red car"] for j in judgements)


def test_missing_image_fails_precision_only():
  with FakeChatServer() as server:
    (judgement,) = LLMJudge(make_backend(server)).judge([sample("a/0", "a red car", image=None)])
    assert server.count("verify") == 0
  assert judgement.failures == {"precision": "judge_error"}
  assert (judgement.recall, judgement.linguistic) == (1.0, 0.75)


# Failures: NaN with the right cause, retried only when a retry can help


def test_http_400_fails_at_once_without_retry():
  with FakeChatServer() as server:
    (judgement,) = LLMJudge(make_backend(server)).judge([sample("a/0", "a car ERROR400")])
    assert server.count(contains="ERROR400") == 3   # decompose, rate, cover: one try each
  assert judgement.failures == {"precision": "http_error", "recall": "http_error",
                                "linguistic": "http_error"}
  assert all(math.isnan(x) for x in (judgement.precision, judgement.recall,
                                     judgement.linguistic))


@pytest.mark.parametrize("cue", ["ERROR500", "ERROR429"])
def test_5xx_and_429_are_retried_then_fail(cue):
  with FakeChatServer() as server:
    replies = make_backend(server, max_retries=2).complete([chat("r0", f"hi {cue}")])
    assert server.count(contains=cue) == 3
  assert replies == [ChatReply("r0", failure="http_error")]


def test_transient_5xx_is_retried_until_success():
  seen = []

  def flaky(request):
    seen.append(request.text)
    return Reply(status=503, body={}) if seen.count(request.text) <= 2 else None
  with FakeChatServer(script=flaky) as server:
    replies = make_backend(server, max_retries=3).complete([chat("r0", "a"), chat("r1", "b")])
    assert server.count() == 6
  assert replies == [ChatReply("r0", text="echo: a"), ChatReply("r1", text="echo: b")]


def test_retry_after_is_honoured_and_capped():
  def once(request):
    once.calls += 1
    return Reply(status=429, body={}, headers={"Retry-After": "0.3"}) if once.calls == 1 else None
  once.calls = 0
  with FakeChatServer(script=once) as server:
    start = time.monotonic()
    replies = make_backend(server).complete([chat("r0", "once")])
    assert time.monotonic() - start >= 0.3 and replies[0].text == "echo: once"
  with FakeChatServer(retry_after="30") as server:
    start = time.monotonic()
    replies = make_backend(server, max_retries=1, retry_after_cap_s=0.05).complete(
        [chat("r0", "ERROR429")])
    assert time.monotonic() - start < 2.0 and server.count() == 2
  assert replies[0].failure == "http_error"


def test_timeouts_are_retried_then_fail():
  with FakeChatServer(slow_s=2.0) as server:
    start = time.monotonic()
    replies = make_backend(server, timeout_s=0.2, max_retries=1).complete(
        [chat("slow", "SLOW"), chat("fast", "fast")])
    elapsed = time.monotonic() - start
    assert server.count(contains="SLOW") == 2
  assert replies == [ChatReply("slow", failure="timeout"), ChatReply("fast", text="echo: fast")]
  assert elapsed < 1.5


def test_connection_refused_is_an_http_error():
  with FakeChatServer() as server:
    url = server.url
  backend = OpenAIChatBackend(url, "m", timeout_s=0.5, max_retries=1, backoff_s=0.001)
  assert backend.complete([chat("r0", "hi")]) == [ChatReply("r0", failure="http_error")]


def test_garbled_reply_is_retried_once_with_a_reminder():
  with FakeChatServer() as server:
    (judgement,) = LLMJudge(make_backend(server)).judge(
        [sample("a/0", "a red car. GARBLED", ["a red car"])])
    assert server.count("decompose", contains="GARBLED") == 2
    assert server.count("rate", contains="GARBLED") == 2
    retries = [r for r in server.requests if r.is_retry]
    assert all("could not be used" in r.body["messages"][-1]["content"] for r in retries)
  assert not judgement.failures
  assert (judgement.precision, judgement.recall, judgement.linguistic) == (1.0, 1.0, 0.75)


def test_reply_that_never_parses_is_a_parse_error():
  with FakeChatServer() as server:
    (judgement,) = LLMJudge(make_backend(server)).judge([sample("a/0", "a red car GARBAGE")])
    assert server.count("decompose", contains="GARBAGE") == 2   # one retry, no more
  assert judgement.failures == {"precision": "parse_error", "recall": "parse_error",
                                "linguistic": "parse_error"}


def test_failed_reference_fails_recall_of_every_sample_citing_it():
  samples = [sample(f"a/{j}", "a red car", ["a red car ERROR400"]) for j in range(3)]
  with FakeChatServer() as server:
    judgements = LLMJudge(make_backend(server)).judge(samples)
    assert server.count("decompose", contains="ERROR400") == 1
  assert all(j.failures == {"recall": "http_error"} and j.precision == 1.0 for j in judgements)


# Deadlines: a hang is the bug


def test_complete_returns_by_its_deadline():
  with FakeChatServer(slow_s=5.0) as server:
    backend = make_backend(server, timeout_s=10.0, deadline_s=0.5, max_concurrency=4)
    start = time.monotonic()
    replies = backend.complete([chat(f"r{j}", "SLOW") for j in range(12)] + [chat("ok", "hi")])
    elapsed = time.monotonic() - start
  assert elapsed < 1.5
  assert [r.id for r in replies] == [f"r{j}" for j in range(12)] + ["ok"]
  assert all(r.failure == "timeout" for r in replies[:12])


def test_judge_of_slow_captions_is_bounded_by_the_backend_deadline():
  with FakeChatServer(slow_s=5.0) as server:
    judge = LLMJudge(make_backend(server, timeout_s=10.0, deadline_s=0.4))
    start = time.monotonic()
    slow, fast = judge.judge([sample("a/0", "a SLOW car"), sample("a/1", "a red car")])
    elapsed = time.monotonic() - start
  assert elapsed < 2.5   # two rounds of at most 0.4 s each, plus slack
  assert slow.failures == {"precision": "timeout", "recall": "timeout", "linguistic": "timeout"}
  assert not fast.failures and fast.recall == 1.0


def test_judge_deadline_stops_further_rounds():
  class SlowGarbage:
    calls = 0

    def complete(self, requests, deadline=None):
      SlowGarbage.calls += 1
      time.sleep(0.2)
      return [ChatReply(r.id, text="no json here") for r in requests]
  judge = LLMJudge(SlowGarbage(), deadline_s=0.1)
  (judgement,) = judge.judge([sample("a/0", "a red car")])
  assert SlowGarbage.calls == 1   # the parse retries would need a second round
  assert judgement.failures == {"precision": "timeout", "recall": "timeout",
                                "linguistic": "timeout"}


def test_malformed_sample_costs_only_its_own_scores():
  with FakeChatServer() as server:
    bad, good = LLMJudge(make_backend(server)).judge(
        [Sample("a/0", None, ("a red car",), IMAGE), sample("a/1", "a red car")])
  assert set(bad.failures.values()) == {"judge_error"} and len(bad.failures) == 3
  assert (good.precision, good.recall, good.linguistic) == (1.0, 1.0, 0.75)


# Ids, cache, key


def test_ids_never_cross_when_replies_arrive_out_of_order():
  samples, expected = [], {}
  for k in range(40):
    good = [f"object{k}x{j} is red" for j in range(k % 4 + 1)]
    bad = [f"the mood{k}x{j} is calm" for j in range(k % 3)]
    missing = [f"missing{k}x{j}" for j in range(k % 2 + 1)]
    clumsy = " clumsy" if k % 5 == 0 else ""
    caption = ". ".join(good + bad) + clumsy
    samples.append(sample(f"ex{k}/0", caption, [". ".join([good[0]] + missing)]))
    expected[f"ex{k}/0"] = (len(good) / (len(good) + len(bad)), 1 / (1 + len(missing)),
                            0.25 if clumsy else 0.75)
  samples = samples[::3] + samples[1::3] + samples[2::3]
  with FakeChatServer(latency_s=0.03, seed=1) as server:
    judgements = LLMJudge(make_backend(server, max_concurrency=16)).judge(samples)
  assert [j.id for j in judgements] == [s.id for s in samples]
  for judgement in judgements:
    assert not judgement.failures
    assert (judgement.precision, judgement.recall, judgement.linguistic) == pytest.approx(
        expected[judgement.id])


def test_backend_answering_an_unknown_id_is_a_bug():
  class Confused:
    def complete(self, requests, deadline=None):
      return [ChatReply(r.id + "?", text="[]") for r in requests]
  with pytest.raises(AssertionError, match="unknown request id"):
    LLMJudge(Confused()).judge([sample("a/0", "a red car")])


def test_cache_hit_makes_no_request_and_survives_a_new_backend(tmp_path):
  path = str(tmp_path / "judge.sqlite")
  requests = [chat("r0", "a"), chat("r1", "b"), chat("bad", "ERROR500")]
  with FakeChatServer() as server:
    first = make_backend(server, cache_path=path, max_retries=0).complete(requests)
    assert server.count() == 3
    again = make_backend(server, cache_path=path, max_retries=0).complete(requests)
    assert server.count() == 4   # only the failure is asked again
    assert again == first and first[2].failure == "http_error"
    other_model = OpenAIChatBackend(server.url, "another-model", cache_path=path)
    other_model.complete(requests[:1])
    assert server.count() == 5   # the model is part of the key


def test_seed_and_prompt_version_key_the_cache_and_the_seed_reaches_the_server(tmp_path):
  path = str(tmp_path / "judge.sqlite")
  base = chat("r0", "same words")
  samples = [dataclasses.replace(base, id=f"s{k}", temperature=1.0, seed=k) for k in range(3)]
  with FakeChatServer() as server:
    backend = make_backend(server, cache_path=path, max_retries=0)
    backend.complete(samples)
    assert server.count() == 3                      # three samples, not one cached thrice
    assert sorted(r.body["seed"] for r in server.requests) == [0, 1, 2]
    backend.complete(samples)
    assert server.count() == 3                      # each sample cached on its own
    backend.complete([dataclasses.replace(base, version="eval-v2")])
    backend.complete([base])
    assert server.count() == 5                      # another wording version asks again


def test_judge_batch_is_served_from_cache(tmp_path):
  samples = [sample("a/0", "a red car. a dog"), sample("a/1", "a blue bus")]
  with FakeChatServer() as server:
    first = LLMJudge(make_backend(server, cache_path=str(tmp_path / "c.sqlite"))).judge(samples)
    count = server.count()
    again = LLMJudge(make_backend(server, cache_path=str(tmp_path / "c.sqlite"))).judge(samples)
    assert server.count() == count
  assert [(j.precision, j.recall, j.linguistic) for j in again] == [
      (j.precision, j.recall, j.linguistic) for j in first]


def test_api_key_is_sent_and_never_logged(monkeypatch, caplog):
  monkeypatch.setenv(KEY_ENV, SECRET)
  caplog.set_level(logging.DEBUG)
  with FakeChatServer() as server:
    backend = make_backend(server, api_key_env=KEY_ENV, max_retries=1)
    replies = backend.complete([chat("ok", "hi"), chat("e400", "ERROR400"),
                                chat("e500", "ERROR500")])
    (judgement,) = LLMJudge(backend).judge([sample("a/0", "a red car ERROR400")])
    headers = [r.headers.get("Authorization") for r in server.requests]
  assert set(headers) == {f"Bearer {SECRET}"}
  assert [r.failure for r in replies] == [None, "http_error", "http_error"]
  assert judgement.failures["linguistic"] == "http_error"
  assert "<api key>" in caplog.text   # the server echoed the key; the log line redacted it
  assert SECRET not in caplog.text
  assert SECRET not in repr(backend) and SECRET not in repr(LLMJudge(backend))
  monkeypatch.delenv(KEY_ENV)
  with pytest.raises(ValueError, match=KEY_ENV) as error:
    OpenAIChatBackend(server.url, "m", api_key_env=KEY_ENV)
  assert SECRET not in str(error.value)


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_base_url_with_or_without_v1(suffix):
  with FakeChatServer() as server:
    replies = OpenAIChatBackend(server.url + suffix, "m").complete([chat("r", "x")])
  assert replies == [ChatReply("r", text="echo: x")]


# Reply parsing


@pytest.mark.parametrize("text", [
    '["a", "b"]',
    '```json\n["a", "b"]\n```',
    'Sure, here they are:\n["a", "b"]\nLet me know if you need more.',
    '["a", "b",]',
    'Assertions [as asked]: ["a", "b" ,\n]',
    '{"assertions": ["a", "b"]}',
])
def test_lenient_json_extraction(text):
  assert prompts.parse_decomposition(text) == ["a", "b"]


@pytest.mark.parametrize("text, count, message", [
    ('[{"verified": true, "pointable": true}]', 2, "expected 2 items, got 1"),
    ('[{"verified": "yes", "pointable": true}]', 1, "expected true or false"),
    ('[{"verified": true}]', 1, "missing key"),
    ('[1,,]', 1, "no JSON value"),
    ('', 1, "empty reply"),
])
def test_wrong_shapes_raise_reply_error(text, count, message):
  with pytest.raises(json_reply.ReplyError, match=message):
    prompts.parse_verification(text, count)


def test_ratings_are_normalised_and_checked():
  assert prompts.parse_rating('{"clarity": 5, "fluency": 3, "coherence": 1}') == {
      "clarity": 1.0, "fluency": 0.5, "coherence": 0.0}
  with pytest.raises(json_reply.ReplyError, match="outside"):
    prompts.parse_rating('{"clarity": 6, "fluency": 3, "coherence": 1}')
  with pytest.raises(json_reply.ReplyError, match="expected a number"):
    prompts.parse_rating('{"clarity": true, "fluency": 3, "coherence": 1}')


def test_the_configured_deadline_bounds_a_judge_call_whose_server_never_answers(tmp_path):
  # A server that accepts connections and never answers. Before, deadline_s stopped only new
  # rounds: one round lasted (max_retries + 1) x timeout_s + backoff (24.5 s for these
  # settings with deadline 3 s, timeout 5 s).
  import socket  # pylint: disable=import-outside-toplevel
  from balcap import configs  # pylint: disable=import-outside-toplevel
  from balcap.rl.rewards import factory  # pylint: disable=import-outside-toplevel
  with socket.socket() as silent:
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    config = configs.base_config()
    config.rewards.judge = "openai"
    config.rewards.openai.base_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    config.rewards.openai.model = "judge"
    config.rewards.openai.timeout_s = 5.0
    config.rewards.openai.max_retries = 3
    config.rewards.deadline_s = 1.5
    reward = factory.reward_from_config(config, str(tmp_path))
    started = time.monotonic()
    batch = reward([sample("a/0", "a red car"), sample("b/0", "a blue car")])
    elapsed = time.monotonic() - started
  assert elapsed < 3.0, elapsed
  assert batch.failures[("precision", "timeout")] == 2
  assert batch.failures[("linguistic", "timeout")] == 2


def test_backend_takes_the_earlier_of_its_own_and_the_callers_deadline():
  with FakeChatServer(slow_s=5.0) as server:
    backend = make_backend(server, timeout_s=10.0, deadline_s=30.0)
    start = time.monotonic()
    (reply,) = backend.complete([chat("r", "SLOW")], deadline=time.monotonic() + 0.3)
  assert time.monotonic() - start < 1.5 and reply.failure == "timeout"
