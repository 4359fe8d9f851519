"""The RL stage of mode `train`: c-GDPO (or a baseline) on the configured data and judge.

One step, for each host's shard of `config.rl.batch_size` prompts:
  1. sample G rollouts per prompt with the current params (`balcap.sampling`);
  2. submit the captions to the judge on a host thread (`JudgeReward.submit`) and, meanwhile,
     build the teacher-forced batch on the devices from the sampler's inputs and outputs and
     compute the rollouts' logprobs under the current ("old") params and, when the KL term
     is on, under the frozen reference (images encoded once, micro-batched like the update);
  3. collect the rewards (NaN where unscored; a missed deadline is NaN, not a wait), shape and
     normalise them into one advantage per rollout (`rl/advantages.py`);
  4. update: mu passes of micro-batched gradient accumulation and AdamW (`rl/update.py`).
The loop, checkpoints (workdir/rl), resume, SIGTERM and metrics are `balcap.loop`'s. The step's
PRNG key is folded from the run's seed and the step number, so a resumed run samples exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from balcap import loop, optim, parallel, sampling, scoring, train_state
from balcap.data import datasets, pipeline
from balcap.evals import captioning
from balcap.rl import advantages as advantages_lib
from balcap.rl import losses, update
from balcap.rl.rewards import functions

log = logging.getLogger(__name__)

CONTINUATION_BUCKET = 32  # tokens: the update compiles once per multiple in use


class RLStep:
  """The host side of one step (see the module docstring); called by `balcap.loop`.

  Data flows one way: the prompts are prepared once (host) and placed once; the sampler's
  inputs and outputs stay on the devices and become the scoring and update batch there
  (`scoring.continuations`); the host takes only its own rows' tokens (to decode captions for
  the judge) from its own shards, and gives back only rewards."""

  def __init__(self, config, workdir: str, policy, reward: functions.JudgeReward,
               ref_params: Any = None, eval_source=None):
    self.config, self.workdir, self.policy, self.reward = config, workdir, policy, reward
    self.ref_params = ref_params
    self.eval_source = eval_source
    rl = config.rl
    self.group = rl.group_size
    self.host_prompts = parallel.host_batch_size(rl.batch_size)
    rows = self.host_prompts * self.group * jax.process_count()
    self.micro_batches = rows // rl.micro_batch_size if rl.micro_batch_size else 1
    shards = parallel.host_rows_multiple(policy.mesh) * jax.process_count()
    if (rows // self.micro_batches) % shards:
      raise ValueError(
          f"config.rl.micro_batch_size={rl.micro_batch_size}: each micro-batch of "
          f"{rows // self.micro_batches} rollouts must spread evenly over the mesh's {shards} "
          "batch shards (data x fsdp); use a multiple of "
          f"{shards}")
    self.loss_config = losses.from_config(rl.loss)
    self.advantage_config = advantages_lib.from_config(config.advantage)
    self.optimizer = optim.make_optimizer(optim.from_config(rl.optimizer),
                                          total_steps=rl.num_steps)
    sampling_config = config.sampling
    self.spec = sampling.sampling_params(
        policy, max_new_tokens=sampling_config.max_new_tokens, num_samples=self.group,
        temperature=sampling_config.temperature, top_p=sampling_config.top_p,
        top_k=sampling_config.top_k)
    self.temperature = self.spec.temperature or 1.0
    self.update = update.make_update(
        policy.module, self.optimizer, self.loss_config, num_micro_batches=self.micro_batches,
        num_passes=rl.num_inner_updates, temperature=self.temperature, mesh=policy.mesh)
    self._advantages = jax.jit(lambda r, q: advantages_lib.compute(self.advantage_config, r, q))
    self.base_key = jax.random.key(config.seed)

  # The phases of a step, in order ---------------------------------------------------------

  def prompts(self, examples: dict[str, Any]) -> dict[str, Any]:
    """This host's examples as the sampler's inputs, prepared once and placed on the devices
    ("start" [B]: each prompt's first decode position)."""
    policy = self.policy
    images = [Image.fromarray(np.asarray(image)) for image in examples["image"]]
    chats = policy.processor(prompts=[self.config.sampling.prompt] * len(images),
                             images=images)
    prepared = sampling.prepare_prompts(policy, chats, self.config.sampling.prompt_bucket)
    inputs = {k: prepared[k] for k in sampling.SAMPLER_INPUTS if prepared.get(k) is not None}
    inputs["start"] = policy.family.decode_start(policy.config, prepared).astype(np.int32)
    return parallel.global_inputs(inputs, policy.mesh)

  def sample(self, params, prompts: dict[str, Any], key) -> sampling.Rollouts:
    inputs = {k: v for k, v in prompts.items() if k != "start"}
    return sampling.generate_prepared(self.policy, params, inputs, prompts["start"], key,
                                      self.spec)

  def continuations(self, prompts: dict[str, Any], rollouts: sampling.Rollouts
                    ) -> scoring.Continuations:
    """The rollouts as teacher-forced rows, on the devices. They are trained on up to the
    longest rollout of the GLOBAL batch, rounded up to a multiple of CONTINUATION_BUCKET:
    rows padded to max_new_tokens would cost the update as much as the longest possible
    caption, while a few buckets bound the compiled programs."""
    longest = int(jax.device_get(_longest(rollouts.lengths)))  # replicated: every host agrees
    steps = min(-(-max(longest, 1) // CONTINUATION_BUCKET) * CONTINUATION_BUCKET,
                self.spec.max_new_tokens)
    inputs = {k: v for k, v in prompts.items() if k != "start"}
    return scoring.continuations(inputs, prompts["start"], _first_columns(rollouts.tokens,
                                                                           steps),
                                 rollouts.lengths, self.group, self.policy.mesh)

  def score(self, params, batch: scoring.Continuations):
    """Old (and, KL on, reference) logprobs [R, N], micro-batched like the update."""
    old = scoring.continuation_logprobs(self.policy, params, batch, self.temperature,
                                        self.micro_batches)
    ref = None
    if self.ref_params is not None:
      ref = scoring.continuation_logprobs(self.policy, self.ref_params, batch,
                                          self.temperature, self.micro_batches)
    return old, ref

  def advantages(self, rewards: functions.RewardBatch):
    """One advantage per rollout [R] (global: c-GDPO normalises over every host's)."""
    shape = (self.host_prompts, self.group)
    shaped = parallel.global_inputs(
        {name: rewards.components[name].reshape(shape).astype(np.float32)
         for name in (*self.advantage_config.components, "length_ratio")}, self.policy.mesh)
    ratio = shaped.pop("length_ratio")
    advantages, stats = self._advantages(shaped, ratio)
    return advantages.reshape(-1), stats

  # The step -------------------------------------------------------------------------------

  def __call__(self, state: dict[str, Any], examples: dict[str, Any], step: int):
    timings, started = {}, time.perf_counter()
    config = self.config
    key = jax.random.fold_in(self.base_key, step)
    prompts = self.prompts(examples)
    rollouts = self.sample(state["params"], prompts, key)
    captions = captioning.decode(self.policy, rollouts)  # waits for the sampler
    timings["sample"] = time.perf_counter() - started

    rows = [{k: examples[k][i] for k in examples} for i in range(len(captions) // self.group)]
    samples = functions.make_samples(rows, captions, self.group)
    pending = self.reward.submit(samples)

    continuations = self.continuations(prompts, rollouts)
    old_logprobs, ref_logprobs = self.score(state["params"], continuations)
    reward_started = time.perf_counter()
    rewards = self.reward.result(pending, samples, config.rewards.deadline_s)
    timings["reward_wait"] = time.perf_counter() - reward_started
    advantages, advantage_stats = self.advantages(rewards)

    update_started = time.perf_counter()
    batch = update.RolloutBatch(continuations, old_logprobs, advantages, ref_logprobs)
    state, update_metrics = self.update(state, batch)
    jax.block_until_ready(state["step"])
    timings["update"] = time.perf_counter() - update_started

    metrics = {**rewards.metrics(), **advantage_stats, **update_metrics}
    metrics.update(_rollout_metrics(rollouts, continuations, old_logprobs))
    metrics.update(_caption_metrics(samples, rewards))
    total = time.perf_counter() - started
    metrics.update({f"time/{k}": v for k, v in timings.items()})
    metrics["time/step"] = total
    metrics["throughput/rollout_tokens_per_second"] = metrics.pop("_tokens") / total
    metrics["learning_rate"] = float(optim.learning_rate_schedule(
        optim.from_config(config.rl.optimizer), config.rl.num_steps)(step - 1))
    if config.rl.sample_table_every and step % config.rl.sample_table_every == 0:
      metrics["_texts"] = self._sample_table(step, samples, rewards,
                                             parallel.host_local(advantages))
    if config.rl.eval_every and step % config.rl.eval_every == 0 and self.eval_source:
      eval_metrics, _ = self.evaluate(state["params"], config.rl.eval_examples)
      metrics.update({f"eval/{k}": v for k, v in eval_metrics.items()})
    return state, metrics

  def _sample_table(self, step, samples, rewards, advantages, rows: int = 8) -> dict[str, str]:
    """A few captions with their rewards: JSONL in workdir/samples.jsonl, markdown for TB."""
    flat = advantages.reshape(-1)
    entries = []
    for i, sample in enumerate(samples[:rows]):
      entries.append({"step": step, "id": sample.id, "caption": sample.caption,
                      **{c: float(rewards.components[c][i]) for c in functions.COMPONENTS},
                      "advantage": float(flat[i])})
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "samples.jsonl"), "a", encoding="utf-8") as f:
        for entry in entries:
          f.write(json.dumps(entry) + "\n")
    header = "| id | precision | recall | linguistic | ratio | advantage | caption |\n" + (
        "|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {e['id']} | {e['precision']:.2f} | {e['recall']:.2f} | "
                   f"{e['linguistic']:.2f} | {e['length_ratio']:.2f} | {e['advantage']:+.2f} | "
                   f"{e['caption'][:300]} |\n" for e in entries)
    return {"samples": header + body}

  def evaluate(self, params, num_examples: int):
    config = self.config
    return captioning.evaluate(
        self.policy, params, self.eval_source, self.reward, prompt=config.sampling.prompt,
        max_new_tokens=config.sampling.max_new_tokens,
        batch_size=parallel.host_batch_size(config.batch_size), num_examples=num_examples,
        prompt_bucket=config.sampling.prompt_bucket)


@jax.jit
def _longest(lengths):
  return jnp.max(lengths)


@functools.partial(jax.jit, static_argnums=1)
def _first_columns(tokens, steps):
  return tokens[:, :steps]


@jax.jit
def _device_rollout_metrics(sampler, lengths, finished, trainer, mask):
  real = mask > 0
  gap = jnp.where(real, jnp.abs(sampler[:, :trainer.shape[1]] - trainer), 0.0)
  count = jnp.sum(real)
  return {"rollout/tokens_mean": jnp.mean(lengths.astype(jnp.float32)),
          "rollout/unfinished_fraction": 1.0 - jnp.mean(finished.astype(jnp.float32)),
          "mismatch/sampler_vs_trainer_logprob_mean": jnp.sum(gap) / jnp.maximum(count, 1),
          "mismatch/sampler_vs_trainer_logprob_max": jnp.max(gap),
          "_tokens": count.astype(jnp.float32)}


def _rollout_metrics(rollouts, continuations, old_logprobs) -> dict[str, float]:
  """Over the GLOBAL batch, on the devices (only scalars come back)."""
  values = _device_rollout_metrics(rollouts.logprobs, rollouts.lengths, rollouts.finished,
                                   old_logprobs, continuations.mask)
  return {k: float(v) for k, v in jax.device_get(values).items()}


def _caption_metrics(samples, rewards) -> dict[str, float]:
  """Over this host's captions (the judge's inputs are host-side)."""
  words = np.array([len(s.caption.split()) for s in samples], np.float32)
  reference_words = np.array([np.mean([len(r.split()) for r in s.references])
                              for s in samples], np.float32)
  return {"rollout/words_mean": float(words.mean()),
          "rollout/reference_words_mean": float(reference_words.mean()),
          "rollout/length_ratio_mean": float(np.nanmean(rewards.components["length_ratio"]))}


def run(config, workdir: str, policy, reward: functions.JudgeReward) -> loop.LoopResult:
  """config.rl.num_steps RL steps from `policy`'s params (resuming workdir's checkpoints).

  `policy` is trained in place: its params are donated to the first update (their buffers
  are deleted), and on return `policy.params` are the trained ones (= result.state["params"])."""
  rl = config.rl
  builder = datasets.prepare(config.data)
  source = datasets.open_split(builder, config.data.train_split)
  iterator = pipeline.train_iterator(
      source, batch_size=parallel.host_batch_size(rl.batch_size), seed=config.seed + 1,
      read_threads=config.data.read_threads, prefetch_batches=config.data.prefetch_batches)
  eval_source = (datasets.open_split(builder, config.data.eval_split) if rl.eval_every
                 else None)
  ref_params = None
  if losses.from_config(rl.loss).kl_coef > 0:
    # A copy: the training state's params are donated to (and overwritten by) each update.
    ref_params = jax.tree.map(jnp.copy, policy.params)
  step = RLStep(config, workdir, policy, reward, ref_params, eval_source)
  os.makedirs(workdir, exist_ok=True)
  loop_config = config.copy_and_resolve_references()
  loop_config.num_steps = rl.num_steps
  result = loop.run(workdir=workdir, config=loop_config,
                    state=train_state.initial_state(policy, step.optimizer, config.seed),
                    data_iterator=iterator, step_fn=step, description="rl")
  policy.params = result.state["params"]  # the donated buffers are gone: hand over the new
  return result
