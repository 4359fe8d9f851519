"""Mode eval's judge drivers: seconds per caption with an instant judge (balcap's own cost).

    python benchmarks/eval_judges.py [--items 100] [--latency 0.0]

A local OpenAI-compatible server (tests/rl/fake_chat_server.py, answering by the rules of
tests/evals/scripted_judge.py, each reply after uniform(0, --latency) s) judges --items
captions of DeCapBench, CaptionQA (3 questions each) and CapArena-Auto fixtures, through the
HTTP client with its sqlite cache: cold (every ask sent), then warm (a re-run, answered by the
cache). Prints asks, seconds and seconds per caption of each, and the classic metrics'.
With --latency 0 it measures what balcap adds per caption (prompts, images as data URLs,
parsing, scoring, the cache); a real 72B judge's seconds per ask dominate it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

# pylint: disable=wrong-import-position
from balcap.chat.openai_backend import OpenAIChatBackend
from balcap.evals import benchmark_data, benchmarks, classic
from evals import benchmark_fixtures, scripted_judge
from rl.fake_chat_server import FakeChatServer, Reply

CAPTION = ("A red cube {i}. A blue ball. A lovely wooden table. A small unicorn in the corner. "
           "Two green cylinders stand near a yellow cone.")


def main(argv=None) -> dict[str, dict[str, float]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--items", type=int, default=100)
  parser.add_argument("--latency", type=float, default=0.0)
  args = parser.parse_args(argv)
  folder = tempfile.mkdtemp(prefix="balcap_eval_bench_")
  data = {
      "dcscore": benchmark_data.load_decapbench(
          benchmark_fixtures.decapbench(os.path.join(folder, "decap"), args.items)),
      "captionqa": benchmark_data.load_captionqa(
          benchmark_fixtures.captionqa(os.path.join(folder, "cqa"), args.items)),
      "caparena": benchmark_data.load_caparena(
          benchmark_fixtures.caparena(os.path.join(folder, "arena"), args.items))}
  results = {}
  script = lambda request: Reply(content=scripted_judge.answer(request.body["messages"]))
  with FakeChatServer(script=script, latency_s=args.latency) as server:
    backend = OpenAIChatBackend(server.url, "scripted", max_concurrency=32,
                                cache_path=os.path.join(folder, "cache.sqlite"))
    print(f"{'benchmark':10s} {'pass':5s} {'captions':>8s} {'asks':>6s} {'seconds':>8s} "
          f"{'s/caption':>10s}")
    for name, items in data.items():
      captions = {item.id: CAPTION.format(i=k) for k, item in enumerate(items)}
      for label in ("cold", "warm"):
        before = server.count()
        started = time.perf_counter()
        summary, _ = benchmarks.DRIVERS[name](backend, items, captions)
        seconds = time.perf_counter() - started
        asks = server.count() - before
        results[f"{name}/{label}"] = {"seconds_per_caption": seconds / len(items),
                                      "asks": asks, "invalid": summary.get("invalid", 0)}
        print(f"{name:10s} {label:5s} {len(items):8d} {asks:6d} {seconds:8.2f} "
              f"{seconds / len(items):10.4f}")
    backend.close()
  pairs = {item.id: (CAPTION.format(i=k), [item.oracle_caption])
           for k, item in enumerate(data["dcscore"])}
  started = time.perf_counter()
  classic.pure_python(pairs)
  seconds = time.perf_counter() - started
  results["classic/pure_python"] = {"seconds_per_caption": seconds / len(pairs)}
  print(f"{'classic':10s} {'pure':5s} {len(pairs):8d} {0:6d} {seconds:8.2f} "
        f"{seconds / len(pairs):10.4f}")
  return results


if __name__ == "__main__":
  main()
