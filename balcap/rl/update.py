"""The jitted policy update: mu passes over a batch of rollouts, each a `lax.scan` of
micro-batched gradient accumulation followed by one optimizer update.

The batch is R = B x G rollouts scored teacher-forced (`balcap.scoring`): rows [R, T + N] of
prompt + continuation, the tokens [R, N] and their mask, the logprobs under the sampling
parameters ("old") and the frozen reference (when KL is on), one advantage per rollout. With
token-mean aggregation over the batch's GLOBAL token count, the micro-batch losses add up to the
full-batch loss, so accumulated gradients equal the full-batch gradient whatever the
micro-batch size. Images are encoded inside each micro-batch (their rows share the prompt's
features through `image_row_offsets`), so the vision tower trains with the rest.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from balcap import optim, parallel
from balcap.models import layers
from balcap.rl import losses
from balcap.scoring import token_logprobs

# Inputs of the continuation batch that are one row per rollout (micro-batched); the image
# patch table and its layout are shared by every micro-batch.
_ROW_FIELDS = ("input_ids", "attention_mask", "image_row_offsets")


def _split(x: jax.Array, parts: int, axis: int = 0) -> jax.Array:
  """[..., R, ...] -> [parts, ..., R / parts, ...] (the new leading axis is scanned over)."""
  shape = x.shape[:axis] + (parts, x.shape[axis] // parts) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def make_update(module, optimizer: optax.GradientTransformation, loss_config: losses.LossConfig,
                *, prompt_length: int, num_micro_batches: int, num_passes: int,
                temperature: float, mesh=None):
  """(state, batch) -> (state, metrics), jitted with the state donated.

  batch: {"inputs": continuation inputs, "tokens" [R, N], "mask" [R, N], "old_logprobs"
  [R, N], "ref_logprobs" [R, N] or absent, "advantages" [R]}.
  """

  def micro_loss(params, shared, micro, total_tokens, total_sequences):
    logits = module.apply({"params": params}, **shared, **micro["inputs"],
                          logits_window=(prompt_length - 1, micro["tokens"].shape[1]))
    logprobs = token_logprobs(logits, micro["tokens"], temperature)
    return losses.rl_loss(logprobs, micro["old_logprobs"], micro.get("ref_logprobs"),
                          micro["advantages"], micro["mask"], loss_config, logits=logits,
                          global_tokens=total_tokens, global_sequences=total_sequences)

  def update(state, batch):
    inputs = batch["inputs"]
    shared = {k: v for k, v in inputs.items() if k not in _ROW_FIELDS + ("position_ids",)}
    rows = {k: _split(inputs[k], num_micro_batches) for k in _ROW_FIELDS if k in inputs}
    rows["position_ids"] = _split(inputs["position_ids"], num_micro_batches, axis=1)
    micro_batches = {"inputs": rows}
    for key in ("tokens", "mask", "old_logprobs", "ref_logprobs", "advantages"):
      if key in batch:
        micro_batches[key] = _split(batch[key], num_micro_batches)
    mask = batch["mask"] > 0
    total_tokens = jnp.sum(mask).astype(jnp.float32)
    total_sequences = jnp.sum(jnp.any(mask, axis=1)).astype(jnp.float32)

    def one_pass(carry, _):
      params, opt_state = carry

      def accumulate(grads, micro):
        (_, stats), micro_grads = jax.value_and_grad(micro_loss, has_aux=True)(
            params, shared, micro, total_tokens, total_sequences)
        return jax.tree.map(jnp.add, grads, micro_grads), stats

      zeros = jax.tree.map(jnp.zeros_like, params)
      # (Unrolled only where balcap.aot measures costs: XLA counts a loop body once.)
      grads, stats = jax.lax.scan(accumulate, zeros, micro_batches,
                                  unroll=layers.scan_unroll(num_micro_batches))
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
