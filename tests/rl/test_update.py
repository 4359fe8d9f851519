"""The jitted RL update on real rollouts of the tiny CapWorld policy: sharding, micro-batching
and inner passes change how it is computed, never what it computes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from balcap import models, optim, parallel, sampling, scoring, train_state
from balcap.rl import losses, update
import llava_fixtures
from testlib import load_config_file

GROUP = 4


@pytest.fixture(scope="module")
def rollout_batch(capworld_builder):
  """(model config, host batch of 4 prompts x G rollouts as numpy, prompt length) of the tiny
  CapWorld Qwen2.5-VL policy."""
  from balcap.data import datasets  # pylint: disable=import-outside-toplevel
  model_config = load_config_file("tiny").model
  source = datasets.open_split(capworld_builder, "train")
  images = [Image.fromarray(np.asarray(source[i]["image"])) for i in range(4)]
  return _rollouts(model_config, images)


@pytest.fixture(scope="module")
def llava_rollout_batch(tmp_path_factory):
  """The same for a tiny random LLaVA-1.5 checkpoint (with its tokenizer) from transformers."""
  folder = str(tmp_path_factory.mktemp("llava_update"))
  llava_fixtures.write_tokenizer(folder)
  llava_fixtures.write_checkpoint(folder, llava_fixtures.tiny_config(), seed=7)
  model_config = ml_collections.ConfigDict(dict(
      load_config_file("tiny").model.to_dict(), checkpoint=folder, tokenizer=folder,
      architecture={}))  # the architecture is the checkpoint's
  rng = np.random.default_rng(3)
  images = [Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), np.uint8)) for i in range(4)]
  return _rollouts(model_config, images)


def _rollouts(model_config, images):
  """Host-side rollouts (tokens, lengths) with perturbed old logprobs and random advantages;
  each test lays them out on its own mesh (`_device_batch`)."""
  policy = models.policy_from_config(model_config, jax.random.key(0))
  chats = policy.processor(prompts=["Describe this image in detail."] * 4, images=images)
  rollouts = sampling.generate(policy, policy.params, chats, jax.random.key(1),
                               max_new_tokens=12, num_samples=GROUP)
  tokens, lengths = np.asarray(rollouts.tokens), np.asarray(rollouts.lengths)
  batch = scoring.continuation_batch(policy, chats, tokens, lengths, GROUP)
  old = scoring.continuation_logprobs(policy, policy.params, batch, 1.0)
  # Perturbed so the ratio is not 1 everywhere and both clip sides are hit.
  old = np.asarray(old) + np.random.default_rng(0).normal(0, 0.3, tokens.shape)
  host = {"chats": chats, "tokens": tokens, "lengths": lengths,
          "mask": np.asarray(batch.mask), "old_logprobs": old.astype(np.float32),
          "advantages": np.random.default_rng(1).normal(size=len(tokens)).astype(np.float32)}
  return model_config, host


def _device_batch(policy, host, kl):
  """The update's batch on `policy`'s mesh: images in one shard per batch shard."""
  continuations = scoring.continuation_batch(policy, host["chats"], host["tokens"],
                                             host["lengths"], GROUP)
  placed = parallel.global_inputs({k: host[k] for k in ("old_logprobs", "advantages")},
                                  policy.mesh)
  ref = None
  if kl:
    ref = parallel.global_inputs({"r": host["old_logprobs"] - 0.05}, policy.mesh)["r"]
  return update.RolloutBatch(continuations, placed["old_logprobs"], placed["advantages"], ref)


def _updated(rollout_batch, *, mesh=None, micro_batches=1, passes=1, kl=False):
  model_config, host = rollout_batch
  policy = models.policy_from_config(model_config, jax.random.key(0), mesh=mesh)
  # Adam's first step is lr * g / (|g| + eps): a coordinate whose gradient is ~0 turns the
  # float reassociation noise of another reduction order (~1e-10) into lr * noise / eps. eps
  # 1e-6 keeps that below 1e-7, so the comparison sees the sharded program, not Adam's
  # amplifier (with eps 1e-8, 1 in 50k coordinates differs by ~3e-5).
  optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-3, eps=1e-6),
                                   total_steps=10)
  loss_config = losses.LossConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.1 if kl else 0.0)
  step = update.make_update(policy.module, optimizer, loss_config,
                            num_micro_batches=micro_batches, num_passes=passes,
                            temperature=1.0, mesh=mesh)
  state, metrics = step(train_state.initial_state(policy, optimizer, 0),
                        _device_batch(policy, host, kl))
  return jax.device_get(state["params"]), jax.device_get(metrics), policy


def _assert_params_close(a, b, atol=1e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_update_on_a_2x2x2_mesh_equals_one_device(request, family):
  rollout_batch = request.getfixturevalue(
      "rollout_batch" if family == "qwen" else "llava_rollout_batch")
  single, single_metrics, _ = _updated(rollout_batch, micro_batches=2, kl=True)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded, sharded_metrics, policy = _updated(rollout_batch, mesh=mesh, micro_batches=2,
                                              kl=True)
  # The params really were sharded over fsdp and tensor, not silently replicated.
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(policy.params)}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
  _assert_params_close(sharded, single)
  for key in ("update/loss", "update/grad_norm", "update/policy/clip_fraction", "update/kl/ref"):
    np.testing.assert_allclose(sharded_metrics[key], single_metrics[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def one_pass(rollout_batch):
  """The plain update (1 micro-batch, 1 pass, KL on), compared against by two tests."""
  return _updated(rollout_batch, kl=True)[:2]


def test_micro_batching_changes_neither_the_update_nor_its_metrics(rollout_batch, one_pass):
  whole, whole_metrics = one_pass
  split, split_metrics, _ = _updated(rollout_batch, micro_batches=4, kl=True)
  _assert_params_close(split, whole)
  # Every metric, not only the loss: the micro-batches hold different numbers of tokens, so
  # a mean of micro-batch means (or a per-micro-batch count) would differ from the batch's.
  assert sorted(split_metrics) == sorted(whole_metrics)
  for key in whole_metrics:
    np.testing.assert_allclose(split_metrics[key], whole_metrics[key], rtol=2e-5, atol=1e-6,
                               err_msg=key)
  assert whole_metrics["update/policy/tokens"] == rollout_batch[1]["mask"].sum()
  assert rollout_batch[1]["mask"].sum() == rollout_batch[1]["lengths"].sum() > 0


def test_micro_batch_statistics_combine_like_the_whole_batch():
  # By hand: two micro-batches of 1 and 3 tokens.
  stats = {"loss": jnp.array([0.25, 0.5]), "loss/policy": jnp.array([0.2, 0.4]),
           "policy/tokens": jnp.array([1.0, 3.0]),
           "policy/clip_fraction": jnp.array([1.0, 1 / 3]),
           "policy/ratio_min": jnp.array([0.9, 1.1]), "policy/ratio_max": jnp.array([1.2, 1.1]),
           "kl/ref": jnp.array([0.4, 0.0])}
  out = jax.device_get(losses.combine_micro_batch_stats(stats))
  np.testing.assert_allclose(
      [out["loss"], out["loss/policy"], out["policy/tokens"], out["policy/clip_fraction"],
       out["policy/ratio_min"], out["policy/ratio_max"], out["kl/ref"]],
      [0.75, 0.6, 4.0, 0.5, 0.9, 1.2, 0.1], rtol=1e-6)
  # A micro-batch without tokens reports a neutral ratio 1; it must not become the minimum.
  stats["policy/tokens"] = jnp.array([0.0, 3.0])
  stats["policy/ratio_min"] = jnp.array([1.0, 1.1])
  out = jax.device_get(losses.combine_micro_batch_stats(stats))
  assert out["policy/ratio_min"] == np.float32(1.1)
  np.testing.assert_allclose(out["policy/clip_fraction"], 1 / 3, rtol=1e-6)


def test_inner_passes_move_the_policy_and_clip_more(rollout_batch, one_pass):
  _, batch = rollout_batch
  one, one_metrics = one_pass
  three, three_metrics, _ = _updated(rollout_batch, passes=3)
  assert one_metrics["update/policy/clip_fraction"] == three_metrics[
      "update/policy/clip_fraction"]  # the first pass reports the batch as sampled
  assert three_metrics["update/last_pass_clip_fraction"] > 0
  moved_one = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), one, three))
  assert max(moved_one) > 0
  assert batch["mask"].sum() > 0


def test_images_encoded_once_train_the_vision_tower_like_the_plain_gradient(rollout_batch):
  """The update encodes each pass's images once and sends the features' cotangents, summed
  over micro-batches, back through the tower once. Against a plain `jax.grad` of the whole
  batch's loss with the images encoded inside the model call (no vjp, no micro-batches): the
  same params, and the vision tower really moved."""
  model_config, host = rollout_batch
  policy = models.policy_from_config(model_config, jax.random.key(0))
  optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-3, eps=1e-6),
                                   total_steps=10)
  loss_config = losses.LossConfig(eps_low=0.2, eps_high=0.28)
  batch = _device_batch(policy, host, kl=False)
  c = batch.continuations
  assert c.images, "the tiny policy's batch has images"

  def plain_loss(params):
    logits = policy.module.apply({"params": params}, **c.rows, **c.images,
                                 logits_window=(c.prompt_length - 1, c.tokens.shape[1]))
    logprobs = scoring.token_logprobs(logits, c.tokens, 1.0)
    mask = c.mask > 0
    return losses.rl_loss(logprobs, batch.old_logprobs, None, batch.advantages, c.mask,
                          loss_config, global_tokens=jnp.sum(mask).astype(jnp.float32),
                          global_sequences=jnp.sum(jnp.any(mask, axis=1)).astype(
                              jnp.float32))[0]

  params = policy.params
  grads = jax.jit(jax.grad(plain_loss))(params)
  updates, _ = optimizer.update(grads, jax.jit(optimizer.init)(params), params)
  expected = jax.device_get(optim.apply_updates(params, updates))
  assert np.abs(jax.device_get(grads["visual"]["patch_embed"]["kernel"])).max() > 0

  step = update.make_update(policy.module, optimizer, loss_config, num_micro_batches=4,
                            num_passes=1, temperature=1.0)
  before = jax.device_get(params)
  state, _ = step(train_state.initial_state(policy, optimizer, 0), batch)
  got = jax.device_get(state["params"])
  _assert_params_close(got, expected)
  moved = np.abs(got["visual"]["patch_embed"]["kernel"]
                 - before["visual"]["patch_embed"]["kernel"]).max()
  assert moved > 1e-4  # Adam moves a trained weight by ~lr
