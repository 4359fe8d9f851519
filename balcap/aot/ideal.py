"""What a program should cost: model FLOPs by formula and the bytes it cannot avoid moving.

The compile report divides the compiled program's FLOPs and bytes by these, so a ratio far
above 1 points at waste (recomputation, redundant work, copies). Conventions:
  - a matmul of an [m, k] by a [k, n] costs 2 m k n FLOPs; attention scores and the weighted
    sum cost 4 x queries x keys x (heads x head_dim) per layer, over the full (masked) key
    length, as the compiled programs compute it;
  - backward = 2 x forward; full remat adds one more forward (update and SFT);
  - bytes: what a perfectly fused program still moves through HBM. Every weight the device
    computes with, read once per use (FSDP gathers the full weight onto each device, tensor
    parallelism splits it); the KV cache a decode step must read and the new keys/values it
    writes; the residual stream between layers (each layer reads its input and writes its
    output once; everything inside a layer stays on chip). Training (`training_bytes`) reads
    the weights and the residual stream again in each pass over a micro-batch (forward, the
    remat forward, backward), writes each micro-batch's weight gradients and adds them into
    the device's f32 gradient shard, and reads and writes the device's shard of params,
    gradients and the two Adam moments once per step. Logits never reach HBM in this ideal
    (a fused vocabulary projection and log-softmax), nor do attention scores.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Dims:
  """The sizes the formulas need, for either family."""
  text_layers: int
  text_hidden: int
  text_intermediate: int
  heads: int
  kv_heads: int
  head_dim: int
  vocab: int
  vision_layers: int
  vision_hidden: int
  vision_intermediate: int
  vision_mlp_matrices: int      # 3 gated (Qwen), 2 plain (CLIP)
  vision_window: int            # tokens each vision token attends to in windowed blocks
  vision_full_blocks: int       # blocks attending over the whole image
  projector_flops_per_image: float


def dims_of(config) -> Dims:
  """The formula's sizes from a family config (Qwen2.5-VL or LLaVA-1.5)."""
  t, v = config.text, config.vision
  head_dim = t.hidden_size // t.num_heads
  text = (t.num_layers, t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads,
          head_dim, t.vocab_size)
  if hasattr(v, "depth"):  # Qwen2.5-VL's windowed ViT (its 2x2 merger: vision_flops)
    window = (v.window_size // v.patch_size) ** 2
    return Dims(*text, v.depth, v.hidden_size, v.intermediate_size, 3, window,
                len(v.fullatt_block_indexes), 0.0)
  # LLaVA-1.5: CLIP over grid^2 + 1 tokens up to its feature layer, a 2-layer projector.
  tokens = v.grid ** 2
  layers = v.num_layers + v.feature_layer + 1 if v.feature_layer < 0 else v.feature_layer
  projector = 2.0 * tokens * (v.hidden_size * t.hidden_size + t.hidden_size * t.hidden_size)
  return Dims(*text, layers, v.hidden_size, v.intermediate_size, 2, tokens + 1, layers,
              projector)


def text_flops(d: Dims, rows: int, tokens: int, context: int, scored: int) -> float:
  """Forward FLOPs of `rows` x `tokens` decoder tokens attending over `context` keys, with
  the vocabulary projection on `scored` tokens per row."""
  q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
  per_token = 2.0 * (d.text_hidden * (2 * q + 2 * kv) + 3 * d.text_hidden * d.text_intermediate)
  attention = 4.0 * context * q
  return rows * (tokens * d.text_layers * (per_token + attention)
                 + scored * 2.0 * d.text_hidden * d.vocab)


def vision_flops(config, d: Dims, images: int, patches_per_image: int) -> float:
  """Forward FLOPs of the vision tower and projector over `images` images."""
  if images == 0:
    return 0.0
  h = d.vision_hidden
  per_token = 2.0 * (4 * h * h + d.vision_mlp_matrices * h * d.vision_intermediate)
  windowed = d.vision_layers - d.vision_full_blocks
  attention = 4.0 * h * (windowed * min(d.vision_window, patches_per_image)
                         + d.vision_full_blocks * patches_per_image)
  tower = patches_per_image * (d.vision_layers * per_token + attention)
  if hasattr(config.vision, "depth"):  # Qwen's merger: 2x2 patches -> one LM token
    v = config.vision
    merged_in = h * v.spatial_merge_size ** 2
    tokens = patches_per_image / v.spatial_merge_size ** 2
    tower += 2.0 * tokens * (merged_in * merged_in + merged_in * v.out_hidden_size)
  else:
    tower += d.projector_flops_per_image
  return images * tower


def residual_bytes(d: Dims, tokens: float, itemsize: int, passes: int) -> float:
  """HBM bytes of the decoder's residual stream for `tokens` tokens on one device: each of
  `passes` passes (2 for a forward: read the input and write the output of every layer)."""
  return passes * d.text_layers * tokens * d.text_hidden * itemsize


def training_bytes(weights: float, vision_weights: float, shard_params: float,
                   micro_batches: int, remat: bool, residual_forward: float) -> float:
  """Ideal HBM bytes of one training pass over a batch on one device.

  weights / vision_weights: bytes of the decoder / vision weights one device reads for one use
  (compute dtype, split by tensor parallelism); shard_params: the device's share of all
  params (elements); residual_forward: the residual stream's forward bytes of ONE micro-batch
  (`residual_bytes(..., passes=2)`).

  Each micro-batch reads the decoder's weights forward, again in the remat forward, and in
  the backward (for the input gradient), writes its weight gradients once (compute dtype, the
  input of the reduce-scatter) and adds them into the f32 gradient shard (read + write); the
  residual stream is read and written forward, read again by the remat forward, and its
  gradient read and written backward (2.5 forwards with remat, 2 without: the activations
  saved without remat are not counted, a lower bound). The vision tower runs once a pass
  (its weights read as often, its gradients written once).
  The optimizer then reads params, gradients and both moments and writes params and moments
  (f32, the device's shard).
  """
  reads = 3 if remat else 2
  residual = residual_forward * (2.5 if remat else 2.0)
  per_micro = reads * weights + weights + 8 * shard_params + residual
  return micro_batches * per_micro + (reads + 1) * vision_weights + 7 * 4 * shard_params
