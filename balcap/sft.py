"""Mode `sft`: the supervised warm start — next-token loss on the caption tokens only.

    python -m balcap.main --config=configs/tiny.py:mode=sft

Each example becomes one chat (system, user turn with the image and `config.sampling.prompt`,
assistant turn with the target caption: CapWorld's flawed `sft_caption`, or the first reference)
right-padded to `config.sft.max_length` tokens; the loss is the mean cross-entropy over every
caption token of the GLOBAL batch (the end token included, so the model learns to stop). The
step is one jitted function with params and optimizer state donated; the loop, checkpoints
(workdir/sft), resume and metrics are `balcap.loop`'s.

Options: `sft.image_gain_every` measures whether the policy reads the image at all
(`ImageGain`); on CapWorld, `sft.grounding_weight` adds `balcap.grounding`'s auxiliary loss and
`vision_pretrain.num_steps` first trains the vision tower to see objects
(`balcap.vision_pretrain`, checkpoints in workdir/sft/vision).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from balcap import grounding, loop, optim, parallel, train_state, vision_pretrain
from balcap.data import datasets, pipeline
from balcap.models import policy as policy_lib

log = logging.getLogger(__name__)


LENGTH_BUCKET = 64


def caption_chats(policy, examples: dict[str, Any], prompt: str, target: str,
                  max_length: int) -> tuple[dict[str, np.ndarray], int]:
  """Host side: one prepared chat per example with its caption as the answer, right-padded (or
  cut) to `max_length`; adds `loss_mask` [B, T] marking the caption tokens. Returns the inputs
  and how many captions had to be cut."""
  captions = [refs[0] for refs in examples["references"]] if target == "reference" else list(
      examples[target])
  images = [Image.fromarray(np.asarray(image)) for image in examples["image"]]
  chats = policy.processor(prompts=[prompt] * len(captions), images=images,
                           responses=captions, padding_side="right")
  length = chats["input_ids"].shape[1]
  cut = int((chats["attention_mask"].sum(axis=1) > max_length).sum())
  # Padded to a multiple of LENGTH_BUCKET (at most max_length): a few compiled shapes, and
  # a batch of short captions does not pay for the longest possible one.
  # Every host pads to the same length: its rows join the others' in one global array.
  target = parallel.host_max(min(max_length, -(-length // LENGTH_BUCKET) * LENGTH_BUCKET))
  for key in ("input_ids", "attention_mask", "response_mask"):
    value = chats[key]
    chats[key] = (np.pad(value, ((0, 0), (0, target - length))) if length < target
                  else value[:, :target])
  loss_mask = chats.pop("response_mask").astype(np.int32)
  prepared = policy.family.prepare_batch(policy.config, chats,
                                         parallel.host_rows_multiple(policy.mesh))
  prepared["loss_mask"] = loss_mask
  return prepared, cut


def apply_model(module, params, inputs, **kwargs):
  """The policy's logits on a prepared batch (its `policy.model_inputs`); kwargs go to
  apply."""
  return module.apply({"params": params}, **policy_lib.model_inputs(inputs), **kwargs)


def next_token_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(token) over masked targets, number of masked targets); logits at position
  t predict token t + 1."""
  targets = input_ids[:, 1:]
  mask = loss_mask[:, 1:] > 0
  logprobs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(mask, picked, 0.0)), jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class Grounding:
  """The auxiliary grounding loss's settings (`balcap.grounding`)."""
  weight: float
  layer: int
  classes: tuple[tuple[str, int], ...]
  optimizer: optax.GradientTransformation


def make_step(module, optimizer: optax.GradientTransformation, mesh,
              grounding_loss: Grounding | None = None, freeze: tuple[str, ...] = ()):
  """The jitted SFT step: (state, inputs) -> (state, metrics), state donated. With
  `grounding_loss`, state["grounding"] holds the head's params and optimizer state. `freeze`:
  the optimizer's freeze patterns, whose params get no gradient computed at all."""

  def step(state, inputs):
    def loss_fn(params, head):
      params = optim.stop_frozen(params, freeze)
      if grounding_loss is None:
        logits = apply_model(module, params, inputs)
      else:
        logits, captured = apply_model(
            module, params, inputs, mutable=["intermediates"],
            capture_intermediates=grounding.capture_filter(grounding_loss.layer))
      total, count = next_token_loss(logits, inputs["input_ids"], inputs["loss_mask"])
      caption_loss = total / jnp.maximum(count, 1)
      aux = {"sft/loss": caption_loss, "sft/tokens": count.astype(jnp.float32)}
      if grounding_loss is None:
        return caption_loss, aux
      hidden = grounding.captured_hidden(captured, grounding_loss.layer)
      extra, extra_metrics = grounding.loss(hidden, head, inputs,
                                            dict(grounding_loss.classes))
      return caption_loss + grounding_loss.weight * extra, dict(aux, **extra_metrics)

    head = state["grounding"]["params"] if grounding_loss is not None else None
    (_, metrics), (grads, head_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state["params"], head)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optim.apply_updates(state["params"], updates)
    metrics["sft/grad_norm"] = optim.grad_norm(grads)
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    if grounding_loss is not None:
      head_updates, head_opt = grounding_loss.optimizer.update(
          head_grads, state["grounding"]["opt_state"], head)
      new_state["grounding"] = {"params": optim.apply_updates(head, head_updates),
                                "opt_state": head_opt}
    return new_state, metrics

  return parallel.OnMesh(jax.jit(step, donate_argnums=0), mesh)


def make_loss(module, mesh):
  """The jitted caption loss alone: inputs -> (sum of -log p over caption tokens, count)."""

  def caption_loss(params, inputs):
    return next_token_loss(apply_model(module, params, inputs), inputs["input_ids"],
                           inputs["loss_mask"])

  return parallel.OnMesh(jax.jit(caption_loss), mesh)


class ImageGain:
  """Does the policy read the image? Its caption loss on a fixed validation batch, with the
  true images and with each caption's image swapped for its neighbour's (rolled by one in the
  host's batch): `sft/image_gain` = shuffled - true, in nats per caption token.

  A policy trained from scratch can fit the captions' grammar and never read the image; then
  the gain stays at ~0 however low the loss goes (a seed of the CapWorld demo did just that).
  It is the first number to look at when captions do not match their images."""

  def __init__(self, policy, source, *, batch_size: int, prompt: str, target: str,
               max_length: int, mesh):
    """source: the validation split; batch_size: global examples (sft.batch_size)."""
    examples = next(pipeline.eval_batches(source,
                                          batch_size=parallel.host_batch_size(batch_size)))
    if len(examples["image"]) < 2:
      raise ValueError(f"config.sft.image_gain_every needs >= 2 examples per host in "
                       f"config.sft.batch_size={batch_size}")
    rolled = np.roll(np.arange(len(examples["image"])), 1)
    shuffled = dict(examples, image=[examples["image"][i] for i in rolled])
    self.inputs = [parallel.global_inputs(
        caption_chats(policy, batch, prompt, target, max_length)[0], mesh)
                   for batch in (examples, shuffled)]
    self._loss = make_loss(policy.module, mesh)

  def __call__(self, params) -> dict[str, float]:
    (true_sum, count), (shuffled_sum, _) = (self._loss(params, inputs)
                                            for inputs in self.inputs)
    true = float(true_sum) / max(float(count), 1.0)
    shuffled = float(shuffled_sum) / max(float(count), 1.0)
    return {"sft/validation_loss": true, "sft/validation_loss_shuffled_images": shuffled,
            "sft/image_gain": shuffled - true}


def run(config, workdir: str, policy=None) -> loop.LoopResult:
  """SFT for config.sft.num_steps steps (resuming workdir's checkpoints); returns the loop's
  result, whose state["params"] are the warm-started policy's.

  A given `policy` is trained in place: its params are donated to the first step (their
  buffers are deleted), and on return `policy.params` are the trained ones."""
  from balcap import models  # pylint: disable=import-outside-toplevel
  mesh = parallel.make_mesh(config.mesh)
  if policy is None:
    policy = models.policy_from_config(config.model, jax.random.key(config.seed), mesh=mesh)
  if policy.processor is None:
    raise ValueError("SFT needs a tokenizer: set config.model.tokenizer")
  sft = config.sft
  optimizer = optim.make_optimizer(optim.from_config(sft.optimizer), total_steps=sft.num_steps)
  builder = datasets.prepare(config.data)
  source = datasets.open_split(builder, config.data.train_split)
  image_gain = None
  if sft.image_gain_every > 0:
    image_gain = ImageGain(policy, datasets.open_split(builder, config.data.eval_split),
                           batch_size=sft.batch_size, prompt=config.sampling.prompt,
                           target=sft.target, max_length=sft.max_length, mesh=mesh)
  if config.vision_pretrain.num_steps > 0:  # the tower learns to see before SFT starts
    vision_pretrain.run(config, vision_pretrain.stage_dir(workdir), policy)
  iterator = pipeline.train_iterator(
      source, batch_size=parallel.host_batch_size(sft.batch_size), seed=config.seed,
      read_threads=config.data.read_threads, prefetch_batches=config.data.prefetch_batches)
  state = train_state.initial_state(policy, optimizer, config.seed)
  grounding_loss = None
  if sft.grounding_weight:
    problems = grounding.check_config(config)
    if problems:
      raise ValueError("; ".join(problems))
    classes = grounding.head_classes(config, policy.config.vision)
    grounding_loss = Grounding(
        weight=float(sft.grounding_weight), layer=grounding.layer_index(config),
        classes=tuple(classes.items()),
        optimizer=grounding.head_optimizer(optim.from_config(sft.optimizer), sft.num_steps))
    state["grounding"] = grounding.init_state(policy.config.text.hidden_size, classes,
                                              grounding_loss.optimizer, mesh)
  update = make_step(policy.module, optimizer, mesh, grounding_loss,
                     freeze=tuple(optim.from_config(sft.optimizer).freeze))

  def step_fn(state, examples, step):
    inputs, cut = caption_chats(policy, examples, config.sampling.prompt, sft.target,
                                sft.max_length)
    if grounding_loss is not None:
      inputs.update(grounding.host_inputs(
          examples, inputs, policy.config.image_token_id,
          policy.config.vision.spatial_merge_size, dict(grounding_loss.classes)))
    state, metrics = update(state, parallel.global_inputs(inputs, mesh))
    metrics["sft/cut_captions"] = cut
    if image_gain is not None and (step % sft.image_gain_every == 0 or step == sft.num_steps):
      metrics.update(image_gain(state["params"]))
    return state, metrics

  loop_config = config.copy_and_resolve_references()
  loop_config.num_steps = sft.num_steps
  result = loop.run(workdir=workdir, config=loop_config,
                    state=state,
                    data_iterator=iterator, step_fn=step_fn, description="sft")
  policy.params = result.state["params"]  # the donated buffers are gone: hand over the new
  return result
