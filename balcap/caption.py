"""Mode `caption`: caption images with a checkpoint, one JSON line per image.

    python -m balcap.main --config=configs/qwen7b.py:mode=caption \
        --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct --images=a.jpg,b.jpg
    python -m balcap.main --config=configs/qwen7b.py:mode=caption ...   # the test split

Each line is {"id", "caption", "num_tokens"} (tokens of the caption, the end token excluded).
An image that cannot be read gets {"id", "error"} instead and the run goes on. With several
hosts each writes its own share to `<output>.process<i>` (no cross-host file writes).
Batches are always full (`config.batch_size` over the hosts): a short last batch and
unreadable images are padded, so every batch divides over the mesh's data shards and every
host runs the same programs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import jax
import numpy as np
from PIL import Image

from balcap import metrics, models, parallel, paths, sampling
from balcap.data import datasets, pipeline
from balcap.evals import captioning


# One row of a caption batch: (id, PIL image or the reason it could not be read); id None
# marks a padding row.
Row = tuple[Any, Any]


def read_image(load) -> Image.Image | str:
  """`load()`'s RGB image, or why it could not be read (the row's error)."""
  try:
    return load().convert("RGB")
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    # (PIL raises SyntaxError for some broken files, e.g. a PNG with a bad chunk.)
    return f"cannot read image: {e}"


def open_file(path: str) -> Image.Image:
  """A local or gs:// image file as RGB."""
  with paths.open(path, "rb") as f, Image.open(f) as image:
    return image.convert("RGB")


def _image_batches(files: list[str], batch_size: int, per_host: int) -> Iterator[list[Row]]:
  """This host's images in full batches: `ceil(per_host / batch_size)` of them on every host
  (short ones padded with id None), so each batch divides over the data shards and every host
  runs the same programs. A file that cannot be decoded is an error row."""
  for start in range(0, -(-per_host // batch_size) * batch_size, batch_size):
    batch: list[Row] = []
    for path in files[start:start + batch_size]:
      batch.append((path, read_image(lambda path=path: open_file(path))))
    yield batch + [(None, None)] * (batch_size - len(batch))


def _split_batches(config, batch_size: int) -> tuple[Iterator[list[Row]], int]:
  builder = datasets.prepare(config.data)
  source = datasets.open_split(builder, config.caption.split or config.data.test_split)
  total = len(source)
  if config.caption.num_examples >= 0:
    source = [source[i] for i in range(min(config.caption.num_examples, total))]
    total = len(source)

  def batches():
    for batch in pipeline.eval_batches(source, batch_size=batch_size):  # padded, masked
      yield [(i if real else None, Image.fromarray(np.asarray(image))) for i, image, real in
             zip(batch["id"], batch["image"], batch["mask"])]
  return batches(), -(-total // jax.process_count())


def sampler_images(batch: list[Row]) -> list[Image.Image]:
  """A full batch of images for the sampler: unreadable and padding rows take a readable
  image of the batch (or a grey one) and their captions are dropped."""
  readable = [image for _, image in batch if isinstance(image, Image.Image)]
  filler = readable[0] if readable else Image.new("RGB", (224, 224), (128, 128, 128))
  return [image if isinstance(image, Image.Image) else filler for _, image in batch]


def caption_rows(policy, images: list[Image.Image], config, rng: jax.Array) -> list[dict]:
  """Greedy or sampled captions (config.sampling) for a list of images: [{caption, num_tokens}]."""
  batch = policy.processor(prompts=[config.sampling.prompt] * len(images), images=images)
  rollouts = sampling.generate(
      policy, policy.params, batch, rng, max_new_tokens=config.sampling.max_new_tokens,
      temperature=config.sampling.temperature, top_p=config.sampling.top_p,
      top_k=config.sampling.top_k, prompt_bucket=config.sampling.prompt_bucket,
      gather_weights=config.sampling.gather_weights)
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
    largest_share = -(-len(images) // jax.process_count())  # every host runs its batches
    batches, total = _image_batches(shard, batch_size, largest_share), len(shard)
  else:
    batches, total = _split_batches(config, batch_size)
  output = config.caption.output or os.path.join(workdir, "captions.jsonl")
  if jax.process_count() > 1:
    output = f"{output}.process{jax.process_index()}"
  bar = metrics.ProgressBar(total, description="caption", unit="image")
  rng = jax.random.key(config.seed)
  f = paths.LineAppender(output, truncate=True)
  try:
    for number, batch in enumerate(batches):
      # Every batch is sampled, even one with nothing readable: the other hosts' rows are in
      # the same programs.
      rows = caption_rows(policy, sampler_images(batch), config,
                          jax.random.fold_in(rng, number))
      for (example_id, image), row in zip(batch, rows):
        if example_id is None:
          continue
        entry = row if isinstance(image, Image.Image) else {"error": image}
        f.write([json.dumps({"id": str(example_id), **entry})], flush=False)
      f.flush()
      bar.update(sum(example_id is not None for example_id, _ in batch))
  finally:
    f.close()
  bar.close()
  if jax.process_index() == 0:
    print(f"caption: {total} images -> {output}", flush=True)
  return output
