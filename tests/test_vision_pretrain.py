"""Vision pre-training on CapWorld: its inputs and math by hand, and the stage on an 8-device mesh."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from balcap import metrics, models, parallel, sft, vision_pretrain
from balcap.data.capworld import Scene, SceneObject, scene_to_json, token_labels
from testlib import load_config_file, tiny_data_config


def _scene(*objects):
  return json.dumps(scene_to_json(Scene(112, 112, "white", tuple(objects), ())))


RED_CIRCLE = SceneObject("circle", "red", "large", 28, 28, 32, "top left")
BLUE_STAR = SceneObject("star", "blue", "small", 84, 84, 14, "bottom right")


def test_host_inputs_cover_each_object_with_its_labels():
  examples = {"id": ["a", "b"], "scene_graph": [_scene(RED_CIRCLE, BLUE_STAR), _scene(BLUE_STAR)]}
  prepared = {"image_grid_thw": np.array([[1, 8, 8], [1, 8, 8]])}  # 112 px: 4 x 4 tokens
  out = vision_pretrain.host_inputs(examples, prepared, merge_size=2, max_objects=3)
  assert out["object_cover"].shape == (2, 3, 16)
  np.testing.assert_array_equal(out["object_mask"], [[1, 1, 0], [1, 0, 0]])
  # shape, colour, size as indices into CapWorld's vocabulary
  np.testing.assert_array_equal(out["object_labels"][0, :2], [[0, 0, 2], [3, 5, 0]])
  np.testing.assert_array_equal(out["object_labels"][1, 0], [3, 5, 0])
  star = token_labels.object_cover(
      Scene(112, 112, "white", (BLUE_STAR,), ()), 4, 4)[0]
  np.testing.assert_array_equal(out["object_cover"][1, 0], star)
  # The circle (centre 28, 28, radius 16 px) covers the corner where the four top-left cells
  # (28 px each) meet, a quarter in each, and nothing else: its area is ~pi * 16**2 px.
  circle = out["object_cover"][0, 0]
  np.testing.assert_allclose(circle[[0, 1, 4, 5]], circle[0], rtol=0.05)
  assert np.delete(circle, [0, 1, 4, 5]).max() == 0
  assert circle.sum() * 28 ** 2 == pytest.approx(np.pi * 16 ** 2, rel=0.05)


def test_host_inputs_name_the_example_with_too_many_objects():
  examples = {"id": ["capworld-train-9"], "scene_graph": [_scene(RED_CIRCLE, BLUE_STAR)]}
  with pytest.raises(ValueError, match="capworld-train-9: 2 objects.*max_objects=1"):
    vision_pretrain.host_inputs(examples, {"image_grid_thw": np.array([[1, 8, 8]])}, 2, 1)


def test_object_features_read_each_row_in_its_own_shard():
  # 2 shards of 2 rows each; every row has 2 tokens; shard s's table holds 5 feature rows
  # (row offsets 0 and 2, one row of padding); features are their own (shard, index).
  features = jnp.asarray([[[s, i] for i in range(5)] for s in range(2)], jnp.float32)
  offsets = jnp.asarray([0, 2, 0, 2])
  cover = jnp.asarray([[[1.0, 0.0]], [[1.0, 3.0]], [[0.0, 2.0]], [[0.5, 0.5]]])
  pooled = vision_pretrain.object_features(features, offsets, cover)
  np.testing.assert_allclose(pooled[:, 0], [[0, 0], [0, 2.75], [1, 1], [1, 2.5]])


def test_a_zero_head_costs_the_mean_log_class_count_and_counts_real_objects_only():
  labels = jnp.asarray([[[2, 1, 0], [0, 0, 0]]])
  mask = jnp.asarray([[1, 0]])
  head = vision_pretrain.init_head(4, None)
  total, out = vision_pretrain.head_loss(jnp.ones((1, 2, 4)), head, labels, mask)
  classes = vision_pretrain.CLASSES
  np.testing.assert_allclose(total, np.mean(np.log(list(classes.values()))), rtol=1e-6)
  # A head that always answers class 0: size right (0) on the one real object, shape wrong;
  # the padded object (all labels 0) is never counted.
  head["bias"] = head["bias"].at[jnp.array([0, classes["shape"], classes["shape"]
                                           + classes["colour"]])].set(5.0)
  _, out = vision_pretrain.head_loss(jnp.ones((1, 2, 4)), head, labels, mask)
  assert float(out["vision/shape_accuracy"]) == 0.0
  assert float(out["vision/size_accuracy"]) == 1.0


def test_config_problems_name_the_field():
  config = load_config_file("tiny")
  config.vision_pretrain.num_steps = 5
  assert vision_pretrain.check_config(config) == []
  config.data.name = "caption_folder"
  assert "CapWorld" in vision_pretrain.check_config(config)[0]
  config.data.name = "capworld"
  config.model.architecture = {"family": "llava"}
  assert "config.model.architecture.family='llava'" in vision_pretrain.check_config(config)[0]
  config.model.architecture = {}  # the checkpoint's architecture: `run` checks the family
  assert vision_pretrain.check_config(config) == []
  config.vision_pretrain.batch_size = 0
  assert "config.vision_pretrain.batch_size=0" in vision_pretrain.check_config(config)[0]


def test_sft_opens_with_the_stage_which_trains_only_the_tower_and_resumes(tmp_path):
  config = load_config_file("tiny", "mode=sft")
  config.data = tiny_data_config(tmp_path / "tfds")
  config.vision_pretrain.update(num_steps=3, batch_size=8)
  config.vision_pretrain.optimizer.warmup_steps = 1
  config.sft.update(num_steps=1, batch_size=8, image_gain_every=0)
  config.sft.optimizer.warmup_steps = 0
  config.checkpoint.every_steps = 1
  config.metrics.log_every_steps = 1
  policy = models.policy_from_config(config.model, jax.random.key(config.seed),
                                     mesh=parallel.make_mesh(config.mesh))
  before = jax.tree.map(np.asarray, policy.params)
  stage = vision_pretrain.run(config, str(tmp_path / "vision"), policy)
  after = jax.tree.map(np.asarray, policy.params)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before, after)
  assert min(jax.tree.leaves(moved["visual"])) > 0  # every tower weight trained, merger too
  assert max(jax.tree.leaves(moved["lm"])) == 0      # the language model is left alone
  assert sorted(stage.state["params"]) == ["head", "visual"]
  log = metrics.read_jsonl(str(tmp_path / "vision" / "metrics.jsonl"))
  assert [r["step"] for r in log] == [1, 2, 3]
  assert log[0]["vision/loss"] == pytest.approx(
      np.mean(np.log(list(vision_pretrain.CLASSES.values()))), rel=1e-5)
  assert 0 <= log[-1]["vision/validation_colour_accuracy"] <= 1

  # Run again (more steps): it resumes from step 3, and the tower it hands over is the
  # checkpoint's, not the fresh random one.
  config.vision_pretrain.num_steps = 4
  fresh = models.policy_from_config(config.model, jax.random.key(config.seed),
                                    mesh=parallel.make_mesh(config.mesh))
  resumed = vision_pretrain.run(config, str(tmp_path / "vision"), fresh)
  assert resumed.resumed_from == 3 and resumed.step == 4
  step4 = jax.tree.map(np.asarray, fresh.params["visual"])
  step3 = after["visual"]
  gap = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), step3, step4)))
  assert 0 < gap <= 1.01 * config.vision_pretrain.optimizer.learning_rate

  # sft.run opens with the stage (in <sft workdir>/vision) and then trains the caption loss.
  result = sft.run(config, str(tmp_path / "sft"))
  assert result.step == 1
  assert metrics.read_jsonl(str(tmp_path / "sft" / "vision" / "metrics.jsonl"))[-1]["step"] == 4
