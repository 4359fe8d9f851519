"""CapWorld through TFDS: the stored examples are exactly what the generator makes."""

import json

import numpy as np

from balcap.data import datasets, pipeline
from balcap.data.capworld import builder as capworld_builder
from balcap.data.capworld.generate import CapWorldSpec, make_example
from testlib import tiny_data_config


def test_split_sizes_follow_the_config(capworld_builder):
  sizes = {split: info.num_examples for split, info in capworld_builder.info.splits.items()}
  assert sizes == {"train": 48, "validation": 10, "test": 6}


def test_stored_examples_equal_the_generator_output(capworld_builder):
  source = datasets.open_split(capworld_builder, "validation")
  spec = capworld_builder.builder_config.spec
  ids = set()
  for index in range(len(source)):
    stored = pipeline.decode_strings(source[index])
    split, number = stored["id"].split("-")[1:]
    expected = make_example(spec, split, int(number))
    np.testing.assert_array_equal(stored["image"], np.asarray(expected["image"]))
    for key in ("references", "sft_caption", "sft_flaws", "scene_graph", "width", "height"):
      assert stored[key] == expected[key], key
    assert json.loads(stored["scene_graph"])["objects"]
    ids.add(stored["id"])
  assert len(ids) == 10 and all(i.startswith("capworld-validation-") for i in ids)


def test_every_setting_is_its_own_data_set(tmp_path):
  base = capworld_builder.capworld_config(CapWorldSpec(), num_train=10, num_validation=2,
                                          num_test=2)
  other_seed = capworld_builder.capworld_config(CapWorldSpec(seed=1), num_train=10,
                                                num_validation=2, num_test=2)
  other_size = capworld_builder.capworld_config(CapWorldSpec(), num_train=11, num_validation=2,
                                                num_test=2)
  assert len({base.name, other_seed.name, other_size.name}) == 3
  data = tiny_data_config(tmp_path)
  data.capworld.num_test = 0  # an empty split is simply absent
  builder = datasets.prepare(data)
  assert sorted(builder.info.splits) == ["train", "validation"]
