"""Images for chat judges: data URLs, and the image part of a message with its `detail`."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from balcap import paths

# OpenAI's vision `detail`: "auto", "low" (one 512 px tile), "high" (tiles of the full image).
DETAILS = ("auto", "low", "high")


def image_data_url(image: Any, image_format: str = "PNG") -> str:
  """A base64 data URL for a PIL image, a uint8 [H, W, 3] array or encoded PNG/JPEG bytes;
  a string (already a URL) is passed through."""
  if isinstance(image, str):
    return image
  if isinstance(image, (bytes, bytearray)):
    mime = ("image/png" if image[:8] == b"\x89PNG\r\n\x1a\n" else
            "image/jpeg" if image[:2] == b"\xff\xd8" else None)
    if mime is None:
      raise ValueError("image bytes are neither PNG nor JPEG")
    return f"data:{mime};base64,{base64.b64encode(bytes(image)).decode('ascii')}"
  if isinstance(image, np.ndarray):
    image = Image.fromarray(np.asarray(image, np.uint8))
  if not isinstance(image, Image.Image):
    raise ValueError(f"cannot send an image of type {type(image).__name__} to a judge")
  image_format = image_format.upper()
  if image_format == "JPEG" and image.mode != "RGB":
    image = image.convert("RGB")
  buffer = io.BytesIO()
  image.save(buffer, format=image_format)
  mime = {"PNG": "image/png", "JPEG": "image/jpeg"}[image_format]
  return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def file_data_url(path: str) -> str:
  """A data URL for an image file: PNG and JPEG bytes as they are, other formats as PNG.

  Raises ValueError naming the file when it is not a readable image."""
  data = paths.read_bytes(path)
  if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:2] == b"\xff\xd8":
    return image_data_url(data)
  try:
    with Image.open(io.BytesIO(data)) as image:
      return image_data_url(image.convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    raise ValueError(f"{path} is not a readable image: {type(e).__name__}: {e}") from None


def image_part(url: str, detail: str = "auto") -> dict[str, Any]:
  """The OpenAI-format content part of one image."""
  if detail not in DETAILS:
    raise ValueError(f"image detail {detail!r} is not one of {DETAILS}")
  part: dict[str, Any] = {"type": "image_url", "image_url": {"url": url}}
  if detail != "auto":
    part["image_url"]["detail"] = detail
  return part
