"""Reward throughput: the HTTP judge client against a local fake server, and CapWorldJudge.

    python benchmarks/rewards.py [--requests 2000] [--samples 256] [--capworld 512] [--in-process]

The server answers at once; it runs in a child process (forked) so that it does not share
the client's GIL, unless --in-process. Printed, best of --repeats calls:
  (a) raw client: chat requests/s through OpenAIChatBackend.complete at concurrency 64;
  (b) end to end: LLMJudge samples/s on a batch of --samples captions (8 rollouts per image,
      448 px images sent as PNG data URLs; 2 rounds: 4 requests per sample + references),
      and the judge's requests/s;
  (c) CapWorldJudge captions/s on a batch of --capworld SFT captions (the exact judge: parse,
      ground, verify, cover, rate; no model).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

# pylint: disable=wrong-import-position
import numpy as np

from balcap.data.capworld.generate import CapWorldSpec, make_example
from balcap.rl.rewards.capworld_judge import CapWorldJudge
from balcap.chat.protocol import ChatRequest
from balcap.rl.rewards.llm_judge import LLMJudge
from balcap.chat.openai_backend import OpenAIChatBackend
from balcap.rl.rewards.types import Sample
from rl.fake_chat_server import FakeChatServer


def _serve(connection) -> None:
  with FakeChatServer() as server:
    connection.send(server.url)
    connection.recv()   # until the parent says stop


class _ServerProcess:
  def __enter__(self) -> "_ServerProcess":
    parent, child = multiprocessing.get_context("fork").Pipe()
    self._connection = parent
    self._process = multiprocessing.get_context("fork").Process(target=_serve, args=(child,),
                                                                daemon=True)
    self._process.start()
    self.url = parent.recv()
    return self

  def __exit__(self, *exc) -> None:
    self._connection.send("stop")
    self._process.join(timeout=5)


def _samples(count: int, rollouts: int = 8, size: int = 448) -> list[Sample]:
  """Captions of 6-10 short assertions; one smooth image and one reference per example."""
  ramp = np.linspace(0, 255, size, dtype=np.float32)
  samples = []
  for example in range((count + rollouts - 1) // rollouts):
    image = np.stack([np.add.outer(ramp, ramp * 0) % 256,
                      np.add.outer(ramp * 0, ramp) % 256,
                      np.full((size, size), 37 * example % 256, np.float32)], -1).astype(np.uint8)
    reference = (f"a red car {example}. people queue at a counter. a dog sleeps on a mat. "
                 f"a blue sign reads open")
    for j in range(rollouts):
      facts = [f"a red car {example}", "people queue at a counter", f"{j + 2} birds fly",
               "the mood is warm", "a tree stands by the road", "a blue sign reads open"]
      samples.append(Sample(f"ex{example}/{j}", ". ".join(facts[:4 + j % 3]) + ".",
                            (reference,), image))
  return samples[:count]


def _capworld_samples(count: int) -> list[Sample]:
  """SFT captions of CapWorld examples (8 per example, like rollouts) with their context."""
  spec = CapWorldSpec(image_sizes=((224, 224),))
  samples = []
  for index in range(-(-count // 8)):
    example = make_example(spec, "train", index)
    for rollout in range(8):
      caption = example["sft_caption"] if rollout % 2 else example["references"][0]
      samples.append(Sample(f"{example['id']}/{rollout}", caption,
                            tuple(example["references"]),
                            fields={"scene_graph": example["scene_graph"]}))
  return samples[:count]


def _best(repeats: int, fn) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--requests", type=int, default=2000)
  parser.add_argument("--samples", type=int, default=256)
  parser.add_argument("--concurrency", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--capworld", type=int, default=512)
  parser.add_argument("--in-process", action="store_true")
  args = parser.parse_args()

  server = FakeChatServer() if args.in_process else _ServerProcess()
  with server:
    backend = OpenAIChatBackend(server.url, "fake-judge", max_concurrency=args.concurrency,
                                timeout_s=30, deadline_s=300)
    requests = [ChatRequest(f"r{i}", [{"role": "user", "content": f"say {i}"}])
                for i in range(args.requests)]
    backend.complete(requests[:args.concurrency])   # open the kept-alive connections
    seconds = _best(args.repeats, lambda: _check(backend.complete(requests)))
    print(f"raw client: {args.requests} requests at concurrency {args.concurrency}: "
          f"{args.requests / seconds:,.0f} requests/s ({seconds:.2f} s)")

    samples = _samples(args.samples)
    judgements = []

    def judge_once():
      # A fresh judge each call, so references are decomposed every time as in a new run.
      judgements[:] = LLMJudge(backend).judge(samples)
    seconds = _best(args.repeats, judge_once)
    failed = sum(bool(j.failures) for j in judgements)
    num_requests = 4 * len(samples) + len({s.references for s in samples})
    print(f"end to end: {len(samples)} samples: {len(samples) / seconds:,.0f} samples/s, "
          f"{num_requests / seconds:,.0f} requests/s ({seconds:.2f} s, {failed} failed)")
  capworld = _capworld_samples(args.capworld)
  seconds = _best(args.repeats, lambda: CapWorldJudge().judge(capworld))
  print(f"CapWorldJudge: {len(capworld)} captions: {len(capworld) / seconds:,.0f} captions/s "
        f"({seconds:.2f} s)")
  where = "in this process" if args.in_process else "in a forked child process"
  print(f"server {where}; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}")


def _check(replies) -> None:
  bad = [r for r in replies if not r.ok]
  if bad:
    raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0]}")


if __name__ == "__main__":
  main()
