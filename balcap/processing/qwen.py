"""The Qwen2.5-VL processor in numpy: chat rendering, tokenization and image patches.

Equal to transformers' `Qwen2VLImageProcessorPil` + `Qwen2_5_VLProcessor` + the official Qwen2.5-VL
chat template (tests/processing/test_qwen_processor.py checks it), without torch or torchvision.
A prompt renders as

  <|im_start|>system\\n{system_prompt}<|im_end|>\\n<|im_start|>user\\n
  <|vision_start|><|image_pad|>...<|image_pad|><|vision_end|>  (once per image)
  {prompt}<|im_end|>\\n<|im_start|>assistant\\n[{response}<|im_end|>]

with each `<|image_pad|>` repeated once per merged patch, t * h * w // merge_size**2 times.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from PIL import Image

from balcap import paths
from balcap.processing import chat

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
ENDOFTEXT = "<|endoftext|>"  # Qwen's pad token, and its second end-of-sequence token
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
_PIL_BICUBIC = 3  # `resample` as transformers writes it into preprocessor_config.json


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """(h, w) nearest to (height, width), multiples of `factor`, h * w in [min_pixels, max_pixels].

  The same rounding as transformers' `qwen2_vl.image_processing_qwen2_vl.smart_resize`: round
  each side to the factor; if that is too large, scale down by sqrt(area / max_pixels) and floor;
  if too small, scale up by sqrt(min_pixels / area) and ceil.
  """
  if min(height, width) < 1:
    raise ValueError(f"a {width}x{height} px image (width x height) is empty")
  ratio = max(height, width) / min(height, width)
  if ratio > MAX_ASPECT_RATIO:
    raise ValueError(f"a {width}x{height} px image (width x height) has aspect ratio {ratio:g}, "
                     f"over {MAX_ASPECT_RATIO}, which Qwen2-VL cannot resize: crop or pad it")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class QwenImageConfig:
  """How images become patches; defaults are transformers' `Qwen2VLImageProcessor` defaults."""
  patch_size: int = 14            # pixels per side of one vision-encoder patch
  temporal_patch_size: int = 2    # frames per patch; a still image is repeated to fill them
  merge_size: int = 2             # merge_size**2 patches become one LLM token
  min_pixels: int = 56 * 56       # resized area bounds (transformers' size.shortest_edge)
  max_pixels: int = 28 * 28 * 1280  # (size.longest_edge)
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD
  rescale_factor: float = 1 / 255

  def __post_init__(self):
    if not 0 < self.min_pixels <= self.max_pixels:
      raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, "
                       f"{self.max_pixels}")
    if len(self.image_mean) != 3 or len(self.image_std) != 3:
      raise ValueError(f"image_mean and image_std need 3 values (RGB), got {self.image_mean}, "
                       f"{self.image_std}")

  @property
  def factor(self) -> int:
    """Resized sides are multiples of this: one merged patch."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    """Values per row of `pixel_values`: 3 * temporal_patch_size * patch_size**2."""
    return 3 * self.temporal_patch_size * self.patch_size ** 2

  @classmethod
  def from_preprocessor_config(cls, config: Mapping[str, Any]) -> QwenImageConfig:
    """Reads an HF `preprocessor_config.json` dict, old (`min_pixels`) or new (`size`) style."""
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
      if config.get(flag, True) is False:
        raise ValueError(f"preprocessor_config.json sets {flag}=false; balcap only implements "
                         "Qwen's default pipeline")
    if config.get("resample", _PIL_BICUBIC) != _PIL_BICUBIC:
      raise ValueError(f"preprocessor_config.json sets resample={config['resample']}; balcap "
                       f"only implements bicubic ({_PIL_BICUBIC})")
    size = config.get("size") or {}

    def first(*values):
      return next((v for v in values if v is not None), None)

    # As in transformers, top-level min/max_pixels override `size`.
    min_pixels = first(config.get("min_pixels"), size.get("shortest_edge"), size.get("min_pixels"),
                       cls.min_pixels)
    max_pixels = first(config.get("max_pixels"), size.get("longest_edge"), size.get("max_pixels"),
                       cls.max_pixels)
    return cls(
        patch_size=int(config.get("patch_size", cls.patch_size)),
        temporal_patch_size=int(config.get("temporal_patch_size", cls.temporal_patch_size)),
        merge_size=int(config.get("merge_size", cls.merge_size)),
        min_pixels=int(min_pixels), max_pixels=int(max_pixels),
        image_mean=tuple(config.get("image_mean", cls.image_mean)),
        image_std=tuple(config.get("image_std", cls.image_std)),
        rescale_factor=float(config.get("rescale_factor", cls.rescale_factor)))


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB, with any transparency composited onto white (as transformers does, not dropped)."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def image_patches(image: Image.Image, config: QwenImageConfig) -> tuple[np.ndarray, np.ndarray]:
  """One image as (patches [h * w, patch_dim] float32, grid_thw [3] int64 = (1, h, w)).

  Operation order and dtypes follow `Qwen2VLImageProcessorPil` so results are bit-equal: uint8
  bicubic resize, rescale in float64 then cast to float32, normalise in float32.
  """
  height, width = smart_resize(image.height, image.width, config.factor, config.min_pixels,
                               config.max_pixels)
  pixels = np.asarray(to_rgb(image).resize((width, height), Image.Resampling.BICUBIC))
  pixels = np.moveaxis(pixels, -1, 0)  # [3, H, W] uint8
  pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
  mean = np.asarray(config.image_mean, np.float32)[:, None, None]
  std = np.asarray(config.image_std, np.float32)[:, None, None]
  pixels = (pixels - mean) / std

  p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
  grid_h, grid_w = height // p, width // p
  patches = pixels.reshape(3, grid_h // m, m, p, grid_w // m, m, p)
  # Rows in merge-window order (each m x m window of patches is contiguous, as the vision
  # merger expects); within a row: channel, frame, patch row, patch column.
  patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, 3, p, p]
  patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
  patches = patches.reshape(grid_h * grid_w, config.patch_dim)
  return patches, np.array([1, grid_h, grid_w], np.int64)


def preprocess_images(images: Sequence[Image.Image],
                      config: QwenImageConfig) -> dict[str, np.ndarray]:
  """`pixel_values` [sum of patches, patch_dim] float32 and `image_grid_thw` [N, 3] int64."""
  if not images:
    raise ValueError("preprocess_images needs at least one image")
  patches, grids = zip(*(image_patches(image, config) for image in images))
  return {"pixel_values": np.concatenate(patches), "image_grid_thw": np.stack(grids)}


@dataclasses.dataclass(frozen=True)
class QwenTokenIds:
  """Special-token ids, looked up by their strings in the tokenizer (never hard-coded)."""
  im_start_id: int
  im_end_id: int
  vision_start_id: int
  vision_end_id: int
  image_pad_id: int
  pad_id: int  # <|endoftext|>

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Generation stops at either, as in Qwen2.5-VL's generation_config.json."""
    return (self.im_end_id, self.pad_id)

  @classmethod
  def from_tokenizer(cls, tokenizer: tokenizers.Tokenizer) -> QwenTokenIds:
    def lookup(token):
      token_id = tokenizer.token_to_id(token)
      if token_id is None:
        raise ValueError(f"the tokenizer has no {token!r} token: not a Qwen2-VL tokenizer?")
      return token_id
    return cls(lookup(IM_START), lookup(IM_END), lookup(VISION_START), lookup(VISION_END),
               lookup(IMAGE_PAD), lookup(ENDOFTEXT))


def chat_segments(prompt: str, num_images: int, system_prompt: str) -> list[str]:
  """The Qwen2.5-VL chat template for one user turn, split at its special tokens.

  Joined, the segments are the template's rendering (one `<|image_pad|>` per image) up to and
  including the assistant opener. Text between two special tokens is one segment, so encoding
  each is the same as encoding the joined string.
  """
  vision = [VISION_START, IMAGE_PAD, VISION_END] * num_images
  user = ["user\n", *vision, prompt] if vision else ["user\n" + prompt]
  return [IM_START, f"system\n{system_prompt}", IM_END, "\n", IM_START, *user, IM_END, "\n",
          IM_START, "assistant\n"]


class QwenProcessor(chat.ChatProcessor):
  """Prompts (+ images, + responses) -> Qwen2.5-VL model inputs; token ids -> text."""

  def __init__(self, tokenizer: tokenizers.Tokenizer,
               image_config: QwenImageConfig = QwenImageConfig(),
               system_prompt: str = DEFAULT_SYSTEM_PROMPT):
    self.tokenizer = tokenizer
    self.image_config = image_config
    self.system_prompt = system_prompt
    self.token_ids = QwenTokenIds.from_tokenizer(tokenizer)
    self._special_strings = tuple(t.content for t in tokenizer.get_added_tokens_decoder().values()
                                  if t.special)
    self._check_text("system_prompt", system_prompt)

  @classmethod
  def from_pretrained(cls, folder: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT
                      ) -> QwenProcessor:
    """From a checkpoint folder (local or gs://): `tokenizer.json` and, if present,
    `preprocessor_config.json`."""
    folder = paths.download_folder(folder)
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    config_path = os.path.join(folder, "preprocessor_config.json")
    image_config = QwenImageConfig()
    if os.path.exists(config_path):
      with open(config_path, encoding="utf-8") as f:
        image_config = QwenImageConfig.from_preprocessor_config(json.load(f))
    return cls(tokenizer, image_config, system_prompt)

  def num_image_tokens(self, grid_thw: np.ndarray) -> int:
    """`<|image_pad|>` tokens for one image: one per merge_size x merge_size patches."""
    return int(np.prod(grid_thw)) // self.image_config.merge_size ** 2

  def __call__(self, prompts: Sequence[str],
               images: Sequence[Image.Image | Sequence[Image.Image] | None] | None = None, *,
               padding_side: str = "left",
               responses: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Batch of chats -> `input_ids`, `attention_mask` [B, T] int32, and when there are images
    `pixel_values` [patches, patch_dim] float32 and `image_grid_thw` [N, 3] int64 (all images, in
    prompt order). `images[i]` belongs to `prompts[i]`. With `responses`, each is appended after
    the assistant opener with `<|im_end|>`, and `response_mask` [B, T] bool marks those tokens.
    """
    images = self.check_request(prompts, images, padding_side, responses)

    rows, masks, patches, grids = [], [], [], []
    for i, prompt in enumerate(prompts):
      pads = []
      for image in images[i]:
        try:
          image_patch, grid = image_patches(image, self.image_config)
        except ValueError as e:
          raise ValueError(f"images[{i}]: {e}") from e
        patches.append(image_patch)
        grids.append(grid)
        pads.append(self.num_image_tokens(grid))
      ids = self._encode_segments(chat_segments(prompt, len(pads), self.system_prompt), pads)
      response = []
      if responses is not None:
        # Encoded on its own (not merged with "assistant\n"), so a prompt's ids are the same with
        # and without a response: the sampler conditions on exactly these.
        response = self.tokenizer.encode(responses[i], add_special_tokens=False).ids
        response.append(self.token_ids.im_end_id)
      rows.append(ids + response)
      masks.append([False] * len(ids) + [True] * len(response))

    out = chat.pad_rows(rows, masks, self.token_ids.pad_id, padding_side)
    if responses is None:
      del out["response_mask"]
    if grids:
      out["pixel_values"] = np.concatenate(patches)
      out["image_grid_thw"] = np.stack(grids)
    return out

  def _encode_segments(self, segments: list[str], image_pads: list[int]) -> list[int]:
    """Chat segments -> ids: specials by id, image pad i repeated image_pads[i] times."""
    special = {IM_START: self.token_ids.im_start_id, IM_END: self.token_ids.im_end_id,
               VISION_START: self.token_ids.vision_start_id,
               VISION_END: self.token_ids.vision_end_id}
    ids, pads = [], iter(image_pads)
    for segment in segments:
      if segment == IMAGE_PAD:
        ids += [self.token_ids.image_pad_id] * next(pads)
      elif segment in special:
        ids.append(special[segment])
      elif segment:
        ids += self.tokenizer.encode(segment, add_special_tokens=False).ids
    return ids
