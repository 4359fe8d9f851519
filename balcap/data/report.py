"""Mode `data`: prepare the configured data set and describe what is in it.

    python -m balcap.main --config=configs/tiny.py:mode=data

Generates (CapWorld) or builds from the manifest (caption_folder) every split, then prints the
number of examples per split, rows skipped as bad, and the first example of each split; for
CapWorld it also writes a contact sheet of stored examples to `<workdir>/data_preview.png`.
Run it once before training on a pod, with `config.data.data_dir` a bucket all hosts read.
"""

from __future__ import annotations

import os
import textwrap
import time

import jax
from PIL import Image

from balcap import paths
from balcap.data import datasets, pipeline

_PREVIEW_EXAMPLES = 8


def _print(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def describe_example(example: dict) -> str:
  lines = [f"id {example['id']}, image {tuple(example['image'].shape)}"]
  for reference in example["references"]:
    lines.append(f"reference: {reference}")
  if "sft_caption" in example:
    lines.append(f"SFT caption: {example['sft_caption']}  [flaws: "
                 f"{', '.join(example['sft_flaws']) or 'none'}]")
  return "\n".join(textwrap.indent(textwrap.fill(line, 96, subsequent_indent="  "), "    ")
                   for line in lines)


def run(config, workdir: str) -> None:
  started = time.time()
  builder = datasets.prepare(config.data)
  _print(f"data: {builder.info.full_name} in {builder.data_path} "
         f"(ready in {time.time() - started:.1f}s)")
  skipped = (builder.info.metadata or {}).get("num_skipped_rows")
  if skipped is not None:
    _print(f"  rows skipped as bad: {skipped} {dict(builder.info.metadata['skipped_reasons'])}"
           f" -> {builder.data_path / 'skipped_rows.jsonl'}")
  for split, info in builder.info.splits.items():
    _print(f"  {split}: {info.num_examples} examples")
    _print(describe_example(pipeline.decode_strings(datasets.open_split(builder, split)[0])))
  if config.data.name == "capworld" and jax.process_index() == 0:
    from balcap.data.capworld import preview  # pylint: disable=import-outside-toplevel
    source = datasets.open_split(builder, config.data.train_split)
    examples = []
    for index in range(min(_PREVIEW_EXAMPLES, len(source))):
      example = pipeline.decode_strings(source[index])
      example["image"] = Image.fromarray(example["image"])
      examples.append(example)
    path = os.path.join(workdir, "data_preview.png")
    with paths.open(path, "wb") as f:
      preview.contact_sheet(examples).save(f, format="PNG")
    _print(f"  preview of {len(examples)} stored {config.data.train_split} examples: {path}")
