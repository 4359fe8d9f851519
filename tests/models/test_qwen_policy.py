"""The policy interface end to end: real tokenizer + processor + model vs transformers, configs."""

import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from balcap import models
from balcap.models import qwen2_lm
from qwen_fixtures import reference_logits, tiny_config, write_checkpoint
from testlib import QWEN_TOKENIZER_DIR, tiny_model_config


@pytest.fixture(scope="module")
def real_vocab_checkpoint(tmp_path_factory):
  """A tiny model over the real Qwen vocabulary and special ids, with its tokenizer files."""
  folder = str(tmp_path_factory.mktemp("qwen_real_vocab"))
  config = tiny_config(vocab_size=151936, image_id=151655, video_id=151656,
                       vision_start=151652, vision_end=151653, tie=True)
  reference = write_checkpoint(folder, config, seed=3)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(QWEN_TOKENIZER_DIR, name), folder)
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    f.write('{"min_pixels": 3136, "max_pixels": 40000, "patch_size": 14, '
            '"temporal_patch_size": 2, "merge_size": 2}')
  return folder, reference


def noise(width, height, seed):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))


def test_processor_batch_gives_transformers_logits(real_vocab_checkpoint):
  folder, reference = real_vocab_checkpoint
  policy = models.load_pretrained(folder)
  assert policy.processor is not None
  batch = policy.processor(prompts=["Describe this image.", "What shapes are there, and where?"],
                           images=[noise(140, 100, 0), noise(60, 230, 1)])
  assert batch["image_grid_thw"].tolist() != [[1, 8, 10]] * 2  # two different sizes
  ours = np.asarray(policy.apply(policy.params, batch))
  theirs = reference_logits(reference, batch)
  real = batch["attention_mask"].astype(bool)
  assert np.abs(ours - theirs)[real].max() <= 1e-4
  np.testing.assert_array_equal(ours[:, -1].argmax(-1), theirs[:, -1].argmax(-1))


def test_every_parameter_carries_logical_axes():
  config = models.architecture_from_config(tiny_model_config())
  family = models.family_of("qwen2_5_vl")
  boxed, _ = models.policy.boxed_abstract_params(family, config)
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(
      x, nn.LogicallyPartitioned))
  unannotated = [jax.tree_util.keystr(p) for p, leaf in leaves
                 if not isinstance(leaf, nn.LogicallyPartitioned)]
  assert not unannotated
  names = {name for _, leaf in leaves for name in leaf.names if name}
  assert {"embed", "heads", "kv_heads", "mlp", "vocab", "layers", "norm"} <= names


def test_config_file_policy_initialises_and_round_trips_through_hf(tmp_path):
  model_config = tiny_model_config()
  policy = models.policy_from_config(model_config, jax.random.key(0))
  policy.save_pretrained(str(tmp_path / "hf"))
  model_config.checkpoint = str(tmp_path / "hf")
  loaded = models.policy_from_config(model_config, jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, loaded.params, policy.params)
  layers = model_config.architecture.text.num_layers
  model_config.architecture.text.num_layers = layers + 1
  with pytest.raises(ValueError, match=f"text.num_layers: config says {layers + 1}, checkpoint "
                                       f"has {layers}"):
    models.policy_from_config(model_config, jax.random.key(1))


def test_remat_changes_memory_not_results():
  base = qwen2_lm.QwenLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                               num_layers=3, num_heads=4, num_kv_heads=2, mrope_section=(1, 1, 2))
  ids = jnp.arange(12).reshape(2, 6) % 64
  positions = jnp.broadcast_to(jnp.arange(6), (3, 2, 6))
  mask = jnp.ones((2, 6), jnp.int32)

  def loss_and_grads(remat):
    model = qwen2_lm.QwenLM(base.__class__(**{**base.__dict__, "remat": remat}))
    run = lambda m, i, p, k: m(m.embed(i), p, k)
    params = nn.unbox(model.init(jax.random.key(0), ids, positions, mask, method=run))
    loss = lambda p: jnp.mean(model.apply(p, ids, positions, mask, method=run) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  reference = loss_and_grads("none")
  for policy in ("full", "dots"):
    result = loss_and_grads(policy)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), result,
                 reference)


def test_config_pixel_bounds_reach_the_processor(real_vocab_checkpoint):
  folder, _ = real_vocab_checkpoint
  model_config = tiny_model_config()
  model_config.architecture = {}
  model_config.checkpoint = folder
  model_config.min_pixels, model_config.max_pixels = 28 * 28, 56 * 56
  policy = models.policy_from_config(model_config, jax.random.key(0))
  batch = policy.processor(prompts=["Describe."], images=[noise(400, 300, 2)])
  t, h, w = batch["image_grid_thw"][0]
  assert h * w * 14 * 14 <= 56 * 56
