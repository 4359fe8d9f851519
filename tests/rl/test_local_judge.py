"""A balcap policy as the judge: request rendering, ordered replies, deadline, isolation."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from balcap import models, sampling
from balcap.chat import images, local_backend
from balcap.chat.protocol import ChatRequest
from balcap.rl.rewards import llm_judge, prompts
from balcap.rl.rewards.types import Sample
from qwen_fixtures import tiny_config, write_checkpoint
from testlib import QWEN_TOKENIZER_DIR, REPO


@pytest.fixture(scope="module")
def judge_policy(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("judge"))
  write_checkpoint(folder, tiny_config(vocab_size=151936, image_id=151655, video_id=151656,
                                       vision_start=151652, vision_end=151653, tie=True), seed=7)
  shutil.copy(os.path.join(QWEN_TOKENIZER_DIR, "tokenizer.json"), folder)
  return models.load_pretrained(folder, scan_layers=False)


def image(seed, size=(56, 56)):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, size + (3,), np.uint8))


def test_requests_render_with_system_prompt_images_and_reminders():
  messages = prompts.with_reminder(
      prompts.verification_messages(["a red circle"], images.image_data_url(image(0))),
      "expected 1 verdicts")
  system, text, shown = local_backend.render(ChatRequest("s#verify", messages))
  assert system == prompts.SYSTEM_PROMPTS["verify"]
  assert "a red circle" in text and "expected 1 verdicts" in text
  assert text.index("a red circle") < text.index("expected 1 verdicts")
  assert len(shown) == 1 and np.array_equal(np.asarray(shown[0]), np.asarray(image(0)))


def test_replies_come_in_order_and_equal_greedy_sampling(judge_policy):
  backend = local_backend.LocalChatBackend(judge_policy, max_new_tokens=8, batch_size=2)
  requests = [ChatRequest(f"s{i}#rate", prompts.rating_messages(f"caption number {i}"))
              for i in range(3)]
  requests.append(ChatRequest("s3#verify", prompts.verification_messages(
      ["a square"], images.image_data_url(image(1)))))
  replies = backend.complete(requests)
  assert [r.id for r in replies] == [r.id for r in requests] and all(r.ok for r in replies)
  # The same answer as sampling the rendered prompt directly, greedily.
  processor = backend._processor(prompts.SYSTEM_PROMPTS["rate"])  # pylint: disable=protected-access
  batch = processor(prompts=[local_backend.render(requests[0])[1]])
  direct = sampling.generate(judge_policy, judge_policy.params, batch, jax.random.key(0),
                             max_new_tokens=8, temperature=0.0)
  expected = processor.decode(np.asarray(direct.tokens)[0, :int(direct.lengths[0])])
  assert replies[0].text == expected


def test_a_bad_request_fails_alone_and_the_deadline_is_kept(judge_policy):
  backend = local_backend.LocalChatBackend(judge_policy, max_new_tokens=4)
  bad = ChatRequest("bad#rate", [{"role": "user", "content": [{"type": "audio"}]}])
  good = ChatRequest("good#rate", prompts.rating_messages("a caption"))
  replies = backend.complete([bad, good])
  assert replies[0].failure == "judge_error" and replies[1].ok
  late = local_backend.LocalChatBackend(judge_policy, deadline_s=0.0)
  assert [r.failure for r in late.complete([good])] == ["timeout"]


def test_local_judge_scores_or_explains_every_sample(judge_policy):
  judge = llm_judge.LocalJudge(judge_policy, max_new_tokens=16)
  samples = [Sample(f"ex{i}/0", f"a red circle {i}", ("a red circle on the left",),
                    image=image(i)) for i in range(2)]
  judgements = judge.judge(samples)
  assert [j.id for j in judgements] == ["ex0/0", "ex1/0"]
  for j in judgements:  # a random model writes no JSON: NaN with a cause, never a crash
    for component in ("precision", "recall", "linguistic"):
      value = getattr(j, component)
      assert (not math.isnan(value)) or j.failures[component] == "parse_error"


def test_two_hosts_judging_different_loads_stay_in_step(tmp_path_factory):
  # Each host has other samples (other requests, parse retries, chunk counts) and, in the
  # second call, only host 0 is past its deadline. Before, the sampler ran on each host's
  # reward thread with its own schedule: the hosts' collectives crossed and hung.
  folder = str(tmp_path_factory.mktemp("judge_2hosts"))
  write_checkpoint(folder, tiny_config(vocab_size=151936, image_id=151655, video_id=151656,
                                       vision_start=151652, vision_end=151653, tie=True), seed=7)
  shutil.copy(os.path.join(QWEN_TOKENIZER_DIR, "tokenizer.json"), folder)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  program = str(REPO / "tests" / "local_judge_program.py")
  hosts = [subprocess.Popen(
      [sys.executable, program, folder, "distributed"], stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=f"{REPO}:{REPO / 'tests'}", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))) for i in range(2)]
  outputs = []
  try:
    for host in hosts:
      outputs.append(host.communicate(timeout=300)[0])
  finally:
    for host in hosts:
      host.kill()
  for host, output in zip(hosts, outputs):
    assert host.returncode == 0, output
  judged = [[json.loads(line.split(" ", 1)[1]) for line in output.splitlines()
             if line.startswith("JUDGED")] for output in outputs]
  assert [len(calls) for calls in judged] == [2, 2]
  assert [row[0] for row in judged[0][0]] == ["h0-0/0", "h0-1/0", "h0-2/0"]
  assert [row[0] for row in judged[1][0]] == ["h1-0/0"]
  for calls in judged:
    for _, scores, failures in calls[0]:  # scored, or NaN with a cause: never a hang
      assert all(value is not None or name in failures for name, value in scores.items())
      # The model answered (a random one writes no JSON): no chunk failed on the devices.
      assert "judge_error" not in failures.values(), calls[0]
  # Host 0 was past its deadline in the second call: it timed out everything there ...
  # (the empty caption's precision is 0 without asking: nothing to time out).
  assert all(set(f.values()) == {"timeout"} for _, _, f in judged[0][1])
  assert [len(f) for _, _, f in judged[0][1]] == [3, 2, 3]
  # ... and host 1 agreed to stop with it instead of waiting for it forever.
  assert all("timeout" in f.values() for _, _, f in judged[1][1])


def test_a_row_the_processor_refuses_fails_alone(judge_policy):
  # Text holding a special token is refused by the processor; on a pod the chunk must still
  # run (a blank row in its place), so only that request fails.
  backend = local_backend.LocalChatBackend(judge_policy, max_new_tokens=4, batch_size=4)
  good = [ChatRequest(f"g{i}#rate", prompts.rating_messages(f"caption {i}")) for i in range(2)]
  bad = ChatRequest("bad#rate", prompts.rating_messages("a caption <|image_pad|> here"))
  replies = backend.complete([good[0], bad, good[1]])
  assert [r.id for r in replies] == ["g0#rate", "bad#rate", "g1#rate"]
  assert replies[1].failure == "judge_error" and replies[0].ok and replies[2].ok
