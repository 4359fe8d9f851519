"""sft.ImageGain: the caption loss with true against shuffled images says if the policy sees."""

import jax
import jax.numpy as jnp
import pytest

from balcap import configs, models, sft
from balcap.data import datasets
from testlib import load_config_file


@pytest.fixture(scope="module")
def probe(capworld_builder):
  config = load_config_file("tiny", "mode=sft")
  policy = models.policy_from_config(config.model, jax.random.key(0))
  gain = sft.ImageGain(policy, datasets.open_split(capworld_builder, "validation"),
                       batch_size=4, prompt=config.sampling.prompt, target="sft_caption",
                       max_length=256, mesh=None)
  return policy, gain


def test_a_policy_that_reads_the_image_loses_by_the_swap_and_a_blind_one_does_not(probe):
  policy, gain = probe
  seeing = gain(policy.params)
  assert abs(seeing["sft/image_gain"]) > 1e-4  # the swap changed what the policy was shown
  assert seeing["sft/image_gain"] == pytest.approx(
      seeing["sft/validation_loss_shuffled_images"] - seeing["sft/validation_loss"])
  # Zero the merger's output layer: every image feature is 0, whatever the image.
  blind = jax.tree.map(lambda x: x, policy.params)
  merger = dict(blind["visual"]["merger"])
  merger["mlp_2"] = jax.tree.map(jnp.zeros_like, merger["mlp_2"])
  blind["visual"] = dict(blind["visual"], merger=merger)
  assert gain(blind)["sft/image_gain"] == 0.0
  # The captions are the same in both batches: only the images moved.
  true, shuffled = gain.inputs
  assert (true["input_ids"] == shuffled["input_ids"]).all()
  assert not (true["pixel_values"] == shuffled["pixel_values"]).all()


def test_image_gain_every_must_be_a_logged_step():
  config = load_config_file("tiny")
  config.sft.image_gain_every = 15
  with pytest.raises(configs.ConfigError, match="config.sft.image_gain_every=15"):
    configs.validate(config, num_devices=1)
  config.sft.num_steps = 0  # no SFT stage: nothing is measured, so nothing to complain about
  configs.validate(config, num_devices=1)
