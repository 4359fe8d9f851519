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

# The tokenizer's SentencePiece vocabulary has 300 pieces; "<pad>" and "<image>" are added after
# them (as llava-hf's 32000 + <image>, <pad>), and the model's embedding has a few spare rows.
SPM_VOCAB, PAD_ID, IMAGE_ID, VOCAB = 300, 300, 301, 320
IMAGE_SIZE, FEATURES = 28, 4
CORPUS = ("A red circle sits on the left of a blue square.", "Describe this image in detail.",
          "USER: What is shown? ASSISTANT: Two shapes on a white background.", "Hello world!",
          "There is a small green triangle above a large yellow star.")


def tiny_config(*, tie: bool = False, vocab_size: int = VOCAB, vision_layers: int = 3,
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


def write_tokenizer(folder: str) -> None:
  """A LLaMA tokenizer (byte-fallback BPE SentencePiece, trained here on a few sentences) with
  llava-hf's added `<pad>` and `<image>`, and a CLIP image processor for 28 px images, saved by
  transformers as `LlavaProcessor.save_pretrained` does."""
  import io  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  import sentencepiece  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS * 40), model_writer=model, vocab_size=SPM_VOCAB,
      model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
      character_coverage=1.0, normalization_rule_name="identity", minloglevel=2)
  with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True}, f)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
  assert tokenizer.convert_tokens_to_ids(["<pad>", "<image>"]) == [PAD_ID, IMAGE_ID]
  reference_processor(tokenizer).save_pretrained(folder)


def reference_processor(tokenizer, **image_settings) -> transformers.LlavaProcessor:
  """transformers' LlavaProcessor for the tiny CLIP (28 px, 14 px patches, class token dropped)."""
  settings = dict(size={"shortest_edge": IMAGE_SIZE},
                  crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
  settings.update(image_settings)
  return transformers.LlavaProcessor(
      image_processor=transformers.CLIPImageProcessorPil(**settings), tokenizer=tokenizer,
      patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
      image_token="<image>")


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


def batch(rng: np.random.Generator, rows: list[tuple[list[int], bool | None]],
          padding_side: str = "left", features: int = FEATURES) -> dict[str, np.ndarray]:
  """A processor-style batch: each row is (text ids, has an image); the image's tokens go after
  the first text token, as `USER: <image>` puts them."""
  sequences, images = [], 0
  for text, has_image in rows:
    sequences.append(list(text[:1]) + [IMAGE_ID] * features * bool(has_image) + list(text[1:]))
    images += bool(has_image)
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
