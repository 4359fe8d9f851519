"""Images laid out in one shard per batch shard (`balcap.models.image_shards`): the logits are
transformers' whatever the number of shards, rows and images are matched across shards
correctly, and on a mesh each device encodes only its own shard."""

import jax
import numpy as np
import pytest

from balcap import models, parallel
from balcap.models import image_shards, llava, qwen_vl
import llava_fixtures
import qwen_fixtures

TOLERANCE = 1e-4  # fp32 logits, max |diff|


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen_shards"))
  reference = qwen_fixtures.write_checkpoint(folder, qwen_fixtures.tiny_config())
  return reference, models.load_pretrained(folder)


@pytest.fixture(scope="module")
def llava_policy(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("llava_shards"))
  reference = llava_fixtures.write_checkpoint(folder, llava_fixtures.tiny_config())
  return reference, models.load_pretrained(folder)


def _qwen_batch():
  rng = np.random.default_rng(0)
  # Shards of 4 rows / S: different image sizes (partial windows), a text-only row (with
  # S = 4 its shard has no image at all), and a row with two images.
  return qwen_fixtures.batch(rng, [
      ([1, 2, 3], (1, 8, 8)),
      (list(rng.integers(0, 240, 9)), None),
      ([4, 5, 6, 7], (1, 10, 14)),
      ([8, 9], (1, 4, 4)),
  ])


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_qwen_logits_equal_transformers_for_any_number_of_image_shards(qwen, shards):
  reference, policy = qwen
  inputs = _qwen_batch()
  prepared = qwen_vl.prepare_inputs(policy.config, inputs, image_shards=shards)
  assert prepared["pixel_values"].shape[0] == shards
  assert all(v.shape[0] == shards for v in prepared["vision_layout"].values())
  ours = np.asarray(policy.apply(policy.params, prepared))
  theirs = qwen_fixtures.reference_logits(reference, inputs)
  real = inputs["attention_mask"].astype(bool)
  assert np.abs(ours - theirs)[real].max() <= TOLERANCE


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_llava_logits_equal_transformers_for_any_number_of_image_shards(llava_policy, shards):
  reference, policy = llava_policy
  rng = np.random.default_rng(1)
  inputs = llava_fixtures.batch(rng, [([1, 5, 6], True), ([1, 7], None), ([1, 8, 9, 10], True),
                                      ([1, 11], True)])
  prepared = llava.prepare_inputs(policy.config, inputs, image_shards=shards)
  assert prepared["pixel_values"].shape[:2] == (shards, {1: 3, 2: 2, 4: 1}[shards])
  ours = np.asarray(policy.apply(policy.params, prepared))
  theirs = llava_fixtures.reference_logits(reference, inputs)
  real = inputs["attention_mask"].astype(bool)
  assert np.abs(ours - theirs)[real].max() <= TOLERANCE


def test_rows_and_images_are_matched_to_shards_and_bad_layouts_are_named():
  # 4 rows in 2 shards; row 1 has two images, row 2 none.
  features_per_row = np.array([4, 6, 0, 2])
  per_image = np.array([4, 3, 3, 2])
  np.testing.assert_array_equal(image_shards.image_shard_of(features_per_row, per_image, 2),
                                [0, 0, 0, 1])
  np.testing.assert_array_equal(image_shards.row_offsets(features_per_row, 2), [0, 4, 0, 0])
  with pytest.raises(ValueError, match="5 rows does not split into 2 image shards"):
    image_shards.rows_per_shard(5, 2)
  with pytest.raises(ValueError, match="image 1 does not fit in one row"):
    image_shards.image_shard_of(np.array([5, 5]), np.array([4, 6]), 2)


def test_on_a_mesh_each_device_encodes_only_its_own_image_shard(qwen):
  """Per-device FLOPs of the vision tower on a 4-shard mesh are ~1/4 of one device's; with
  the images replicated (one shard for the whole batch) they would be all of them."""
  _, policy = qwen
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = models.load_pretrained(policy.source, mesh=mesh)
  rng = np.random.default_rng(2)
  inputs = qwen_fixtures.batch(rng, [([1, 2], (1, 8, 8))] * 8)
  module = policy.module

  def flops(program_policy, shards):
    prepared = qwen_vl.prepare_inputs(policy.config, inputs, image_shards=shards)
    images = {k: prepared[k] for k in ("pixel_values", "vision_layout")}
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x["pixel_values"],
                                               x["vision_layout"],
                                               method=module.encode_images))
    with parallel.mesh_context(program_policy.mesh):
      placed = parallel.global_inputs(images, program_policy.mesh)
      compiled = encode.lower(program_policy.params, placed).compile()
      features = encode(program_policy.params, placed)
    return compiled.cost_analysis()["flops"], features

  one_device, expected = flops(policy, 4)
  per_device, features = flops(sharded, 4)
  assert per_device < 0.3 * one_device, (per_device, one_device)
  assert features.sharding.spec[0] == parallel.BATCH_AXES
  np.testing.assert_allclose(np.asarray(features), np.asarray(expected), atol=1e-5)
