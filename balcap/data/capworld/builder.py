"""CapWorld as a TFDS data set: array_record files, read back with grain, no TensorFlow.

The split sizes and the world's parameters are part of the builder config, and the config's
name is derived from them, so data sets of different shapes live side by side in one data_dir
and a config change can never silently reuse data generated for another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import tensorflow_datasets as tfds

from balcap.data.capworld.generate import CapWorldSpec, make_example

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(eq=False)
class CapWorldConfig(tfds.core.BuilderConfig):
  """Split sizes plus the world's spec; build it with `capworld_config`."""
  spec: CapWorldSpec = dataclasses.field(default_factory=CapWorldSpec)
  num_examples: tuple[tuple[str, int], ...] = (("train", 20_000), ("validation", 500),
                                               ("test", 500))


def capworld_config(spec: CapWorldSpec, *, num_train: int, num_validation: int,
                    num_test: int) -> CapWorldConfig:
  """A builder config whose name identifies every parameter that changes the data."""
  counts = (("train", num_train), ("validation", num_validation), ("test", num_test))
  sizes = "_".join(f"{w}x{h}" for w, h in spec.image_sizes)
  # Readable part for people, digest for everything (object counts, references, seed).
  digest = hashlib.sha1(json.dumps([dataclasses.asdict(spec), counts]).encode()).hexdigest()[:8]
  name = f"n{num_train}-{num_validation}-{num_test}_{sizes}_seed{spec.seed}_{digest}"
  return CapWorldConfig(name=name, spec=spec, num_examples=counts,
                        description=f"CapWorld {dict(counts)}, {spec}")


class CapWorld(tfds.core.GeneratorBasedBuilder):
  """Procedural images of simple objects with scene graphs, references and flawed captions."""

  name = "capworld"
  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Captions no longer depend on PYTHONHASHSEED (some changed).",
                   "1.2.0": "SFT captions: 30% name no shape (a hedge, flaws.HEDGE_PROBABILITY)."}
  # Keeps TFDS from looking for a default config or a checksums file of a download.
  BUILDER_CONFIGS = [capworld_config(CapWorldSpec(), num_train=20_000, num_validation=500,
                                     num_test=500)]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "width": tfds.features.Scalar(dtype=np.int32),
            "height": tfds.features.Scalar(dtype=np.int32),
            "scene_graph": tfds.features.Text(),  # JSON, see balcap.data.capworld.world
            "references": tfds.features.Sequence(tfds.features.Text()),
            "sft_caption": tfds.features.Text(),
            "sft_flaws": tfds.features.Sequence(tfds.features.Text()),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: every example is generated
    counts = dict(self.builder_config.num_examples)
    # TFDS cannot write an empty split; a split of size 0 is absent (open_split says so).
    return {split: self._generate_examples(split, counts[split]) for split in SPLITS
            if counts[split]}

  def _generate_examples(self, split: str, num_examples: int):
    spec = self.builder_config.spec
    for index in range(num_examples):
      example = make_example(spec, split, index)
      yield example["id"], example
