"""Vision pre-training on CapWorld: the from-scratch vision tower learns to see objects first.

    config.vision_pretrain.num_steps = 400   # configs/tiny.py; 0 = off (every other config)

Every real captioner starts from a vision encoder that was trained to see (CLIP, SigLIP, the
ViT of Qwen2.5-VL) before it ever learns to write. CapWorld's demo policy is initialised at
random, and learning to see from the caption loss alone is slow: its SFT stage reads the image
only after ~350 steps, and then colours right 42% of the time. This stage gives the tower what
a pretrained encoder would have, from CapWorld's exact scene graphs, before SFT starts:

- the tower (patch embedding, blocks and merger: the policy's own `visual` params) encodes the
  image; each object's feature is the mean of the merged vision tokens it covers, weighted by
  how much of each token's cell its shape covers (`token_labels.object_cover`);
- a linear head reads each object's shape, colour and size from that feature; the loss is the
  mean cross-entropy over the fields and the objects of the batch.

The features are the ones the language model receives, in the layout it receives them (image
shards, `QwenVL.encode_images`); only the language model is left out. The head and its Adam
state live in this stage's state only and are dropped after it; SFT then starts from the
policy with the trained tower. Checkpoints and metrics go to `<sft workdir>/vision`, so an
interrupted run resumes here, and a finished stage is restored, not redone.

On the demo config (400 steps of 16 images, seeds 0-2): the validation split's objects named
right, colour 1.00, size 0.78-0.83, shape 0.16-0.25 (one object per image; 0.71-0.78 and
0.16-0.20 with two; chance 0.125: shapes need far more steps, a standalone probe reached ~0.3
after 500, a tower of width 128 0.23 after 400); SFT then reads the image from step ~200 instead of
~350 (`sft/image_gain`) and names colours right 75-87% of the time after 700 steps (20-42%
without this stage). Regions it cannot teach: the tower has no absolute positions (its 2-D
RoPE is relative); the language model must read them from M-RoPE.
"""

from __future__ import annotations

import json
import os
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from balcap import loop, optim, parallel, train_state
from balcap.data import datasets, pipeline
from balcap.data.capworld import token_labels, world

FIELDS = ("shape", "colour", "size")
CLASSES = {"shape": len(world.SHAPES), "colour": len(world.COLOURS), "size": len(world.SIZES)}


def check_config(config) -> list[str]:
  """Problems that make this stage impossible for `config` (empty when it is off)."""
  section = config.vision_pretrain
  if section.num_steps <= 0:
    return []
  problems = []
  if config.data.name != "capworld":
    problems.append("config.vision_pretrain.num_steps > 0 needs CapWorld's scene graphs "
                    f"(config.data.name={config.data.name!r})")
  family = (config.model.get("architecture") or {}).get("family")
  if family not in (None, "qwen2_5_vl"):  # None: the checkpoint's, checked by `run`
    problems.append("config.vision_pretrain.num_steps > 0 needs a Qwen2.5-VL policy "
                    f"(config.model.architecture.family={family!r})")
  if section.batch_size <= 0:
    problems.append(f"config.vision_pretrain.batch_size={section.batch_size} must be > 0")
  return problems


def _labels(obj: world.SceneObject) -> list[int]:
  return [world.SHAPES.index(obj.shape), list(world.COLOURS).index(obj.colour),
          list(world.SIZES).index(obj.size)]


def host_inputs(examples: dict[str, Any], prepared: dict[str, Any], merge_size: int,
                max_objects: int) -> dict[str, np.ndarray]:
  """Host side: per row, each object's cover of the row's merged tokens and its labels.

  `object_cover` [B, O, N] float32 (N = the most merged tokens of any row; O = max_objects),
  `object_labels` [B, O, 3] int32 (shape, colour, size) and `object_mask` [B, O] int32."""
  grids = np.asarray(prepared["image_grid_thw"]).reshape(-1, 3)
  ids = examples.get("id", [f"#{b}" for b in range(len(grids))])
  covers = []
  for b, (scene_json, grid) in enumerate(zip(examples["scene_graph"], grids)):
    scene = world.scene_from_json(json.loads(scene_json))
    if len(scene.objects) > max_objects:
      raise ValueError(f"example {ids[b]}: {len(scene.objects)} objects, more than "
                       f"config.data.capworld.max_objects={max_objects}")
    cover = token_labels.object_cover(scene, int(grid[1]) // merge_size,
                                      int(grid[2]) // merge_size)
    empty = [k for k in range(len(cover)) if cover[k].sum() <= 0]
    if empty:  # every CapWorld object covers some pixels; none would be a rendering bug
      raise ValueError(f"example {ids[b]}: object(s) {empty} cover no vision token")
    covers.append((cover, [_labels(o) for o in scene.objects]))
  n = max(c.shape[1] for c, _ in covers)
  out = {"object_cover": np.zeros((len(covers), max_objects, n), np.float32),
         "object_labels": np.zeros((len(covers), max_objects, len(FIELDS)), np.int32),
         "object_mask": np.zeros((len(covers), max_objects), np.int32)}
  for b, (cover, labels) in enumerate(covers):
    out["object_cover"][b, :len(cover), :cover.shape[1]] = cover
    if labels:
      out["object_labels"][b, :len(labels)] = labels
    out["object_mask"][b, :len(labels)] = 1
  return out


def image_inputs(policy, examples: dict[str, Any], prompt: str) -> dict[str, Any]:
  """The images of `examples` laid out as the policy's forward pass takes them (pixel values,
  vision layout, each row's first feature in its image shard)."""
  images = [Image.fromarray(np.asarray(image)) for image in examples["image"]]
  chats = policy.processor(prompts=[prompt] * len(images), images=images)
  return policy.family.prepare_batch(policy.config, chats,
                                     parallel.host_rows_multiple(policy.mesh))


def object_features(features: jax.Array, row_offsets: jax.Array, cover: jax.Array
                    ) -> jax.Array:
  """[B, O, D]: each object's cover-weighted mean of its row's merged features.

  features [S, F, D] (image shards, rows in S contiguous blocks, block s reading shard s);
  row_offsets [B]: each row's first feature in its shard; cover [B, O, N]."""
  shards, rows, n = features.shape[0], cover.shape[0], cover.shape[2]
  index = jnp.clip(row_offsets[:, None] + jnp.arange(n), 0, features.shape[1] - 1)
  taken = jax.vmap(lambda table, i: table[i])(features, index.reshape(shards, -1))
  taken = taken.reshape(rows, n, -1).astype(jnp.float32)
  weights = cover / jnp.maximum(cover.sum(axis=-1, keepdims=True), 1e-6)
  return jnp.einsum("bon,bnd->bod", weights, taken)


def head_loss(pooled: jax.Array, head: dict[str, jax.Array], labels: jax.Array,
              mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over FIELDS of the cross-entropy over real objects, and each field's accuracy."""
  logits = pooled @ head["kernel"] + head["bias"]
  valid = mask > 0
  count = jnp.maximum(valid.sum(), 1)
  total, metrics, start = 0.0, {}, 0
  for k, field in enumerate(FIELDS):
    field_logits = logits[..., start:start + CLASSES[field]]
    start += CLASSES[field]
    nll = optax.softmax_cross_entropy_with_integer_labels(field_logits, labels[..., k])
    field_loss = jnp.sum(jnp.where(valid, nll, 0.0)) / count
    total += field_loss / len(FIELDS)
    right = (field_logits.argmax(-1) == labels[..., k]) & valid
    metrics[f"vision/{field}_loss"] = field_loss
    metrics[f"vision/{field}_accuracy"] = right.sum() / count
  metrics["vision/loss"] = total
  return total, metrics


def make_step(module, optimizer: optax.GradientTransformation, mesh):
  """The jitted step: (state, inputs) -> (state, metrics); state["params"] holds the tower
  (`visual`) and the head (`head`)."""

  def loss_fn(params, inputs):
    features = module.apply({"params": {"visual": params["visual"]}}, inputs["pixel_values"],
                            inputs["vision_layout"], method="encode_images")
    pooled = object_features(features, inputs["image_row_offsets"], inputs["object_cover"])
    return head_loss(pooled, params["head"], inputs["object_labels"], inputs["object_mask"])

  def step(state, inputs):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], inputs)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    metrics["vision/grad_norm"] = optim.grad_norm(grads)
    return dict(state, params=optim.apply_updates(state["params"], updates),
                opt_state=opt_state, step=state["step"] + 1), metrics

  evaluate = lambda params, inputs: loss_fn(params, inputs)[1]
  return (parallel.OnMesh(jax.jit(step, donate_argnums=0), mesh),
          parallel.OnMesh(jax.jit(evaluate), mesh))


def init_head(width: int, mesh) -> dict[str, jax.Array]:
  """A zero-initialised linear head (its loss starts at exactly mean log(classes)),
  replicated on `mesh` (or on the first device without one)."""
  total = sum(CLASSES.values())
  make = lambda: {"kernel": jnp.zeros((width, total), jnp.float32),
                  "bias": jnp.zeros((total,), jnp.float32)}
  if mesh is None:
    return jax.device_put(jax.jit(make)(), jax.devices()[0])
  return jax.jit(make, out_shardings=NamedSharding(mesh, PartitionSpec()))()


def run(config, workdir: str, policy) -> loop.LoopResult:
  """Trains `policy.params["visual"]` for config.vision_pretrain.num_steps steps (resuming
  workdir's checkpoints); on return the policy holds the trained tower."""
  problems = check_config(config)
  if problems:
    raise ValueError("; ".join(problems))
  if policy.family.model_type != "qwen2_5_vl":
    raise ValueError("config.vision_pretrain.num_steps > 0 needs a Qwen2.5-VL policy; "
                     f"config.model gives {policy.family.model_type}")
  section, mesh = config.vision_pretrain, policy.mesh
  optimizer = optim.make_optimizer(optim.from_config(section.optimizer),
                                   total_steps=section.num_steps)
  builder = datasets.prepare(config.data)
  iterator = pipeline.train_iterator(
      datasets.open_split(builder, config.data.train_split),
      batch_size=parallel.host_batch_size(section.batch_size), seed=config.seed,
      read_threads=config.data.read_threads, prefetch_batches=config.data.prefetch_batches)
  trainable = {"visual": policy.params["visual"],
               "head": init_head(policy.config.vision.out_hidden_size, mesh)}
  state = train_state.initial_state(types.SimpleNamespace(params=trainable, mesh=mesh),
                                    optimizer, config.seed)
  update, evaluate = make_step(policy.module, optimizer, mesh)
  merge, max_objects = policy.config.vision.spatial_merge_size, config.data.capworld.max_objects

  def inputs_of(examples):
    prepared = image_inputs(policy, examples, config.sampling.prompt)
    inputs = {k: prepared[k] for k in ("pixel_values", "vision_layout", "image_row_offsets")}
    inputs.update(host_inputs(examples, prepared, merge, max_objects))
    return parallel.global_inputs(inputs, mesh)

  validation = inputs_of(next(pipeline.eval_batches(
      datasets.open_split(builder, config.data.eval_split),
      batch_size=parallel.host_batch_size(config.batch_size))))

  def step_fn(state, examples, step):
    state, metrics = update(state, inputs_of(examples))
    if step == section.num_steps:  # held-out objects: what SFT will start from
      metrics.update({k.replace("vision/", "vision/validation_"): v
                      for k, v in evaluate(state["params"], validation).items()})
    return state, metrics

  loop_config = config.copy_and_resolve_references()
  loop_config.num_steps = section.num_steps
  started = time.time()
  result = loop.run(workdir=workdir, config=loop_config, state=state, data_iterator=iterator,
                    step_fn=step_fn, description="vision")
  held_out = evaluate(result.state["params"], validation)
  if jax.process_index() == 0:
    print(f"      vision pre-training: {result.step}/{section.num_steps} steps in "
          f"{time.time() - started:.0f}s"
          + (f" (resumed from step {result.resumed_from})" if result.resumed_from else "")
          + "; held-out objects named right: " + ", ".join(
              f"{f} {float(held_out[f'vision/{f}_accuracy']):.2f}" for f in FIELDS), flush=True)
  policy.params = dict(policy.params, visual=result.state["params"]["visual"])
  return result


def stage_dir(sft_workdir: str) -> str:
  """Where the stage keeps its checkpoints and metrics: inside the SFT stage's folder."""
  return os.path.join(sft_workdir, "vision")
