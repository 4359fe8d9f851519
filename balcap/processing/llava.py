"""The LLaVA-1.5 processor in numpy: conversation rendering, tokenization and CLIP preprocessing.

Equal to transformers' `LlavaProcessor` with `CLIPImageProcessorPil` and llava-hf's chat
template (tests/processing/test_llava_processor.py checks it), without torch. A prompt renders
as

  <s>USER: <image>...<image>\\n{prompt} ASSISTANT:[ {response}</s>]

with `<image>` repeated once per vision feature (576 for CLIP ViT-L/14 at 336 px). Images are
resized (shortest side to 336, bicubic), centre-cropped to 336 x 336, rescaled and normalised
with CLIP's mean and std. `pad_to_square=True` first pads each image to a square with the mean
colour, as the original LLaVA-1.5 training did (`image_aspect_ratio="pad"`), so nothing is
cropped away.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from PIL import Image

from balcap import paths
from balcap.processing import chat
from balcap.processing.qwen import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_rgb

IMAGE_TOKEN = "<image>"
_PIL_BICUBIC = 3


@dataclasses.dataclass(frozen=True)
class ClipImageConfig:
  """How an image becomes pixel_values; defaults are llava-1.5-7b-hf's preprocessor config."""
  shortest_edge: int = 336
  crop_size: int = 336
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD
  rescale_factor: float = 1 / 255
  pad_to_square: bool = False  # the original LLaVA-1.5 "pad" aspect-ratio mode

  @classmethod
  def from_preprocessor_config(cls, config: Mapping[str, Any], pad_to_square: bool = False
                               ) -> ClipImageConfig:
    """Reads an HF `preprocessor_config.json` dict of a CLIPImageProcessor."""
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
      if config.get(flag, True) is False:
        raise ValueError(f"preprocessor_config.json sets {flag}=false; balcap only implements "
                         "CLIP's default pipeline")
    if config.get("resample", _PIL_BICUBIC) != _PIL_BICUBIC:
      raise ValueError(f"preprocessor_config.json sets resample={config['resample']}; balcap "
                       f"only implements bicubic ({_PIL_BICUBIC})")
    size, crop = config.get("size", {}), config.get("crop_size", {})
    size = size if isinstance(size, Mapping) else {"shortest_edge": size}
    crop = crop if isinstance(crop, Mapping) else {"height": crop, "width": crop}
    if "shortest_edge" not in size or crop.get("height") != crop.get("width"):
      raise ValueError(f"preprocessor_config.json: size {size} / crop_size {crop} are not a "
                       "shortest-edge resize and a square crop")
    return cls(shortest_edge=int(size["shortest_edge"]), crop_size=int(crop["height"]),
               image_mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
               image_std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
               rescale_factor=float(config.get("rescale_factor", 1 / 255)),
               pad_to_square=pad_to_square)


def pad_to_square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
  """The image centred on a square of `colour` (LLaVA's `expand2square`)."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  square = Image.new(image.mode, (side, side), colour)
  square.paste(image, ((side - width) // 2, (side - height) // 2))
  return square


def clip_pixels(image: Image.Image, config: ClipImageConfig) -> np.ndarray:
  """One image as pixel_values [3, crop, crop] float32, in `CLIPImageProcessorPil`'s order and
  dtypes: uint8 bicubic resize, centre crop, rescale in float64 cast to float32, normalise."""
  image = to_rgb(image)
  if config.pad_to_square:
    image = pad_to_square(image, tuple(int(m * 255) for m in config.image_mean))
  width, height = image.size
  if min(width, height) < 1:
    raise ValueError(f"a {width}x{height} px image (width x height) is empty")
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
  new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
  pixels = np.moveaxis(np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC)), -1, 0)
  crop = config.crop_size
  if new_h < crop or new_w < crop:
    raise ValueError(f"a {width}x{height} px image resizes to {new_w}x{new_h}, smaller than the "
                     f"{crop} px crop")
  top, left = (new_h - crop) // 2, (new_w - crop) // 2
  pixels = pixels[:, top:top + crop, left:left + crop]
  pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
  mean = np.asarray(config.image_mean, np.float32)[:, None, None]
  std = np.asarray(config.image_std, np.float32)[:, None, None]
  return (pixels - mean) / std


@dataclasses.dataclass(frozen=True)
class LlavaTokenIds:
  """Special-token ids, looked up by their strings in the tokenizer (never hard-coded)."""
  bos_id: int
  eos_id: int
  image_id: int
  pad_id: int

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return (self.eos_id,)

  @classmethod
  def from_tokenizer(cls, tokenizer: tokenizers.Tokenizer, pad_token: str = "<pad>"
                     ) -> LlavaTokenIds:
    def lookup(token, fallback=None):
      token_id = tokenizer.token_to_id(token)
      if token_id is None and fallback is None:
        raise ValueError(f"the tokenizer has no {token!r} token: not a LLaVA tokenizer?")
      return token_id if token_id is not None else fallback
    eos = lookup("</s>")
    return cls(lookup("<s>"), eos, lookup(IMAGE_TOKEN), lookup(pad_token, fallback=eos))


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class LlavaProcessor(chat.ChatProcessor):
  """Prompts (+ images, + responses) -> LLaVA-1.5 model inputs; token ids -> text."""

  def __init__(self, tokenizer: tokenizers.Tokenizer,
               image_config: ClipImageConfig = ClipImageConfig(),
               num_image_tokens: int = 576):
    self.tokenizer = tokenizer
    self.image_config = image_config
    self.num_image_tokens = num_image_tokens
    self.token_ids = LlavaTokenIds.from_tokenizer(tokenizer)
    self.system_prompt = ""  # LLaVA-1.5's llava-hf template has no system turn
    self._special_strings = tuple(t.content for t in tokenizer.get_added_tokens_decoder().values()
                                  if t.special) + (IMAGE_TOKEN,)

  @classmethod
  def from_pretrained(cls, folder: str, pad_to_square: bool = False) -> LlavaProcessor:
    """From a checkpoint folder: `tokenizer.json` (or a sentencepiece `tokenizer.model`,
    converted by transformers), `preprocessor_config.json` if present, and the image token
    count from `config.json` (CLIP grid, class token dropped unless the strategy is "full").
    A gs:// folder is read from its local copy."""
    folder = paths.download_folder(folder)
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
      tokenizer = tokenizers.Tokenizer.from_file(path)
    elif os.path.isfile(os.path.join(folder, "tokenizer.model")):
      import transformers  # pylint: disable=import-outside-toplevel
      tokenizer = transformers.AutoTokenizer.from_pretrained(folder).backend_tokenizer
    else:
      raise FileNotFoundError(f"{folder} has neither tokenizer.json nor tokenizer.model")
    image_config = ClipImageConfig(pad_to_square=pad_to_square)
    settings = _read_json(os.path.join(folder, "preprocessor_config.json"))
    if settings is None:  # transformers 5 nests them in processor_config.json
      settings = (_read_json(os.path.join(folder, "processor_config.json")) or {}).get(
          "image_processor")
    if settings is not None:
      image_config = ClipImageConfig.from_preprocessor_config(settings, pad_to_square)
    num_tokens = (image_config.crop_size // 14) ** 2
    config = _read_json(os.path.join(folder, "config.json"))
    if config is not None:
      vision = config.get("vision_config", {})
      grid = vision.get("image_size", image_config.crop_size) // vision.get("patch_size", 14)
      num_tokens = grid ** 2 + (config.get("vision_feature_select_strategy") == "full")
    return cls(tokenizer, image_config, num_tokens)

  def __call__(self, prompts: Sequence[str],
               images: Sequence[Image.Image | Sequence[Image.Image] | None] | None = None, *,
               padding_side: str = "left",
               responses: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Batch of conversations -> `input_ids`, `attention_mask` [B, T] int32, and with images
    `pixel_values` [N, 3, S, S] float32 (all images, in prompt order). With `responses`, each
    follows "ASSISTANT:" and ends with `</s>`; `response_mask` [B, T] bool marks those tokens."""
    images = self.check_request(prompts, images, padding_side, responses)

    rows, masks, pixels = [], [], []
    for i, prompt in enumerate(prompts):
      for image in images[i]:
        try:
          pixels.append(clip_pixels(image, self.image_config))
        except ValueError as e:
          raise ValueError(f"images[{i}]: {e}") from e
      text = f"USER: {(IMAGE_TOKEN * self.num_image_tokens + chr(10)) * len(images[i])}" \
             f"{prompt} ASSISTANT:"
      ids = [self.token_ids.bos_id] + self.tokenizer.encode(text, add_special_tokens=False).ids
      response = []
      if responses is not None:
        # Encoded on its own (SentencePiece adds the leading space): a prompt's ids are the same
        # with and without a response, so the sampler conditions on exactly these.
        response = self.tokenizer.encode(responses[i], add_special_tokens=False).ids
        response.append(self.token_ids.eos_id)
      rows.append(ids + response)
      masks.append([False] * len(ids) + [True] * len(response))

    out = chat.pad_rows(rows, masks, self.token_ids.pad_id, padding_side)
    if responses is None:
      del out["response_mask"]
    if pixels:
      out["pixel_values"] = np.stack(pixels)
    return out
