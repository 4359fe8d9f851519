"""Teacher-forced log-probabilities of sampled continuations: what the learner optimises.

Row r of a continuation batch is prompt r // G (left-padded to T tokens, exactly as the sampler
fed it) followed by rollout r's N tokens; its images are encoded once per prompt and shared by
the prompt's G rows. The logits at position T - 1 + i score generated token i, so the returned
log-probabilities line up with `Rollouts.logprobs` and equal them to float precision when the
parameters are the sampler's (the sampler/trainer mismatch the learner logs).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from balcap import parallel, sampling


def continuation_batch(policy, batch: dict[str, Any], tokens: np.ndarray, lengths: np.ndarray,
                       num_samples: int, prompt_bucket: int = sampling.PROMPT_BUCKET
                       ) -> tuple[dict[str, Any], int]:
  """Model inputs for prompts x G continuations, and the prompt length T (host side).

  `tokens` [B * G, N] and `lengths` [B * G] as in `Rollouts`; positions past a row's length
  are masked out of attention (they are padding).
  """
  family, config = policy.family, policy.config
  prepared = sampling.prepare_prompts(policy, batch, prompt_bucket)
  tokens = np.asarray(tokens, np.int32)
  steps = tokens.shape[1]
  prompt_ids = np.repeat(prepared["input_ids"], num_samples, axis=0)
  prompt_mask = np.repeat(prepared["attention_mask"], num_samples, axis=0)
  generated = (np.arange(steps)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  start = family.decode_start(config, prepared)
  inputs = {
      "input_ids": np.concatenate([prompt_ids, tokens], axis=1),
      "attention_mask": np.concatenate([prompt_mask, generated], axis=1),
      "position_ids": family.continuation_positions(config, prepared, start, num_samples,
                                                    steps),
  }
  if prepared.get("pixel_values") is not None:
    # The G rows of a prompt all point at that prompt's image features, encoded once.
    inputs.update(pixel_values=prepared["pixel_values"],
                  image_row_offsets=np.repeat(prepared["image_row_offsets"], num_samples))
    if prepared.get("vision_layout") is not None:  # Qwen's; LLaVA's fixed-size images need none
      inputs["vision_layout"] = prepared["vision_layout"]
  return inputs, prepared["input_ids"].shape[1]


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature)[token]: logits [R, N, V] scoring tokens [R, N]."""
  scale = temperature if temperature > 0 else 1.0
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32) / scale, axis=-1)
  return jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]


def continuation_logprobs(policy, params: Any, inputs: dict[str, Any], prompt_length: int,
                          tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
  """[R, N] teacher-forced log-probabilities of `tokens`; entries past a row's length score
  padding and must be masked with the lengths before use."""
  with parallel.mesh_context(policy.mesh):
    return _continuation_logprobs(policy.module, params, inputs, prompt_length,
                                  jnp.asarray(tokens), float(temperature))


@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _continuation_logprobs(module, params, inputs, prompt_length, tokens, temperature):
  logits = module.apply({"params": params}, **inputs,
                        logits_window=(prompt_length - 1, tokens.shape[1]))
  return token_logprobs(logits, tokens, temperature)
