"""Tiny random LLaVA-1.5 checkpoints written by transformers, and matching inputs.

As for Qwen (qwen_fixtures.py), every checkpoint comes from transformers' own
`save_pretrained`, so parity is checked against code balcap did not write. The tiny CLIP sees
28 px images (2x2 patches of 14 px: 4 features each, the class token dropped).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

IMAGE_ID, PAD_ID = 250, 251
IMAGE_SIZE, FEATURES = 28, 4


def tiny_config(*, tie: bool = False, vocab_size: int = 256, vision_layers: int = 3,
                feature_layer: int = -2, strategy: str = "default") -> transformers.LlavaConfig:
  text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=tie,
              pad_token_id=PAD_ID)
  vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48,
                num_hidden_layers=vision_layers, num_attention_heads=4, image_size=IMAGE_SIZE,
                patch_size=14, projection_dim=16)
  return transformers.LlavaConfig(
      text_config=text, vision_config=vision, image_token_index=IMAGE_ID,
      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
      image_seq_length=FEATURES, pad_token_id=PAD_ID, tie_word_embeddings=tie)


def write_checkpoint(folder: str, config: transformers.LlavaConfig, seed: int = 0
                     ) -> transformers.LlavaForConditionalGeneration:
  """Random weights larger than the default init (so every layer matters), saved to folder."""
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        param.copy_(1.0 + 0.1 * torch.randn_like(param))
      else:
        param.copy_(0.1 * torch.randn_like(param))
  os.makedirs(folder, exist_ok=True)
  model.save_pretrained(folder)
  return model


def batch(rng: np.random.Generator, rows: list[tuple[list[int], bool]],
          padding_side: str = "left", features: int = FEATURES) -> dict[str, np.ndarray]:
  """A processor-style batch: each row is (text ids, has an image); the image's tokens go after
  the first text token, as `USER: <image>` puts them."""
  sequences, images = [], 0
  for text, has_image in rows:
    sequences.append(list(text[:1]) + [IMAGE_ID] * features * has_image + list(text[1:]))
    images += has_image
  length = max(len(s) for s in sequences)
  input_ids = np.full((len(rows), length), PAD_ID, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for row, ids in enumerate(sequences):
    span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
    input_ids[row, span] = ids
    mask[row, span] = 1
  out = {"input_ids": input_ids, "attention_mask": mask}
  if images:
    out["pixel_values"] = rng.standard_normal(
        (images, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
  return out


def reference_logits(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
  """transformers' logits, with the position ids its `generate` uses (count of real tokens
  before each one), so left padding does not shift positions."""
  mask = torch.tensor(inputs["attention_mask"], dtype=torch.long)
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  kwargs = {"input_ids": torch.tensor(inputs["input_ids"], dtype=torch.long),
            "attention_mask": mask, "position_ids": positions}
  if "pixel_values" in inputs:
    kwargs["pixel_values"] = torch.tensor(inputs["pixel_values"])
  with torch.no_grad():
    return model(**kwargs).logits.float().numpy()
