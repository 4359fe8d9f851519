"""Tiny random Qwen2.5-VL checkpoints written by transformers, and matching inputs.

Shared by the model, policy and benchmark tests: every checkpoint is created by transformers'
own `save_pretrained` from a tiny config, so parity is checked against code balcap did not write.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

# ENVIRONMENT.md's tiny config: text h64, 2 layers, 4/2 heads; vision depth 2, h32, window 56 px
# (2x2 merged patches), full attention in block 1, vocab 256 with the vision ids at its top.
IMAGE_ID, VIDEO_ID, VISION_START, VISION_END = 250, 251, 252, 253


def tiny_config(*, tie: bool = False, vocab_size: int = 256, vision_depth: int = 3,
                image_id: int = IMAGE_ID, video_id: int = VIDEO_ID,
                vision_start: int = VISION_START, vision_end: int = VISION_END,
                **text) -> transformers.Qwen2_5_VLConfig:
  text_config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                     max_position_embeddings=4096, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                      "mrope_section": [2, 3, 3]},
                     tie_word_embeddings=tie, eos_token_id=vocab_size - 1)
  text_config.update(text)
  vision_config = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=4,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                       fullatt_block_indexes=[1], out_hidden_size=text_config["hidden_size"])
  return transformers.Qwen2_5_VLConfig(
      text_config=text_config, vision_config=vision_config, image_token_id=image_id,
      video_token_id=video_id, vision_start_token_id=vision_start,
      vision_end_token_id=vision_end, tie_word_embeddings=tie)


def write_checkpoint(folder: str, config: transformers.Qwen2_5_VLConfig, seed: int = 0,
                     **save_kwargs) -> transformers.Qwen2_5_VLForConditionalGeneration:
  """Random weights (larger than the default init, so every layer matters), saved to folder."""
  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight") or "ln_q" in name or "norm1" in name or "norm2" in name:
        param.copy_(1.0 + 0.1 * torch.randn_like(param))
      else:
        param.copy_(0.1 * torch.randn_like(param))
  os.makedirs(folder, exist_ok=True)
  model.save_pretrained(folder, **save_kwargs)
  return model


def patches(rng: np.random.Generator, grids: list[tuple[int, int, int]]) -> np.ndarray:
  """Random `pixel_values` [sum(t*h*w), 3*2*14*14] for the given (t, h, w) patch grids."""
  total = sum(t * h * w for t, h, w in grids)
  return rng.standard_normal((total, 3 * 2 * 14 * 14)).astype(np.float32)


def image_tokens(grid: tuple[int, int, int]) -> list[int]:
  t, h, w = grid
  return [VISION_START] + [IMAGE_ID] * (t * h * w // 4) + [VISION_END]


def batch(rng: np.random.Generator, rows: list[tuple[list[int], tuple | None]],
          padding_side: str = "left") -> dict[str, np.ndarray]:
  """A processor-style batch: each row is (text ids around the image, image grid or None).

  The image tokens go after the first text token, as the chat template puts them after the
  user turn's opening.
  """
  sequences, grids = [], []
  for text, grid in rows:
    ids = list(text[:1]) + (image_tokens(grid) if grid else []) + list(text[1:])
    sequences.append(ids)
    if grid:
      grids.append(grid)
  length = max(len(s) for s in sequences)
  input_ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for row, ids in enumerate(sequences):
    span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
    input_ids[row, span] = ids
    mask[row, span] = 1
  out = {"input_ids": input_ids, "attention_mask": mask}
  if grids:
    out["pixel_values"] = patches(rng, grids)
    out["image_grid_thw"] = np.array(grids, np.int64)
  return out


def reference_logits(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
  """transformers' logits for a processor-style batch (mm_token_type_ids derived as its
  processor does)."""
  ids = torch.tensor(inputs["input_ids"], dtype=torch.long)
  kwargs = {"input_ids": ids, "attention_mask": torch.tensor(inputs["attention_mask"])}
  if "pixel_values" in inputs:
    kwargs["pixel_values"] = torch.tensor(inputs["pixel_values"])
    kwargs["image_grid_thw"] = torch.tensor(inputs["image_grid_thw"])
    kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
  with torch.no_grad():
    return model(**kwargs).logits.float().numpy()
