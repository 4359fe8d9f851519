"""SFT's auxiliary grounding loss: its math by hand, and its step on the demo's tiny policy."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from balcap import grounding, metrics, models, optim, sft, train_state
from balcap.data import datasets, pipeline
from balcap.data.capworld import Scene, SceneObject, scene_to_json
from testlib import load_config_file, tiny_data_config

CLASSES = {"shape": 3, "colour": 2, "row": 2, "column": 4}


def _inputs(labels, mask):
  labels = np.asarray(labels, np.int32)
  return {"grounding_positions": jnp.asarray(np.arange(labels.shape[1])[None], jnp.int32),
          "grounding_labels": jnp.asarray(labels), "grounding_mask": jnp.asarray(mask)}


def test_a_zero_head_costs_the_mean_log_class_count_and_accuracy_counts_objects_only():
  # Two image tokens at sequence positions 0 and 1; a third, padded, is never counted.
  labels = [[[1, 1, 0, 3], [0, 0, 1, 0], [2, 1, 1, 1]]]
  inputs = _inputs(labels, [[1, 1, 0]])
  head = {"kernel": jnp.zeros((4, 11)), "bias": jnp.zeros(11)}
  total, metrics = grounding.loss(jnp.ones((1, 3, 4)), head, inputs, CLASSES)
  np.testing.assert_allclose(total, np.mean(np.log([3, 2, 2, 4])), rtol=1e-6)
  np.testing.assert_allclose(metrics["sft/grounding/column_loss"], np.log(4), rtol=1e-6)
  # A head that always answers class 0 gets shape right on the background token only: 0 of
  # the 1 object token; row right on 1 of the 2 real tokens.
  head = {"kernel": jnp.zeros((4, 11)),
          "bias": jnp.zeros(11).at[jnp.array([0, 3, 5, 7])].set(5.0)}
  _, metrics = grounding.loss(jnp.ones((1, 3, 4)), head, inputs, CLASSES)
  assert float(metrics["sft/grounding/shape_accuracy"]) == 0.0
  assert float(metrics["sft/grounding/row_accuracy"]) == 0.5
  assert float(metrics["sft/grounding/column_accuracy"]) == 0.5


def test_the_loss_reads_each_row_at_its_own_image_positions():
  hidden = jnp.zeros((2, 5, 2)).at[1, 3].set(jnp.array([1.0, 0.0]))
  head = {"kernel": jnp.zeros((2, 11)).at[0, 9].set(10.0), "bias": jnp.zeros(11)}
  labels = np.zeros((2, 1, 4), np.int32)
  labels[:, 0, 3] = 2  # column 2 of 4: the head says so only where hidden[..., 0] == 1
  inputs = {"grounding_positions": jnp.array([[0], [3]]), "grounding_labels": labels,
            "grounding_mask": jnp.ones((2, 1), jnp.int32)}
  _, metrics = grounding.loss(hidden, head, inputs, CLASSES)
  assert float(metrics["sft/grounding/column_accuracy"]) == 0.5  # row 1 right, row 0 not


@pytest.fixture(scope="module")
def demo_batch(capworld_builder):
  config = load_config_file("tiny", "mode=sft")
  policy = models.policy_from_config(config.model, jax.random.key(0))
  source = datasets.open_split(capworld_builder, "train")
  examples = next(pipeline.eval_batches(source, batch_size=4))
  inputs, _ = sft.caption_chats(policy, examples, config.sampling.prompt, "sft_caption", 256)
  classes = grounding.head_classes(config, policy.config.vision)
  inputs.update(grounding.host_inputs(examples, inputs, policy.config.image_token_id,
                                      policy.config.vision.spatial_merge_size, classes))
  return config, policy, inputs, classes


def test_host_inputs_point_at_the_image_tokens_in_row_major_order(demo_batch):
  config, policy, inputs, _ = demo_batch
  ids = np.asarray(inputs["input_ids"])
  positions = inputs["grounding_positions"]
  assert (ids[np.arange(4)[:, None], positions] == policy.config.image_token_id).all()
  assert inputs["grounding_mask"].all() and positions.shape == (4, 16)  # 112 px: 4 x 4 tokens
  np.testing.assert_array_equal(inputs["grounding_labels"][0, :, 2], np.repeat(np.arange(4), 4))
  np.testing.assert_array_equal(inputs["grounding_labels"][0, :, 3], np.tile(np.arange(4), 4))
  del config


def test_sft_step_trains_the_head_and_sends_its_gradient_into_the_policy(demo_batch):
  config, policy, inputs, classes = demo_batch
  # No warmup, a constant rate: a few steps must show the head learning.
  sft_optimizer = dataclasses.replace(optim.from_config(config.sft.optimizer), warmup_steps=0,
                                      schedule="constant", learning_rate=5e-3)
  optimizer = optim.make_optimizer(sft_optimizer, total_steps=100)

  def run(weight, steps):
    """The states after each of `steps` steps (weight None: no grounding loss at all)."""
    setting = None if weight is None else sft.Grounding(
        weight=weight, layer=grounding.layer_index(config), classes=tuple(classes.items()),
        optimizer=grounding.head_optimizer(sft_optimizer, 100))
    state = train_state.initial_state(policy, optimizer, 0)
    state = jax.tree.map(jnp.copy, state)  # the step donates it; policy.params stay
    if setting is not None:
      state["grounding"] = grounding.init_state(policy.config.text.hidden_size, classes,
                                                setting.optimizer, None)
    step = sft.make_step(policy.module, optimizer, None, setting)
    states, history = [], []
    for _ in range(steps):
      state, metrics = step(state, inputs)
      states.append(jax.tree.map(np.asarray, state["params"]["visual"]))
      history.append(float(metrics.get("sft/grounding/loss", np.nan)))
    return state, states, history

  state, visual, history = run(1.0, 8)
  _, plain_visual, _ = run(None, 2)
  assert history[0] == pytest.approx(np.mean(np.log(list(classes.values()))), rel=1e-5)
  assert history[-1] < history[0] - 0.3  # the head learns the labels of this batch
  assert float(jnp.abs(state["grounding"]["params"]["kernel"]).max()) > 0
  # The zero head passes no gradient back until its first update: step 1 is plain SFT's,
  # step 2 differs in the vision tower (the loss reaches through the LM into it).
  moved = lambda a, b: max(jax.tree.leaves(jax.tree.map(  # noqa: E731
      lambda x, y: float(np.abs(x - y).max()), a, b)))
  assert moved(visual[0], plain_visual[0]) < 1e-8
  assert moved(visual[1], plain_visual[1]) > 1e-6
  # The head rides in SFT's state (checkpointed with it), outside the policy's params.
  assert sorted(state) == ["grounding", "opt_state", "params", "rng", "step"]
  assert "grounding" not in state["params"]


def test_config_problems_name_the_field():
  config = load_config_file("tiny")
  config.sft.grounding_weight = 0.5
  assert grounding.check_config(config) == []
  config.model.scan_layers = True
  assert "config.model.scan_layers=False" in grounding.check_config(config)[0]
  config.model.scan_layers = False
  config.sft.grounding_layer = 4
  assert "config.sft.grounding_layer=4" in grounding.check_config(config)[0]
  config.sft.grounding_layer = -1
  config.data.name = "caption_folder"
  assert "CapWorld" in grounding.check_config(config)[0]


def test_sft_with_grounding_resumes_its_head_and_hands_over_a_plain_policy(tmp_path):
  config = load_config_file("tiny", "mode=sft")
  config.data = tiny_data_config(tmp_path / "tfds")
  config.vision_pretrain.num_steps = 0  # its own test: tests/test_vision_pretrain.py
  config.sft.update(num_steps=2, batch_size=8, grounding_weight=0.5, image_gain_every=0)
  config.sft.optimizer.warmup_steps = 1
  config.checkpoint.every_steps = 1
  config.metrics.log_every_steps = 1
  first = sft.run(config, str(tmp_path / "sft"))
  head = np.asarray(first.state["grounding"]["params"]["kernel"])
  config.sft.num_steps = 3
  resumed = sft.run(config, str(tmp_path / "sft"))
  assert first.step == 2 and resumed.resumed_from == 2 and resumed.step == 3
  assert "grounding" not in resumed.state["params"]
  # Step 3 started from the saved head: with the same (restored) Adam state, one more step
  # moves it by at most the learning rate per entry.
  moved = np.abs(np.asarray(resumed.state["grounding"]["params"]["kernel"]) - head).max()
  assert 0 < moved <= 1.01 * config.sft.optimizer.learning_rate
  log = metrics.read_jsonl(str(tmp_path / "sft" / "metrics.jsonl"))
  assert [r["step"] for r in log] == [1, 2, 3]
  assert all(0 <= r["sft/grounding/row_accuracy"] <= 1 for r in log)


def test_host_inputs_name_the_example_whose_tokens_do_not_fit():
  scene = Scene(112, 112, "white", (SceneObject("circle", "red", "large", 56, 56, 32,
                                                "center"),), ())
  examples = {"id": ["capworld-train-7"], "scene_graph": [json.dumps(scene_to_json(scene))]}
  chats = {"input_ids": np.full((1, 16), 5), "image_grid_thw": np.array([[1, 8, 8]])}
  out = grounding.host_inputs(examples, chats, 5, 2, CLASSES | {"row": 4, "column": 4})
  assert out["grounding_labels"].shape == (1, 16, 4)
  with pytest.raises(ValueError, match="capworld-train-7: its 4x4 token grid exceeds"):
    grounding.host_inputs(examples, chats, 5, 2, CLASSES)  # 2 rows only
  chats["input_ids"][0, -1] = 0  # an image token short: the chat was cut
  with pytest.raises(ValueError, match="capworld-train-7: 15 image tokens in its chat"):
    grounding.host_inputs(examples, chats, 5, 2, CLASSES | {"row": 4, "column": 4})
