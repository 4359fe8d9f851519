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

With `config.rl.async_rewards` the judge overlaps the devices' work: step t samples step t+1's
rollouts (with the params step t's update has not yet changed) and submits them to the judge,
then updates on step t's rollouts, whose captions were judged meanwhile. Each update is one step
off-policy (the first is on-policy), and its importance ratio is against the policy that
sampled: the sampler's own logprobs are the "old" ones (they are the trainer's, see
`balcap.sampling`), so no scoring pass is needed either. The rollouts in flight are part of the
training state (`state["inflight"]`, checkpointed with it) and the data iterator's checkpoint
is taken from before their examples (`pipeline.Lookahead`), so a resumed run re-makes their
prompts, re-judges their captions and continues exactly; so does a finished run whose
`num_steps` is raised (its last step sampled ahead too).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from balcap import loop, optim, parallel, paths, sampling, scoring, train_state
from balcap.data import datasets, pipeline
from balcap.evals import captioning
from balcap.models import policy as policy_lib
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
               ref_params: Any = None, eval_source=None,
               lookahead: pipeline.Lookahead | None = None):
    self.config, self.workdir, self.policy, self.reward = config, workdir, policy, reward
    self._samples_file = None
    self.ref_params = ref_params
    self.eval_source = eval_source
    rl = config.rl
    self.async_rewards = bool(rl.async_rewards)
    if self.async_rewards and lookahead is None:
      raise ValueError("config.rl.async_rewards samples a step ahead: RLStep needs the "
                       "loop's data iterator as a `pipeline.Lookahead` (see `run`)")
    self.lookahead = lookahead
    self._ahead: _Sampled | None = None  # async: next step's batch, sampled during this one
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
        top_k=sampling_config.top_k,
        gather_weights=sampling_config.gather_weights)
    self.temperature = self.spec.temperature or 1.0
    self.update = update.make_update(
        policy.module, self.optimizer, self.loss_config, num_micro_batches=self.micro_batches,
        num_passes=rl.num_inner_updates, temperature=self.temperature, mesh=policy.mesh,
        freeze=tuple(optim.from_config(rl.optimizer).freeze))
    self._advantages = jax.jit(lambda r, q: advantages_lib.compute(self.advantage_config, r, q))
    self.base_key = jax.random.key(config.seed)
    self._place_inflight = _inflight_placer(policy.mesh)

  def empty_inflight(self) -> dict[str, jax.Array]:
    """Async: `state["inflight"]` before anything is in flight (made for step 0, which no
    step is), shaped and laid out as the rollouts that will fill it."""
    rows = self.host_prompts * self.group * jax.process_count()
    shape = (rows, self.spec.max_new_tokens)
    rollouts = sampling.Rollouts(jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32),
                                 jnp.zeros(shape[:1], jnp.int32), jnp.zeros(shape[:1], bool))
    mesh = self.policy.mesh
    if mesh is None:
      counter = jax.device_put(jnp.zeros((), jnp.int32), jax.devices()[0])
    else:  # made where it lives: with several hosts, nothing is copied across them
      counter = jax.jit(lambda: jnp.zeros((), jnp.int32),
                        out_shardings=NamedSharding(mesh, PartitionSpec()))()
    return {**_rollout_fields(self._place_inflight(rollouts)), "step": counter}

  # The phases of a step, in order ---------------------------------------------------------

  def prompts(self, examples: dict[str, Any]) -> dict[str, Any]:
    """This host's examples as the sampler's inputs, prepared once and placed on the devices
    ("start" [B]: each prompt's first decode position)."""
    policy = self.policy
    images = [Image.fromarray(np.asarray(image)) for image in examples["image"]]
    chats = policy.processor(prompts=[self.config.sampling.prompt] * len(images),
                             images=images)
    prepared = sampling.prepare_prompts(policy, chats, self.config.sampling.prompt_bucket)
    inputs = policy_lib.model_inputs(prepared)
    inputs["start"] = policy.family.decode_start(policy.config, prepared).astype(np.int32)
    return parallel.global_inputs(inputs, policy.mesh)

  def sample(self, params, prompts: dict[str, Any], key) -> sampling.Rollouts:
    inputs = {k: v for k, v in prompts.items() if k != "start"}
    return sampling.generate_prepared(self.policy, params, inputs, prompts["start"], key,
                                      self.spec)

  def sampled(self, step: int, prompts: dict[str, Any], rollouts: sampling.Rollouts,
              examples: dict[str, Any], *, judge: bool = True) -> "_Sampled":
    """The rollouts with this host's captions decoded (waits for the sampler) and, `judge`,
    submitted to the judge (it works on a thread of its own meanwhile)."""
    captions = captioning.decode(self.policy, rollouts)
    rows = [{k: examples[k][i] for k in examples} for i in range(len(captions) // self.group)]
    samples = functions.make_samples(rows, captions, self.group)
    pending = self.reward.submit(samples) if judge else None
    return _Sampled(step, prompts, rollouts, samples, pending)

  def this_steps_rollouts(self, state: dict[str, Any], examples: dict[str, Any], step: int
                          ) -> tuple["_Sampled", int]:
    """Step `step`'s rollouts, judged or being judged, and how many updates old the params
    that sampled them are: those sampled during the previous step (async, 1), or those
    restored with the checkpoint (async, resumed: prompts re-made, captions judged again), or
    sampled now (0)."""
    if self.async_rewards:
      ahead, self._ahead = self._ahead, None
      if ahead is not None and ahead.step == step:
        _check_same_examples(ahead, examples, step, self.group)
        if ahead.pending is None:
          ahead.pending = self.reward.submit(ahead.samples)
        return ahead, 1
      if _inflight_step(state) == step:
        inflight = state["inflight"]
        rollouts = sampling.Rollouts(inflight["tokens"], inflight["logprobs"],
                                     inflight["lengths"], inflight["finished"])
        return self.sampled(step, self.prompts(examples), rollouts, examples), 1
    prompts = self.prompts(examples)
    rollouts = self.sample(state["params"], prompts, jax.random.fold_in(self.base_key, step))
    if self.async_rewards:  # laid out as restored ones are, so both paths compile alike
      rollouts = self._place_inflight(rollouts)
    return self.sampled(step, prompts, rollouts, examples), 0

  def sample_ahead(self, params, step: int):
    """Async: starts sampling step+1's rollouts, from the batch the loop will hand it, with
    `params` (step `step`'s, before its update). Returns what `judge_ahead` takes."""
    examples = self.lookahead.peek()
    prompts = self.prompts(examples)
    rollouts = self._place_inflight(
        self.sample(params, prompts, jax.random.fold_in(self.base_key, step + 1)))
    return step + 1, prompts, rollouts, examples

  def judge_ahead(self, ahead) -> "_Sampled":
    """Decodes the rollouts sampled ahead (waits for the sampler) and submits them to the
    judge, unless they are past the run's last step (sampled so that raising num_steps and
    resuming continues exactly, but judged only if that happens)."""
    step, prompts, rollouts, examples = ahead
    return self.sampled(step, prompts, rollouts, examples,
                        judge=step <= self.config.rl.num_steps)

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

  def score(self, params, batch: scoring.Continuations, rollouts: sampling.Rollouts):
    """Old (and, KL on, reference) logprobs [R, N], micro-batched like the update. Async, the
    old ones are the sampler's: the params that sampled are gone by the update."""
    if self.async_rewards:
      old = _first_columns(rollouts.logprobs, batch.tokens.shape[1])
    else:
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
    current, lag = self.this_steps_rollouts(state, examples, step)
    timings["sample"] = time.perf_counter() - started

    continuations = self.continuations(current.prompts, current.rollouts)
    old_logprobs, ref_logprobs = self.score(state["params"], continuations, current.rollouts)
    ahead = None
    if self.async_rewards:  # queued behind the scoring; this step's judge works meanwhile
      ahead_started = time.perf_counter()
      ahead = self.judge_ahead(self.sample_ahead(state["params"], step))
      timings["sample_ahead"] = time.perf_counter() - ahead_started
    reward_started = time.perf_counter()
    rewards = self.reward.result(current.pending, current.samples, config.rewards.deadline_s)
    timings["reward_wait"] = time.perf_counter() - reward_started
    advantages, advantage_stats = self.advantages(rewards)

    update_started = time.perf_counter()
    batch = update.RolloutBatch(continuations, old_logprobs, advantages, ref_logprobs)
    trained = {k: v for k, v in state.items() if k != "inflight"}
    state, update_metrics = self.update(trained, batch)
    if ahead is not None:
      state["inflight"] = {**_rollout_fields(ahead.rollouts),
                           "step": _next_step(state["step"])}
      self._ahead = ahead
    jax.block_until_ready(state["step"])
    timings["update"] = time.perf_counter() - update_started

    metrics = {**rewards.metrics(), **advantage_stats, **update_metrics}
    metrics.update(_rollout_metrics(current.rollouts, continuations,
                                    None if self.async_rewards else old_logprobs))
    metrics["rollout/policy_lag_steps"] = float(lag)
    metrics.update(_caption_metrics(current.samples, rewards))
    total = time.perf_counter() - started
    metrics.update({f"time/{k}": v for k, v in timings.items()})
    metrics["time/step"] = total
    metrics["throughput/rollout_tokens_per_second"] = metrics.pop("_tokens") / total
    metrics["learning_rate"] = float(optim.learning_rate_schedule(
        optim.from_config(config.rl.optimizer), config.rl.num_steps)(step - 1))
    if config.rl.sample_table_every and step % config.rl.sample_table_every == 0:
      metrics["_texts"] = self._sample_table(step, current.samples, rewards,
                                             parallel.host_local(advantages))
    if config.rl.eval_every and step % config.rl.eval_every == 0 and self.eval_source:
      eval_metrics, _ = self.evaluate(state["params"], config.rl.eval_examples)
      metrics.update({f"eval/{k}": v for k, v in eval_metrics.items() if k != "per_image"})
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
      if self._samples_file is None:  # opened once: on gs:// each open reads the whole file
        self._samples_file = paths.LineAppender(os.path.join(self.workdir, "samples.jsonl"))
      self._samples_file.write([json.dumps(entry) for entry in entries])
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


@dataclasses.dataclass
class _Sampled:
  """One step's rollouts with what the host keeps of them until their update."""
  step: int                          # the step whose update trains on them
  prompts: dict[str, Any]            # the sampler's placed inputs (+ "start")
  rollouts: sampling.Rollouts        # on the devices
  samples: list[functions.Sample]    # this host's captions, as the judge sees them
  pending: concurrent.futures.Future | None  # the judge's work on them (None: not submitted)


def _check_same_examples(sampled: _Sampled, examples: dict[str, Any], step: int,
                         group: int) -> None:
  """The batch sampled ahead must be the one the loop hands the next step."""
  sampled_ids = [sample.id.rsplit("/", 1)[0] for sample in sampled.samples[::group]]
  if sampled_ids != [str(i) for i in examples["id"]]:
    raise RuntimeError(
        f"step {step}: the rollouts sampled ahead are for examples {sampled_ids[:3]}..., but "
        f"the loop handed examples {list(examples['id'])[:3]}...: with "
        "config.rl.async_rewards the data iterator must be the RLStep's Lookahead")


def _inflight_placer(mesh):
  """Rollouts laid out as a checkpoint restores `state["inflight"]` (rows over the batch
  axes), so sampled and restored rollouts feed the same compiled programs."""
  if mesh is None:
    device = jax.devices()[0]
    return lambda rollouts: jax.device_put(rollouts, device)
  return jax.jit(lambda rollouts: rollouts, out_shardings=parallel.batch_sharding(mesh))


def _rollout_fields(rollouts: sampling.Rollouts) -> dict[str, jax.Array]:
  return {"tokens": rollouts.tokens, "logprobs": rollouts.logprobs,
          "lengths": rollouts.lengths, "finished": rollouts.finished}


def _inflight_step(state: dict[str, Any]) -> int:
  """The step the checkpointed in-flight rollouts are for (0: none)."""
  inflight = state.get("inflight")
  if inflight is None:
    return 0
  return int(np.asarray(inflight["step"].addressable_data(0)))


@jax.jit
def _next_step(updates_done):
  return updates_done + 1


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


def _rollout_metrics(rollouts, continuations, trainer_logprobs=None) -> dict[str, float]:
  """Over the GLOBAL batch, on the devices (only scalars come back). Without the trainer's
  logprobs (async: the old ones are the sampler's), no sampler-vs-trainer mismatch."""
  trainer = trainer_logprobs
  if trainer is None:
    trainer = _first_columns(rollouts.logprobs, continuations.tokens.shape[1])
  values = _device_rollout_metrics(rollouts.logprobs, rollouts.lengths, rollouts.finished,
                                   trainer, continuations.mask)
  values = {k: float(v) for k, v in jax.device_get(values).items()}
  if trainer_logprobs is None:
    values = {k: v for k, v in values.items() if not k.startswith("mismatch/")}
  return values


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
  if rl.async_rewards:  # the step samples the next batch's rollouts before the loop asks
    iterator = pipeline.Lookahead(iterator)
  eval_source = (datasets.open_split(builder, config.data.eval_split) if rl.eval_every
                 else None)
  ref_params = None
  if losses.from_config(rl.loss).kl_coef > 0:
    # A copy: the training state's params are donated to (and overwritten by) each update.
    ref_params = jax.tree.map(jnp.copy, policy.params)
  step = RLStep(config, workdir, policy, reward, ref_params, eval_source,
                lookahead=iterator if rl.async_rewards else None)
  paths.makedirs(workdir)
  loop_config = config.copy_and_resolve_references()
  loop_config.num_steps = rl.num_steps
  state = train_state.initial_state(policy, step.optimizer, config.seed)
  if rl.async_rewards:
    state["inflight"] = step.empty_inflight()
  result = loop.run(workdir=workdir, config=loop_config, state=state,
                    data_iterator=iterator, step_fn=step, description="rl")
  policy.params = result.state["params"]  # the donated buffers are gone: hand over the new
  return result
