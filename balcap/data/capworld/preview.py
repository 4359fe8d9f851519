"""A contact sheet of CapWorld examples: each image with its references, SFT caption and flaws.

For people: the quickest way to see what the world draws and writes
(`python -m balcap.data.capworld --preview out.png`). Examples come straight from
`make_example`, no TFDS needed.
"""

from __future__ import annotations

from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from balcap.data.capworld.generate import CapWorldSpec, make_example

TEXT_WIDTH = 380       # pixels of caption text per cell, whatever the image size
PADDING = 12
FONT_SIZE = 13
LINE_HEIGHT = 17
SHEET_BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)
FLAW_COLOUR = (180, 30, 30)


def cell_width(image_width: int) -> int:
  """Width of one cell of the sheet for images `image_width` pixels wide."""
  return max(image_width, TEXT_WIDTH) + 2 * PADDING


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
  """Greedy word wrap to `width` pixels."""
  lines, line = [], ""
  for word in text.split():
    trial = f"{line} {word}".strip()
    if line and font.getlength(trial) > width:
      lines.append(line)
      line = word
    else:
      line = trial
  return lines + ([line] if line else [])


def _cell_lines(example: dict[str, Any], font: ImageFont.FreeTypeFont,
                width: int) -> list[tuple[str, tuple[int, int, int]]]:
  lines = [(example["id"], TEXT_COLOUR)]
  for k, reference in enumerate(example["references"]):
    lines += [(line, TEXT_COLOUR) for line in _wrap(f"R{k + 1}: {reference}", font, width)]
  lines += [(line, TEXT_COLOUR) for line in _wrap(f"SFT: {example['sft_caption']}", font, width)]
  flaws = ", ".join(example["sft_flaws"]) or "none"
  lines += [(line, FLAW_COLOUR) for line in _wrap(f"flaws: {flaws}", font, width)]
  return lines


def contact_sheet(examples: Sequence[dict[str, Any]], columns: int = 4) -> Image.Image:
  """Examples in a grid, `columns` wide; each row as tall as its longest cell."""
  font = ImageFont.load_default(size=FONT_SIZE)
  columns = max(1, min(columns, len(examples)))
  width = cell_width(max(e["width"] for e in examples))
  text_width = width - 2 * PADDING
  cells = [(e, _cell_lines(e, font, text_width)) for e in examples]
  rows = [cells[k:k + columns] for k in range(0, len(cells), columns)]
  heights = [max(e["height"] + len(lines) * LINE_HEIGHT for e, lines in row) + 3 * PADDING
             for row in rows]
  sheet = Image.new("RGB", (columns * width, sum(heights)), SHEET_BACKGROUND)
  draw = ImageDraw.Draw(sheet)
  top = 0
  for row, height in zip(rows, heights):
    for column, (example, lines) in enumerate(row):
      left = column * width
      sheet.paste(example["image"], (left + (width - example["width"]) // 2, top + PADDING))
      y = top + 2 * PADDING + example["height"]
      for line, colour in lines:
        draw.text((left + PADDING, y), line, fill=colour, font=font)
        y += LINE_HEIGHT
    top += height
    draw.line([(0, top - 1), (sheet.width, top - 1)], fill=(200, 200, 200))
  return sheet


def write_preview(path: str, spec: CapWorldSpec, split: str = "train", num: int = 8,
                  columns: int = 4) -> str:
  """Writes a contact sheet of the first `num` examples of `split` as a PNG; returns path."""
  examples = [make_example(spec, split, index) for index in range(num)]
  contact_sheet(examples, columns).save(path, format="PNG")
  return path
