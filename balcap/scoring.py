"""Teacher-forced log-probabilities of sampled continuations: what the learner optimises.

Row r of a continuation batch is prompt r // G (left-padded to T tokens, exactly as the sampler
fed it) followed by rollout r's N tokens. Everything is built on the devices from the
sampler's own inputs and outputs (`continuations`): the prompts are prepared once per step,
tokens never visit the host, and the image shards the sampler encoded serve the scoring and
the update unchanged (prompt p's G rows sit in p's image shard, `models.image_shards`). The
logits at position T - 1 + i score generated token i, so the returned log-probabilities line
up with `Rollouts.logprobs` and equal them to float precision when the parameters are the
sampler's (the sampler/trainer mismatch the learner logs).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from balcap import parallel, sampling
from balcap.models import layers, policy as policy_lib

# Model inputs with one entry per image shard (the rest have one per row).
IMAGE_INPUTS = ("pixel_values", "vision_layout")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["rows", "images", "tokens", "mask"],
                   meta_fields=["prompt_length"])
@dataclasses.dataclass(frozen=True)
class Continuations:
  """R = B x G prompt + continuation rows, on the devices (row r: rollout r % G of prompt
  r // G), split over the batch axes."""
  rows: dict[str, jax.Array]    # input_ids, attention_mask [R, T + N], position_ids
                                # [3, R, T + N], image_row_offsets [R] (with images)
  images: dict[str, Any]        # pixel_values, vision_layout [S, ...] (empty: text only)
  tokens: jax.Array             # [R, N] the generated tokens (padding past each length)
  mask: jax.Array               # [R, N] int32: 1 on generated tokens
  prompt_length: int            # T

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]


def continuations(prompt_inputs: dict[str, Any], start: jax.Array, tokens: jax.Array,
                  lengths: jax.Array, num_samples: int, mesh=None) -> Continuations:
  """The continuation batch of prompts (the sampler's inputs, on the devices) and their
  rollouts' tokens [B * G, N] and lengths [B * G]; positions past a row's length are masked
  out of attention (they are padding)."""
  rows_in = {k: v for k, v in prompt_inputs.items() if k not in IMAGE_INPUTS}
  with parallel.mesh_context(mesh):
    rows, mask = _rows(rows_in, start, tokens, lengths, num_samples)
  images = {k: prompt_inputs[k] for k in IMAGE_INPUTS if prompt_inputs.get(k) is not None}
  return Continuations(rows, images, tokens, mask, prompt_inputs["input_ids"].shape[1])


@functools.partial(jax.jit, static_argnums=4)
def _rows(prompt, start, tokens, lengths, group):
  steps = tokens.shape[1]
  repeat = lambda x, axis=0: jnp.repeat(x, group, axis=axis)  # noqa: E731
  mask = (jnp.arange(steps)[None] < lengths[:, None]).astype(jnp.int32)
  generated = repeat(start)[:, None] + jnp.arange(steps, dtype=jnp.int32)[None]
  positions = prompt["position_ids"]
  rows = {
      "input_ids": jnp.concatenate([repeat(prompt["input_ids"]), tokens], axis=1),
      "attention_mask": jnp.concatenate(
          [repeat(prompt["attention_mask"]).astype(jnp.int32), mask], axis=1),
      # M-RoPE: the prompt's positions, then the generated tokens counting up from `start`
      # equally on the three axes (both families: LLaVA's three rows are equal).
      "position_ids": jnp.concatenate(
          [repeat(positions, axis=1),
           jnp.broadcast_to(generated[None], (positions.shape[0],) + generated.shape)],
          axis=-1).astype(jnp.int32),
  }
  if "image_row_offsets" in prompt:  # the G rows of a prompt read that prompt's features
    rows["image_row_offsets"] = repeat(prompt["image_row_offsets"])
  for key, value in rows.items():
    axes = (None, "batch", None) if key == "position_ids" else ("batch",) + (None,) * (
        value.ndim - 1)
    rows[key] = nn.with_logical_constraint(value, axes)
  return rows, nn.with_logical_constraint(mask, ("batch", None))


def continuation_batch(policy, batch: dict[str, Any], tokens: np.ndarray, lengths: np.ndarray,
                       num_samples: int, prompt_bucket: int = sampling.PROMPT_BUCKET
                       ) -> Continuations:
  """`continuations` from a processor batch and host tokens [B * G, N] and lengths (each
  host its own rows): prepares and places the prompts as the sampler does (tests,
  benchmarks; the learner keeps the sampler's own)."""
  prepared = sampling.prepare_prompts(policy, batch, prompt_bucket)
  inputs = parallel.global_inputs(policy_lib.model_inputs(prepared), policy.mesh)
  start = policy.family.decode_start(policy.config, prepared).astype(np.int32)
  placed = parallel.global_inputs({"start": start, "tokens": np.asarray(tokens, np.int32),
                                   "lengths": np.asarray(lengths, np.int32)}, policy.mesh)
  return continuations(inputs, placed["start"], placed["tokens"], placed["lengths"],
                       num_samples, policy.mesh)


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature)[token]: logits [R, N, V] scoring tokens [R, N]."""
  scale = temperature if temperature > 0 else 1.0
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32) / scale, axis=-1)
  return jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]


def encode_images(module, params: Any, images: dict[str, Any]) -> jax.Array | None:
  """The image features of a batch's image shards ([S, F, D]); None without images."""
  if not images:
    return None
  return module.apply({"params": params}, images["pixel_values"], images.get("vision_layout"),
                      method=module.encode_images)


def rows_logits(module, params: Any, rows: dict[str, Any], features: jax.Array | None,
                prompt_length: int, steps: int) -> jax.Array:
  """Logits [R', N, V] scoring the N generated tokens of continuation rows (any subset of a
  batch's rows that keeps each row in its image shard, e.g. a strided micro-batch)."""
  return module.apply({"params": params}, **rows, image_features=features,
                      logits_window=(prompt_length - 1, steps))


def split_rows(rows: dict[str, jax.Array], parts: int) -> dict[str, jax.Array]:
  """Strided micro-batches of continuation rows (`parallel.micro_batches`)."""
  return {k: parallel.micro_batches(v, parts, axis=parallel.BATCH_AXIS_OF.get(k, 0))
          for k, v in rows.items()}


def continuation_logprobs(policy, params: Any, batch: Continuations, temperature: float = 1.0,
                          num_micro_batches: int = 1) -> jax.Array:
  """[R, N] teacher-forced log-probabilities of `batch.tokens` (entries past a row's length
  score padding: mask them with `batch.mask`). The images are encoded once; the rows go
  through the decoder `num_micro_batches` strided micro-batches at a time, so only one
  micro-batch's logits [R / M, N, V] are ever alive."""
  with parallel.mesh_context(policy.mesh):
    return _continuation_logprobs(policy.module, params, batch, float(temperature),
                                  int(num_micro_batches))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _continuation_logprobs(module, params, batch, temperature, num_micro_batches):
  features = encode_images(module, params, batch.images)
  steps = batch.tokens.shape[1]

  def one(_, micro):
    logits = rows_logits(module, params, micro["rows"], features, batch.prompt_length, steps)
    return None, token_logprobs(logits, micro["tokens"], temperature)

  micro = {"rows": split_rows(batch.rows, num_micro_batches),
           "tokens": parallel.micro_batches(batch.tokens, num_micro_batches)}
  # (Unrolled only where balcap.aot measures costs: XLA counts a loop body once.)
  _, logprobs = jax.lax.scan(one, None, micro, unroll=layers.scan_unroll(num_micro_batches))
  return parallel.join_micro_batches(logprobs)
