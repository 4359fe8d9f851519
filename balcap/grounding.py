"""SFT's auxiliary grounding loss: the image tokens' hidden states must tell what each shows.

    config.sft.grounding_weight = 0.5   # (configs/tiny.py) total loss = caption + 0.5 * this

A policy trained from scratch learns a caption's grammar long before it reads the image: on
CapWorld, after the whole SFT stage, its captions name shapes and regions no better than
chance. This loss gives the vision tower and the language model's first layers a dense signal
from the first step. A linear head reads the residual stream after language-model layer
`grounding_layer` at every image token and predicts that token's CapWorld labels
(`balcap.data.capworld.token_labels`: the shape and colour under it, its row and column);
the loss is the mean cross-entropy over the four fields. The layer is a middle one, so the
caption tokens of the layers above can attend to what it learned to put there.

The head is not part of the policy: it lives in the SFT state under "grounding" (its own
Adam, the SFT schedule, no learning-rate multipliers), is checkpointed with it for exact
resume, and is dropped when SFT ends; RL and every exported checkpoint see the plain policy.
Only the Qwen2.5-VL family with unrolled layers (`model.scan_layers=False`) on CapWorld has
what it needs; `check_config` says so otherwise.

What it did on the CapWorld demo (seed 0, weight 0.5, 700 SFT steps): the head soon reads
rows (100%) and colours (~93%), and columns (100%) once `rope_theta` is 100: at Qwen's 1e6
with 32-dim heads, M-RoPE's width section turns by ~1e-4 rad per column and columns stay
at ~37%. Shapes stay at chance. The captions gained nothing: they name colours right 12-13%
of the time against 42% without the loss (a guess: the two losses compete for the same
layers). It is off in `configs/tiny.py`; the README's demo section has the runs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from balcap import optim
from balcap.data.capworld import token_labels as labels_lib
from balcap.data.capworld import world

FIELDS = labels_lib.FIELDS


def layer_index(config) -> int:
  """The language-model layer whose output the head reads: `sft.grounding_layer`, or the middle
  one (-1)."""
  layer = int(config.sft.grounding_layer)
  num_layers = int(config.model.architecture["text"]["num_layers"])
  return num_layers // 2 - 1 if layer < 0 else layer


def check_config(config) -> list[str]:
  """Problems that make the grounding loss impossible for `config` (empty when it is off)."""
  if not config.sft.grounding_weight:
    return []
  problems = []
  if config.sft.grounding_weight < 0:
    problems.append(f"config.sft.grounding_weight={config.sft.grounding_weight} must be >= 0")
  if config.data.name != "capworld":
    problems.append("config.sft.grounding_weight > 0 needs CapWorld's scene graphs "
                    f"(config.data.name={config.data.name!r})")
  arch = config.model.get("architecture") or {}
  if not arch or arch.get("family") != "qwen2_5_vl":
    problems.append("config.sft.grounding_weight > 0 needs a Qwen2.5-VL policy given by "
                    "config.model.architecture")
  elif config.model.scan_layers:
    problems.append("config.sft.grounding_weight > 0 reads one layer's output: set "
                    "config.model.scan_layers=False")
  elif not -1 <= config.sft.grounding_layer < arch["text"]["num_layers"]:
    problems.append(f"config.sft.grounding_layer={config.sft.grounding_layer} is not a layer "
                    f"of the {arch['text']['num_layers']}-layer language model (or -1)")
  return problems


def host_inputs(examples: dict[str, Any], chats: dict[str, np.ndarray], image_token_id: int,
                merge_size: int, classes: dict[str, int]) -> dict[str, np.ndarray]:
  """Host side, per example: where its image tokens are in its row and their labels.

  `grounding_positions` [B, N] int32, `grounding_labels` [B, N, 4] int32 and
  `grounding_mask` [B, N] (N = the most image tokens of any row; shorter rows are padded)."""
  input_ids = np.asarray(chats["input_ids"])
  grids = np.asarray(chats["image_grid_thw"]).reshape(-1, 3)
  rows = []
  ids = examples.get("id", [f"#{b}" for b in range(len(grids))])
  for b, (scene_json, grid) in enumerate(zip(examples["scene_graph"], grids)):
    scene = world.scene_from_json(json.loads(scene_json))
    grid_h, grid_w = int(grid[1]) // merge_size, int(grid[2]) // merge_size
    positions = np.flatnonzero(input_ids[b] == image_token_id)
    labels = labels_lib.token_labels(scene, grid_h, grid_w)
    if len(positions) != len(labels):  # a caption cut before the image ends, or a bug
      raise ValueError(f"example {ids[b]}: {len(positions)} image tokens in its chat, but its "
                       f"{grid_h}x{grid_w} token grid has {len(labels)}")
    too_big = [f for k, f in enumerate(FIELDS) if labels[:, k].max() >= classes[f]]
    if too_big:
      raise ValueError(f"example {ids[b]}: its {grid_h}x{grid_w} token grid exceeds the "
                       f"grounding head's classes {classes} in {too_big}")
    rows.append((positions, labels))
  n = max(len(p) for p, _ in rows)
  out = {"grounding_positions": np.zeros((len(rows), n), np.int32),
         "grounding_labels": np.zeros((len(rows), n, len(FIELDS)), np.int32),
         "grounding_mask": np.zeros((len(rows), n), np.int32)}
  for b, (positions, labels) in enumerate(rows):
    out["grounding_positions"][b, :len(positions)] = positions
    out["grounding_labels"][b, :len(labels)] = labels
    out["grounding_mask"][b, :len(positions)] = 1
  return out


def head_classes(config, vision) -> dict[str, int]:
  """Classes per field; rows and columns up to the largest image CapWorld draws (a larger one
  is only ever resized down, by max_pixels). `vision`: the policy's vision config."""
  cell = vision.patch_size * vision.spatial_merge_size  # pixels per merged token's side
  sizes = config.data.capworld.image_sizes
  # Qwen's resize rounds each side to the nearest multiple of `cell`.
  grid_h = max(round(h / cell) for _, h in sizes)
  grid_w = max(round(w / cell) for w, _ in sizes)
  return labels_lib.num_classes(max(grid_h, 1), max(grid_w, 1))


def init_state(hidden_size: int, classes: dict[str, int], optimizer: optax.GradientTransformation,
               mesh) -> dict[str, Any]:
  """{"params", "opt_state"} of a zero-initialised linear head (its loss starts at exactly
  log(classes) per field), replicated on `mesh` (or on the first device without one)."""
  total = sum(classes[f] for f in FIELDS)

  def make():
    head = {"kernel": jnp.zeros((hidden_size, total), jnp.float32),
            "bias": jnp.zeros((total,), jnp.float32)}
    return {"params": head, "opt_state": optimizer.init(head)}

  if mesh is None:
    return jax.device_put(jax.jit(make)(), jax.devices()[0])
  # Built by jit with output shardings: every leaf on the mesh, as the step expects.
  return jax.jit(make, out_shardings=NamedSharding(mesh, PartitionSpec()))()


def head_optimizer(sft_optimizer: optim.OptimizerConfig, total_steps: int
                   ) -> optax.GradientTransformation:
  """The SFT optimizer without the policy's per-path multipliers and freezes."""
  return optim.make_optimizer(dataclasses.replace(sft_optimizer, learning_rate_multipliers=(),
                                                  freeze=()), total_steps=total_steps)


def capture_filter(layer: int):
  """For `module.apply(capture_intermediates=...)`: the output of language-model layer `layer`."""
  path = ("lm", f"layers_{layer}")
  return lambda module, method: method == "__call__" and tuple(module.scope.path) == path


def captured_hidden(intermediates: dict[str, Any], layer: int) -> jax.Array:
  """The [B, T, D] residual stream that `capture_filter(layer)` caught."""
  output = intermediates["intermediates"]["lm"][f"layers_{layer}"]["__call__"][0]
  return output[0]  # a decoder layer returns (hidden, kv)


def loss(hidden: jax.Array, head: dict[str, jax.Array], inputs: dict[str, jax.Array],
         classes: dict[str, int]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over the fields of the cross-entropy at every image token, and metrics: each field's
  loss and accuracy (shape and colour over the tokens an object covers, the chance-level
  answer "background" being uninformative)."""
  positions, labels = inputs["grounding_positions"], inputs["grounding_labels"]
  mask = inputs["grounding_mask"] > 0
  picked = jnp.take_along_axis(hidden, positions[..., None], axis=1).astype(jnp.float32)
  logits = picked @ head["kernel"] + head["bias"]
  total, metrics, start = 0.0, {}, 0
  on_object = mask & (labels[..., 0] > 0)
  for k, field in enumerate(FIELDS):
    field_logits = logits[..., start:start + classes[field]]
    start += classes[field]
    nll = optax.softmax_cross_entropy_with_integer_labels(field_logits, labels[..., k])
    field_loss = jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(mask.sum(), 1)
    total += field_loss / len(FIELDS)
    right = field_logits.argmax(-1) == labels[..., k]
    counted = on_object if field in ("shape", "colour") else mask
    metrics[f"sft/grounding/{field}_loss"] = field_loss
    metrics[f"sft/grounding/{field}_accuracy"] = (
        jnp.sum(right & counted) / jnp.maximum(counted.sum(), 1))
  metrics["sft/grounding/loss"] = total
  return total, metrics
