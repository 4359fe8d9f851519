"""Mode `caption`: caption images with a checkpoint, one JSON line per image.

    python -m balcap.main --config=configs/qwen7b.py:mode=caption \
        --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct --images=a.jpg,b.jpg
    python -m balcap.main --config=configs/qwen7b.py:mode=caption ...   # the test split

Each line is {"id", "caption", "num_tokens"} (tokens of the caption, the end token excluded).
An image that cannot be read gets {"id", "error"} instead and the run goes on. With several
hosts each writes its own share to `<output>.process<i>` (no cross-host file writes).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import jax
import numpy as np
from PIL import Image

from balcap import metrics, models, parallel, sampling
from balcap.data import datasets, pipeline
from balcap.evals import captioning


def _image_batches(paths: list[str], batch_size: int) -> Iterator[list[tuple[str, Any]]]:
  """(id, PIL image or error string) in batches; a file that cannot be decoded is an error."""
  batch = []
  for path in paths:
    try:
      with Image.open(path) as image:
        batch.append((path, image.convert("RGB")))
    except (OSError, ValueError) as e:
      batch.append((path, f"cannot read image: {e}"))
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def _split_batches(config, batch_size: int) -> tuple[Iterator[list[tuple[str, Any]]], int]:
  builder = datasets.prepare(config.data)
  source = datasets.open_split(builder, config.caption.split or config.data.test_split)
  total = len(source)
  if config.caption.num_examples >= 0:
    source = [source[i] for i in range(min(config.caption.num_examples, total))]
    total = len(source)

  def batches():
    for batch in pipeline.eval_batches(source, batch_size=batch_size):
      yield [(i, Image.fromarray(np.asarray(image))) for i, image, real in
             zip(batch["id"], batch["image"], batch["mask"]) if real]
  return batches(), -(-total // jax.process_count())


def caption_rows(policy, images: list[Image.Image], config, rng: jax.Array) -> list[dict]:
  """Greedy or sampled captions (config.sampling) for a list of images: [{caption, num_tokens}]."""
  batch = policy.processor(prompts=[config.sampling.prompt] * len(images), images=images)
  rollouts = sampling.generate(
      policy, policy.params, batch, rng, max_new_tokens=config.sampling.max_new_tokens,
      temperature=config.sampling.temperature, top_p=config.sampling.top_p,
      top_k=config.sampling.top_k, prompt_bucket=config.sampling.prompt_bucket)
  return [{"caption": caption, "num_tokens": count}
          for caption, count in captioning.decode_with_lengths(policy, rollouts)]


def run(config, workdir: str, images: list[str] | None = None) -> str:
  """Captions `images` (paths) or the configured split; returns the JSONL path written."""
  mesh = parallel.make_mesh(config.mesh)
  policy = models.policy_from_config(config.model, jax.random.key(config.seed), mesh=mesh)
  if policy.processor is None:
    raise ValueError("mode caption needs a tokenizer: config.model.checkpoint has none; set "
                     "config.model.tokenizer to a folder with tokenizer.json")
  batch_size = parallel.host_batch_size(config.batch_size)
  if images:
    shard = images[jax.process_index()::jax.process_count()]
    batches, total = _image_batches(shard, batch_size), len(shard)
  else:
    batches, total = _split_batches(config, batch_size)
  output = config.caption.output or os.path.join(workdir, "captions.jsonl")
  if jax.process_count() > 1:
    output = f"{output}.process{jax.process_index()}"
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  bar = metrics.ProgressBar(total, description="caption", unit="image")
  rng = jax.random.key(config.seed)
  with open(output, "w", encoding="utf-8") as f:
    for number, batch in enumerate(batches):
      readable = [k for k, (_, image) in enumerate(batch) if not isinstance(image, str)]
      entries = [{"error": image} for _, image in batch]  # replaced below where readable
      if readable:
        rows = caption_rows(policy, [batch[k][1] for k in readable], config,
                            jax.random.fold_in(rng, number))
        for k, row in zip(readable, rows):
          entries[k] = row
      for (example_id, _), entry in zip(batch, entries):
        f.write(json.dumps({"id": str(example_id), **entry}) + "\n")
      f.flush()
      bar.update(len(batch))
  bar.close()
  if jax.process_index() == 0:
    print(f"caption: {total} images -> {output}", flush=True)
  return output
