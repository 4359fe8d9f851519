"""The jitted policy update: mu passes over a batch of rollouts, each a `lax.scan` of
micro-batched gradient accumulation followed by one optimizer update.

The batch (`RolloutBatch`) is R = B x G rollouts scored teacher-forced (`balcap.scoring`), the
logprobs under the sampling parameters ("old") and the frozen reference (when KL is on), one
advantage per rollout. With token-mean aggregation over the batch's GLOBAL token count, the
micro-batch losses add up to the full-batch loss, so accumulated gradients equal the
full-batch gradient whatever the micro-batch size.

Images are encoded once per pass, not once per micro-batch: the vision tower runs on each
device's own image shard (`models.image_shards`) under `jax.vjp`, the micro-batches
differentiate the decoder with respect to the parameters AND the image features, and the
features' cotangents, summed over micro-batches, go back through the tower once. The vision
tower trains exactly as if each micro-batch had encoded its images itself. Micro-batches are
strided (`parallel.micro_batches`): each one spreads over every data shard and keeps its rows
next to their images.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from balcap import optim, parallel, scoring
from balcap.models import layers
from balcap.rl import losses


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["continuations", "old_logprobs", "advantages", "ref_logprobs"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class RolloutBatch:
  """What one update consumes, on the devices, split over the batch axes."""
  continuations: scoring.Continuations  # rows, image shards, tokens [R, N], mask [R, N]
  old_logprobs: jax.Array               # [R, N] under the parameters that sampled
  advantages: jax.Array                 # [R]
  ref_logprobs: jax.Array | None = None  # [R, N] under the reference (KL on)


def _check_micro_batches(batch: RolloutBatch, parts: int) -> None:
  rows, images = batch.continuations.num_rows, batch.continuations.images
  shards = images["pixel_values"].shape[0] if images else 1
  if rows % parts or (rows // parts) % shards:
    raise ValueError(
        f"{rows} rollouts do not split into {parts} micro-batches that each spread over the "
        f"{shards} batch shards: config.rl.micro_batch_size must divide the rollouts and be a "
        f"multiple of the mesh's batch shards (data x fsdp = {shards})")


def make_update(module, optimizer: optax.GradientTransformation, loss_config: losses.LossConfig,
                *, num_micro_batches: int, num_passes: int, temperature: float, mesh=None,
                freeze: tuple[str, ...] = ()):
  """(state, RolloutBatch) -> (state, metrics), jitted with the state donated (one program
  per prompt and continuation length). `freeze`: the optimizer's freeze patterns, whose params
  get no gradient computed at all (`optim.stop_frozen`)."""

  def micro_loss(params, features, micro, prompt_length, total_tokens, total_sequences):
    params = optim.stop_frozen(params, freeze)
    logits = scoring.rows_logits(module, params, micro["rows"], features, prompt_length,
                                 micro["tokens"].shape[1])
    logprobs = scoring.token_logprobs(logits, micro["tokens"], temperature)
    return losses.rl_loss(logprobs, micro["old_logprobs"], micro.get("ref_logprobs"),
                          micro["advantages"], micro["mask"], loss_config, logits=logits,
                          global_tokens=total_tokens, global_sequences=total_sequences)

  def update(state, batch: RolloutBatch):
    _check_micro_batches(batch, num_micro_batches)
    c = batch.continuations
    split = functools.partial(parallel.micro_batches, parts=num_micro_batches)
    micro_batches = {"rows": scoring.split_rows(c.rows, num_micro_batches),
                     "tokens": split(c.tokens), "mask": split(c.mask),
                     "old_logprobs": split(batch.old_logprobs),
                     "advantages": split(batch.advantages)}
    if batch.ref_logprobs is not None:
      micro_batches["ref_logprobs"] = split(batch.ref_logprobs)
    mask = c.mask > 0
    total_tokens = jnp.sum(mask).astype(jnp.float32)
    total_sequences = jnp.sum(jnp.any(mask, axis=1)).astype(jnp.float32)
    loss = functools.partial(micro_loss, prompt_length=c.prompt_length,
                             total_tokens=total_tokens, total_sequences=total_sequences)

    def one_pass(carry, _):
      params, opt_state = carry
      features, vision_pullback = None, None
      if c.images:  # the tower once, on each device's own images; its backward once, below
        features, vision_pullback = jax.vjp(
            lambda p: scoring.encode_images(module, optim.stop_frozen(p, freeze), c.images),
            params)

      def accumulate(sums, micro):
        (_, stats), (grads, feature_grads) = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True)(params, features, micro)
        sums = jax.tree.map(jnp.add, sums, (grads, _as_f32(feature_grads)))
        return sums, stats

      zeros = jax.tree.map(jnp.zeros_like, (params, _as_f32(features)))
      # (Unrolled only where balcap.aot measures costs: XLA counts a loop body once.)
      (grads, feature_grads), stats = jax.lax.scan(
          accumulate, zeros, micro_batches, unroll=layers.scan_unroll(num_micro_batches))
      if vision_pullback is not None:
        (vision_grads,) = vision_pullback(feature_grads.astype(features.dtype))
        grads = jax.tree.map(jnp.add, grads, vision_grads)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      stats = losses.combine_micro_batch_stats(stats)  # the whole batch's, not a mean of means
      stats["grad_norm"] = optim.grad_norm(grads)
      return (optim.apply_updates(params, updates), opt_state), stats

    (params, opt_state), pass_stats = jax.lax.scan(
        one_pass, (state["params"], state["opt_state"]), None, length=num_passes,
        unroll=layers.scan_unroll(num_passes))
    # The first pass's statistics are those of the batch as sampled (ratio 1 when the old
    # logprobs are this step's parameters); later passes show how far the policy moved.
    metrics = {f"update/{k}": v[0] for k, v in pass_stats.items()}
    if num_passes > 1:
      metrics["update/last_pass_clip_fraction"] = pass_stats["policy/clip_fraction"][-1]
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    return new_state, metrics

  return parallel.OnMesh(jax.jit(update, donate_argnums=0), mesh)


def _as_f32(x):
  """Feature cotangents are summed over micro-batches in float32 (they are bfloat16 when the
  model computes in it); None (no images) stays None."""
  return None if x is None else x.astype(jnp.float32)
