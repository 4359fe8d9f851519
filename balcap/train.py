"""Mode `train`: the method end to end, stage by stage, saying what each stage did.

  1. data: prepare the data set (`balcap.data.datasets`);
  2. SFT warm start, when config.sft.num_steps > 0 (`balcap.sft`, checkpoints in workdir/sft);
  3. evaluate the warm-started policy on the test split (the "before" column);
  4. RL, when config.rl.num_steps > 0 (`balcap.rl.learner`, checkpoints in workdir/rl);
  5. evaluate again and print the before/after table (also in workdir/eval.json).
Every stage resumes: running the same command again continues an interrupted run, and a
finished stage is restored from its last checkpoint instead of being redone.
"""

from __future__ import annotations

import json
import os
import time

import jax

from balcap import models, parallel, paths, sft
from balcap.data import datasets
from balcap.evals import captioning
from balcap.rl import learner
from balcap.rl.rewards import factory


def report(message: str) -> None:
  """A line for the person running the command (process 0 only)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def run(config, workdir: str) -> dict:
  report(f"balcap train: workdir {workdir}")
  started = time.time()
  builder = datasets.prepare(config.data)
  sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
  report(f"[1/5] data: {builder.info.full_name} ready in {time.time() - started:.1f}s; "
         f"examples per split: {sizes}")

  mesh = parallel.make_mesh(config.mesh)
  policy = models.policy_from_config(config.model, jax.random.key(config.seed), mesh=mesh)
  if policy.processor is None:
    raise ValueError("mode train needs a tokenizer: set config.model.tokenizer")
  count = sum(x.size for x in jax.tree.leaves(policy.params))
  report(f"      policy: {policy.family.model_type}, {count / 1e6:.2f}M parameters, mesh "
         f"{dict(mesh.shape)}, {jax.process_count()} host(s)")

  stage_started = time.time()
  if config.sft.num_steps > 0:
    result = sft.run(config, os.path.join(workdir, "sft"), policy)  # trains policy in place
    report(f"[2/5] SFT: {result.step}/{config.sft.num_steps} steps on "
           f"{config.sft.target} captions in {time.time() - stage_started:.0f}s"
           + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""))
  else:
    report("[2/5] SFT: skipped (config.sft.num_steps = 0)")

  reward = factory.reward_from_config(config, workdir, processor=policy.processor, mesh=mesh)
  test = datasets.open_split(builder, config.data.test_split)
  evaluate = lambda params: captioning.evaluate(
      policy, params, test, reward, prompt=config.sampling.prompt,
      max_new_tokens=config.sampling.max_new_tokens,
      batch_size=parallel.host_batch_size(config.batch_size),
      num_examples=config.rl.final_eval_examples, prompt_bucket=config.sampling.prompt_bucket)
  stage_started = time.time()
  before, before_examples = evaluate(policy.params)
  report(f"[3/5] evaluation before RL on {int(before['examples'])} {config.data.test_split} "
         f"examples: b-CapScore {before['b_capscore']:.1f} ({time.time() - stage_started:.0f}s)")

  stage_started = time.time()
  if config.rl.num_steps > 0:
    result = learner.run(config, os.path.join(workdir, "rl"), policy, reward)
    params = result.state["params"]
    report(f"[4/5] RL ({config.advantage.estimator}, judge {config.rewards.judge}): "
           f"{result.step}/{config.rl.num_steps} steps in {time.time() - stage_started:.0f}s"
           + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""))
  else:
    params = policy.params
    report("[4/5] RL: skipped (config.rl.num_steps = 0)")

  after, after_examples = evaluate(params)
  report(f"[5/5] evaluation after RL ({config.data.test_split}, greedy captions, judge "
         f"{config.rewards.judge}):\n{captioning.table(before, after)}")
  for label, examples in (("SFT", before_examples), ("after RL", after_examples)):
    for example in examples:
      report(f"  {label} {example['id']}: {example['caption']}")
  summary = {"before": before, "after": after, "examples": {"before": before_examples,
                                                            "after": after_examples}}
  if jax.process_index() == 0:
    paths.write_text(os.path.join(workdir, "eval.json"), json.dumps(summary, indent=2))
  report(f"done in {time.time() - started:.0f}s; metrics in {workdir}/*/metrics.jsonl, "
         f"samples in {workdir}/rl/samples.jsonl")
  return summary
