"""What every family's processor shares: request checks, right/left padding, decoding.

A family's processor (`qwen.QwenProcessor`, `llava.LlavaProcessor`) renders its own chat format
and images; this base class checks a request the same way for all (errors name the prompt,
image or response at fault), pads the ragged rows, and turns ids back into text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers
from PIL import Image


def as_image_list(entry: Any, index: int) -> list[Image.Image]:
  """images[index] (an image, a list of images or None) as a list, or an error naming it."""
  if entry is None or isinstance(entry, Image.Image):
    return [] if entry is None else [entry]
  if not isinstance(entry, (list, tuple)):
    raise TypeError(f"images[{index}] is a {type(entry).__name__}; expected a PIL image, a list "
                    "of them, or None")
  for j, image in enumerate(entry):
    if not isinstance(image, Image.Image):
      raise TypeError(f"images[{index}][{j}] is a {type(image).__name__}; expected a PIL image")
  return list(entry)


def pad_rows(rows: list[list[int]], masks: list[list[bool]], pad_id: int,
             side: str) -> dict[str, np.ndarray]:
  """Ragged rows -> `input_ids`, `attention_mask` [B, T] int32 and `response_mask` [B, T] bool."""
  length = max(len(row) for row in rows)
  input_ids = np.full((len(rows), length), pad_id, np.int32)
  attention_mask = np.zeros((len(rows), length), np.int32)
  response_mask = np.zeros((len(rows), length), bool)
  for b, (row, mask) in enumerate(zip(rows, masks)):
    span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
    input_ids[b, span] = row
    attention_mask[b, span] = 1
    response_mask[b, span] = mask
  return {"input_ids": input_ids, "attention_mask": attention_mask,
          "response_mask": response_mask}


class ChatProcessor:
  """The shared half of a processor; subclasses set `tokenizer` and `_special_strings`."""
  tokenizer: tokenizers.Tokenizer
  _special_strings: tuple[str, ...] = ()

  def check_request(self, prompts: Sequence[str], images: Sequence[Any] | None,
                    padding_side: str, responses: Sequence[str] | None
                    ) -> list[list[Image.Image]]:
    """Every argument of a `__call__` checked; returns each prompt's images as a list."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
      raise TypeError(f"prompts must be a non-empty list of str, got {prompts!r:.80}")
    if padding_side not in ("left", "right"):
      raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    for i, prompt in enumerate(prompts):
      self._check_text(f"prompts[{i}]", prompt)
    images = [None] * len(prompts) if images is None else images
    if len(images) != len(prompts):
      raise ValueError(f"prompts and images have different lengths ({len(prompts)} vs "
                       f"{len(images)})")
    if responses is not None:
      if len(responses) != len(prompts):
        raise ValueError(f"prompts and responses have different lengths ({len(prompts)} vs "
                         f"{len(responses)})")
      for i, response in enumerate(responses):
        self._check_text(f"responses[{i}]", response)
    return [as_image_list(entry, i) for i, entry in enumerate(images)]

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
    """Token ids [T] -> text; by default without special tokens (pads, end tokens, ...)."""
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                 skip_special_tokens=skip_special_tokens)

  def batch_decode(self, ids: Sequence[Sequence[int]] | np.ndarray,
                   skip_special_tokens: bool = True) -> list[str]:
    """Token ids [B, T] -> B texts."""
    return [self.decode(row, skip_special_tokens) for row in ids]

  def _check_text(self, where: str, text: Any):
    # Text holding a special token would render as the token itself and break the chat
    # structure (an extra image token would even misalign the image features): refused.
    if not isinstance(text, str):
      raise TypeError(f"{where} is a {type(text).__name__}, expected str")
    found = [s for s in self._special_strings if s in text]
    if found:
      raise ValueError(f"{where} contains the special token {found[0]!r}; the processor adds "
                       "special tokens itself")
