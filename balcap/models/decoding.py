"""KV-cache decoding shared by every decoder: a prompt prefix shared by G rollouts, plus each
rollout's own generated suffix.

A prompt is prefilled once; its keys and values (the prefix, `[B, K, T, D]` per layer) serve
all G rollouts of that prompt, which only add their own generated tokens (the suffix,
`[B * G, K, N, D]`, rollout r = prompt r // G). A decode step writes the new token's key and
value into the suffix, then attends to the shared prefix and the suffix so far under one
softmax, so nothing is copied G times.

A cache is a dict of arrays {prefix_k, prefix_v, suffix_k, suffix_v}; models with scanned
layers stack each on a leading layer axis, models with unrolled layers keep a list of per-layer
dicts (cheaper on CPUs, where slicing a stacked array copies it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Cache = Any  # dict of stacked arrays, or a list of per-layer dicts


class DecodeMask(NamedTuple):
  """What a decode step may attend to (broadcast to every layer)."""
  prefix: jax.Array  # [B, T] bool: real (non-padding) prompt tokens
  step: jax.Array    # int32 scalar: suffix positions < step are filled


def write_token(cache: dict, key: jax.Array, value: jax.Array, step: jax.Array) -> dict:
  """One layer's cache with the new token's key/value [B*G, 1, K, D] at suffix `step`.

  Written BEFORE the layer attends: reading a loop-carried buffer and then updating it makes
  XLA copy the whole buffer every step, while updating and then reading happens in place.
  """
  def write(buffer, new):
    new = jnp.swapaxes(new, -3, -2).astype(buffer.dtype)  # [B*G, K, 1, D]
    return jax.lax.dynamic_update_slice(buffer, new, (0, 0, step, 0))
  return dict(cache, suffix_k=write(cache["suffix_k"], key),
              suffix_v=write(cache["suffix_v"], value))


def decode_attention(query: jax.Array, cache: dict, mask: DecodeMask,
                     scale: float | None = None) -> jax.Array:
  """One decode step: query [B*G, 1, H, D] of the new token -> [B*G, 1, H, D].

  Softmax in float32 over the prefix of the row's prompt and the suffix up to and including
  `step` (the new token, already written by `write_token`). The cache is laid out
  [rows, K, length, D] so both score matmuls are plain batched matmuls (on CPUs, XLA's
  transposing einsums cost more than the arithmetic here).
  """
  rows, _, heads, head_dim = query.shape
  prompts, kv_heads, prefix_len, _ = cache["prefix_k"].shape
  group, per_kv = rows // prompts, heads // kv_heads
  scale = head_dim ** -0.5 if scale is None else scale
  f32, lowest = jnp.float32, jnp.finfo(jnp.float32).min
  q = query.reshape(rows, kv_heads, per_kv, head_dim) * jnp.asarray(scale, query.dtype)
  # Prefix: every query of a prompt's G rows against that prompt's keys, one matmul per
  # (prompt, kv head).
  q_prefix = q.reshape(prompts, group, kv_heads, per_kv, head_dim).transpose(0, 2, 1, 3, 4)
  q_prefix = q_prefix.reshape(prompts, kv_heads, group * per_kv, head_dim)
  s_prefix = jnp.einsum("bkqd,bktd->bkqt", q_prefix, cache["prefix_k"].astype(q.dtype),
                        preferred_element_type=f32)
  s_prefix = jnp.where(mask.prefix[:, None, None, :], s_prefix, lowest)
  s_prefix = s_prefix.reshape(prompts, kv_heads, group, per_kv, prefix_len).transpose(
      0, 2, 1, 3, 4).reshape(rows, kv_heads, per_kv, prefix_len)
  s_suffix = jnp.einsum("rkhd,rknd->rkhn", q, cache["suffix_k"].astype(q.dtype),
                        preferred_element_type=f32)
  s_suffix = jnp.where(jnp.arange(cache["suffix_k"].shape[2]) <= mask.step, s_suffix, lowest)
  weights = jax.nn.softmax(jnp.concatenate([s_prefix, s_suffix], axis=-1), axis=-1)
  weights = weights.astype(query.dtype)
  w_prefix = weights[..., :prefix_len].reshape(prompts, group, kv_heads, per_kv, prefix_len)
  w_prefix = w_prefix.transpose(0, 2, 1, 3, 4).reshape(prompts, kv_heads, group * per_kv,
                                                       prefix_len)
  out_prefix = jnp.einsum("bkqt,bktd->bkqd", w_prefix, cache["prefix_v"].astype(query.dtype))
  out_prefix = out_prefix.reshape(prompts, kv_heads, group, per_kv, head_dim).transpose(
      0, 2, 1, 3, 4).reshape(rows, kv_heads, per_kv, head_dim)
  out_suffix = jnp.einsum("rkhn,rknd->rkhd", weights[..., prefix_len:],
                          cache["suffix_v"].astype(query.dtype))
  return (out_prefix + out_suffix).reshape(rows, 1, heads, head_dim)


def init_cache(prefix_kv: Any, group_size: int, max_new_tokens: int, dtype: Any) -> Cache:
  """The cache after prefill: prefix from the prefill's (k, v) [.., B, T, K, D] (stacked on a
  layer axis, or a list per layer), an empty suffix for G rows per prompt, all [.., K, len, D]."""
  def one(k, v):
    k, v = jnp.swapaxes(k, -3, -2), jnp.swapaxes(v, -3, -2)  # [.., B, K, T, D]
    suffix_shape = list(k.shape)
    suffix_shape[-4] *= group_size
    suffix_shape[-2] = max_new_tokens
    return {"prefix_k": k.astype(dtype), "prefix_v": v.astype(dtype),
            "suffix_k": jnp.zeros(suffix_shape, dtype), "suffix_v": jnp.zeros(suffix_shape, dtype)}
  if isinstance(prefix_kv, list):
    return [one(k, v) for k, v in prefix_kv]
  return one(*prefix_kv)
