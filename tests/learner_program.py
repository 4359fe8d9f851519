"""A small RL run of the learner (random tiny policy, CapWorld judge), run by tests in
subprocesses they kill, resume or split over hosts.

    python tests/learner_program.py WORKDIR TFDS_DIR NUM_STEPS [distributed] [async]
    python tests/learner_program.py WORKDIR TFDS_DIR one_step [distributed]

`one_step` is one RL step on the first 2 training examples, each host taking its share, so
1 host and 2 hosts see the same global batch. Prints `PARAMS <sha256 of every parameter's
bytes>` at the end: two runs agree bitwise iff their final params do; a whole run also prints
`POLICY <digest>` of the policy object it trained (the same params, handed back). `async` turns
on config.rl.async_rewards.
"""

import hashlib
import sys

import jax
import numpy as np

from balcap import configs, models, parallel, train_state
from balcap.data import datasets, pipeline
from balcap.rl import learner
from balcap.rl.rewards import factory
from testlib import load_config_file, tiny_data_config


def config_for(tfds_dir: str, num_steps: int, async_rewards: bool = False):
  config = load_config_file("tiny")
  config.rl.async_rewards = async_rewards
  config.data = tiny_data_config(tfds_dir)
  config.mesh = configs.mesh_preset("cpu")
  config.rl.num_steps = num_steps
  config.rl.batch_size, config.rl.group_size = 2, 4
  config.rl.micro_batch_size = 4
  config.rl.sample_table_every = 0
  config.rl.optimizer.learning_rate = 1e-3
  config.sampling.max_new_tokens = 10
  config.checkpoint.every_steps = 2
  config.checkpoint.keep = 5
  config.metrics.tensorboard = config.metrics.progress_bar = False
  config.metrics.log_every_steps = 1  # the kill test watches metrics.jsonl for its step
  return config


def params_digest(params) -> str:
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):  # replicated: every host holds all of each
    digest.update(np.ascontiguousarray(np.asarray(leaf.addressable_data(0))).tobytes())
  return digest.hexdigest()


def _setup(workdir: str, tfds_dir: str, num_steps: int, async_rewards: bool = False):
  config = config_for(tfds_dir, num_steps, async_rewards)
  configs.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  mesh = parallel.make_mesh(config.mesh)
  policy = models.policy_from_config(config.model, jax.random.key(config.seed), mesh=mesh)
  reward = factory.reward_from_config(config, workdir, processor=policy.processor, mesh=mesh)
  return config, policy, reward


def run(workdir: str, tfds_dir: str, num_steps: int, async_rewards: bool = False):
  config, policy, reward = _setup(workdir, tfds_dir, num_steps, async_rewards)
  return learner.run(config, workdir, policy, reward), policy


def one_step(workdir: str, tfds_dir: str):
  config, policy, reward = _setup(workdir, tfds_dir, 1)
  step = learner.RLStep(config, workdir, policy, reward)
  state = train_state.initial_state(policy, step.optimizer, config.seed)
  local = parallel.host_batch_size(config.rl.batch_size)
  source = datasets.open_split(datasets.prepare(config.data), "train")
  first = jax.process_index() * local
  examples = pipeline.collate([pipeline.decode_strings(source[i])
                               for i in range(first, first + local)])
  state, metrics = step(state, examples, 1)
  return state, metrics


if __name__ == "__main__":
  flags = sys.argv[4:]
  if "distributed" in flags:
    assert parallel.initialize_distributed()
  if sys.argv[3] == "one_step":
    final, logged = one_step(sys.argv[1], sys.argv[2])
    print("RESULT", float(logged["advantage/abs_mean"]), int(final["step"]), flush=True)
    params = final["params"]
  else:
    result, trained = run(sys.argv[1], sys.argv[2], int(sys.argv[3]), "async" in flags)
    print("RESULT", result.resumed_from, result.step, flush=True)
    params = result.state["params"]
    # The caller's policy holds the trained params (its own were donated to the update).
    print("POLICY", params_digest(trained.params), flush=True)
  print("PARAMS", params_digest(params), flush=True)
