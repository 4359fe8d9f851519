"""The judge overlapped with sampling (`config.rl.async_rewards`) against the judge in series,
side by side in one run, with a judge as slow as the step's own device work.

    python benchmarks/async_rewards.py [--steps 6] [--latency auto|SECONDS] [--new-tokens N]

The step is the CPU demo's (configs/tiny.py: 8 prompts x G 8, 224 px CapWorld images, up to 96
new tokens, the ~1M-parameter policy at random init, so every rollout runs to the limit: the
demo's worst case). The judge is the exact CapWorld judge behind a fixed sleep per batch,
standing in for an LLM server: it holds no lock and no core while it waits, as a network call
would not. `--latency auto` first measures the step's device time with the sleep at 0 (its
median over `--steps` steps) and then uses that as the sleep: the case the method was built
for, where judging takes as long as everything else.

Printed: the median step time with async_rewards off and on (same latency, same process,
warmed up alike), their ratio, and where each mode's time goes (sampling, waiting for the
judge, the update). Off, a step takes its device time plus the judge's; on, about the larger of
the two (the judge of step t runs while step t+1 samples and step t updates).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from balcap import models, parallel, train_state  # pylint: disable=wrong-import-position
from balcap.data import datasets, pipeline  # pylint: disable=wrong-import-position
from balcap.rl import learner  # pylint: disable=wrong-import-position
from balcap.rl.rewards import factory, functions  # pylint: disable=wrong-import-position
from testlib import load_config_file  # pylint: disable=wrong-import-position


class SleepingJudge:
  """`inner`'s judgements, each batch after `seconds` of waiting (an LLM server's latency)."""

  def __init__(self, inner, seconds: float):
    self.inner, self.seconds = inner, seconds
    self.name = f"{inner.name}+sleep"

  def judge(self, samples):
    time.sleep(self.seconds)
    return self.inner.judge(samples)


def demo_config(data_dir: str, async_rewards: bool, new_tokens: int | None = None):
  config = load_config_file("tiny")
  if new_tokens:
    config.sampling.max_new_tokens = new_tokens
  config.data.data_dir = data_dir
  config.data.capworld.num_train = 64  # the step reads 8 a time; generating 4,000 is minutes
  config.data.capworld.num_validation = config.data.capworld.num_test = 8
  config.rl.async_rewards = async_rewards
  config.rl.sample_table_every = config.rl.eval_every = 0
  config.rl.num_steps = 10_000  # never the last step: the step always samples ahead
  return config


class Run:
  """One mode's RL step driven by hand (no checkpoints: only the step is timed)."""

  def __init__(self, config, judge, policy):
    builder = datasets.prepare(config.data)
    iterator = pipeline.train_iterator(
        datasets.open_split(builder, config.data.train_split),
        batch_size=parallel.host_batch_size(config.rl.batch_size), seed=config.seed + 1,
        read_threads=1)
    self.iterator = pipeline.Lookahead(iterator) if config.rl.async_rewards else iterator
    self.reward = functions.JudgeReward(judge)
    self.step_fn = learner.RLStep(config, "/nonexistent", policy, self.reward,
                                  lookahead=self.iterator if config.rl.async_rewards else None)
    # Its own copy of the params: each update donates (deletes) the ones it was given.
    own = dataclasses.replace(policy, params=jax.tree.map(jnp.copy, policy.params))
    self.state = train_state.initial_state(own, self.step_fn.optimizer, config.seed)
    if config.rl.async_rewards:
      self.state["inflight"] = self.step_fn.empty_inflight()
    self.step = 0

  def steps(self, count: int) -> list[dict[str, float]]:
    timings = []
    for _ in range(count):
      self.step += 1
      started = time.perf_counter()
      self.state, step_metrics = self.step_fn(self.state, next(self.iterator), self.step)
      timings.append({"wall": time.perf_counter() - started,
                      **{k[5:]: v for k, v in step_metrics.items() if k.startswith("time/")}})
    return timings


def median(timings, key):
  return statistics.median(t.get(key, 0.0) for t in timings)


def main(argv=None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=6, help="timed steps per mode")
  parser.add_argument("--latency", default="auto",
                      help="the judge's seconds per batch; auto = the step's device time")
  parser.add_argument("--new-tokens", type=int, default=0,
                      help="sampling.max_new_tokens (default: the demo's 96)")
  args = parser.parse_args(argv)

  data_dir = tempfile.mkdtemp(prefix="balcap-bench-async-")
  base = demo_config(data_dir, False, args.new_tokens)
  mesh = parallel.make_mesh(base.mesh)
  policy = models.policy_from_config(base.model, jax.random.key(base.seed), mesh=mesh)
  capworld = factory.judge_from_config(base, data_dir, mesh=mesh)
  judge = SleepingJudge(capworld, 0.0)

  runs = {mode: Run(demo_config(data_dir, mode == "on", args.new_tokens), judge, policy)
          for mode in ("off", "on")}
  for run in runs.values():
    run.steps(2)  # compiles: the first step, then the one-step-old (async) / scoring path
  if args.latency == "auto":
    device = median(runs["off"].steps(args.steps), "wall")
    print(f"device time of a step (judge latency 0, async off): {device:.2f} s (median of "
          f"{args.steps})")
  else:
    device = float(args.latency)
  judge.seconds = device

  results = {}
  for mode, run in runs.items():
    timings = run.steps(args.steps)
    results[mode] = timings
    print(f"async_rewards {mode:3s}: step {median(timings, 'wall'):6.2f} s  (median of "
          f"{args.steps}; sample {median(timings, 'sample'):.2f}, sample ahead "
          f"{median(timings, 'sample_ahead'):.2f}, judge wait {median(timings, 'reward_wait'):.2f}"
          f", update {median(timings, 'update'):.2f})")
  ratio = median(results["on"], "wall") / median(results["off"], "wall")
  print(f"judge latency {device:.2f} s per batch: on / off = {ratio:.2f}")
  for run in runs.values():
    run.reward.close()
  return {"latency": device, "ratio": ratio,
          **{f"{mode}/{key}": median(timings, key) for mode, timings in results.items()
             for key in ("wall", "reward_wait", "sample_ahead")}}


if __name__ == "__main__":
  main()
