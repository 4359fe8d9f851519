"""Data sets by config: the TFDS builder for `config.data`, prepared once, opened per split.

Both data sets (CapWorld and caption_folder) are TFDS builders writing array_record files;
`open_split` returns a random-access source (`len`, `source[i]` -> dict of numpy/bytes) that
the grain pipeline reads. Every example has at least `id`, `image` (uint8 [H, W, 3]) and
`references`; CapWorld adds its scene graph and flawed SFT caption.
"""

from __future__ import annotations

import logging
import os

import jax
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils


log = logging.getLogger(__name__)


def data_dir(data_config) -> str:
  """config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return (data_config.data_dir or os.environ.get("TFDS_DATA_DIR")
          or os.path.expanduser("~/tensorflow_datasets"))


def make_builder(data_config) -> tfds.core.DatasetBuilder:
  """The TFDS builder `config.data` describes (nothing is generated yet)."""
  # Builders are imported on demand: each registers itself with TFDS when imported.
  # pylint: disable=import-outside-toplevel
  if data_config.name == "capworld":
    from balcap.data.capworld.builder import CapWorld, capworld_config
    from balcap.data.capworld.generate import spec_from_config
    world = data_config.capworld
    spec = spec_from_config(world)
    config = capworld_config(spec, num_train=world.num_train,
                             num_validation=world.num_validation, num_test=world.num_test)
    # TFDS refuses a custom config named like one the class declares (the default sizes):
    # take the declared one. Equal names mean equal data (the name hashes every parameter).
    declared = {c.name: c for c in CapWorld.BUILDER_CONFIGS}
    config = declared.get(config.name, config)
    return CapWorld(config=config, data_dir=data_dir(data_config), file_format="array_record")
  if data_config.name == "caption_folder":
    from balcap.data.caption_folder.builder import CaptionFolder, caption_folder_config
    folder = data_config.caption_folder
    config = caption_folder_config(folder.manifest,
                                   validation_fraction=folder.validation_fraction,
                                   test_fraction=folder.test_fraction)
    return CaptionFolder(config=config, data_dir=data_dir(data_config),
                         file_format="array_record")
  raise ValueError(f"config.data.name={data_config.name!r}: no such data set "
                   "(capworld, caption_folder)")


def prepare(data_config) -> tfds.core.DatasetBuilder:
  """Generates the data set if it is not there yet, and returns its builder.

  On several hosts, process 0 generates while the others wait; a host that still finds no
  data afterwards (a data_dir that is not shared) generates its own identical copy.
  """
  builder = make_builder(data_config)
  if jax.process_index() == 0 and not builder.is_prepared():
    log.info("preparing %s in %s", builder.info.full_name, builder.data_dir)
    builder.download_and_prepare(file_format="array_record")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"prepared {builder.info.full_name}")
    if not builder.is_prepared():
      builder = make_builder(data_config)
      builder.download_and_prepare(file_format="array_record")
  builder = make_builder(data_config)  # a fresh builder reads the finished data set's info
  skipped = builder.info.metadata.get("num_skipped_rows") if builder.info.metadata else None
  if skipped:
    log.warning("%s: %d bad row(s) were skipped when it was built (%s); see %s",
                builder.info.full_name, skipped, builder.info.metadata.get("skipped_reasons"),
                builder.data_path / "skipped_rows.jsonl")
  return builder


def open_split(builder: tfds.core.DatasetBuilder, split: str):
  """A random-access source over one split; a clear error if the split is absent or empty."""
  available = dict(builder.info.splits)
  if split not in available:
    raise ValueError(
        f"split {split!r} of {builder.info.full_name} has no examples (splits with examples: "
        f"{sorted(available)}); check config.data.*_split and the split sizes or fractions")
  return builder.as_data_source(split)
