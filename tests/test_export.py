"""Mode `export`: a run's trained params (read from its stage checkpoint, params only) become an
HF folder that transformers loads with the trained model's logits, for Qwen2.5-VL and LLaVA."""

import os
import shutil

import jax
import numpy as np
import pytest
import transformers

import llava_fixtures
import qwen_fixtures
from balcap import checkpoint, configs, export, models, trained
from testlib import QWEN_TOKENIZER_DIR

TOLERANCE = 1e-4  # fp32 logits, max |diff|


def _qwen(folder):
  qwen_fixtures.write_checkpoint(folder, qwen_fixtures.tiny_config())
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(QWEN_TOKENIZER_DIR, name), folder)
  rng = np.random.default_rng(0)
  inputs = qwen_fixtures.batch(rng, [(list(rng.integers(0, 240, 7)), (1, 4, 4)),
                                     (list(rng.integers(0, 240, 5)), None)])
  return transformers.Qwen2_5_VLForConditionalGeneration, qwen_fixtures.reference_logits, inputs


def _llava(folder):
  llava_fixtures.write_checkpoint(folder, llava_fixtures.tiny_config())
  llava_fixtures.write_tokenizer(folder)
  rng = np.random.default_rng(0)
  inputs = llava_fixtures.batch(rng, [(list(rng.integers(3, 240, 7)), True),
                                      (list(rng.integers(3, 240, 5)), False)])
  return (transformers.LlavaForConditionalGeneration, llava_fixtures.reference_logits, inputs)


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_export_of_a_trained_checkpoint_loads_in_transformers_with_its_logits(tmp_path, family):
  base = str(tmp_path / "base")
  model_class, reference_logits, inputs = {"qwen": _qwen, "llava": _llava}[family](base)
  config = configs.base_config()
  config.model.checkpoint, config.model.dtype = base, "float32"
  policy = models.policy_from_config(config.model, jax.random.key(0))
  # "Training": every weight moved, so an export of the base weights would fail the check.
  leaves, tree = jax.tree.flatten(policy.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  trained_params = jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
                                             for x, k in zip(leaves, keys)])
  run = tmp_path / "run"
  with checkpoint.Checkpointer(str(run / "sft" / "checkpoints"), async_save=False) as store:
    state = {"params": trained_params, "opt_state": {"mu": trained_params},
             "step": np.int32(4)}
    store.save(4, state, config=config)

  config.mode = "export"
  config.export.dtype = "float32"
  folder = export.run(config, str(run))
  assert folder == str(run / "export" / "sft_4")
  assert os.path.exists(os.path.join(folder, "tokenizer_config.json"))
  theirs = model_class.from_pretrained(folder).eval()
  ours = np.asarray(policy.apply(trained_params, inputs))
  real = inputs["attention_mask"].astype(bool)
  assert np.abs(ours - reference_logits(theirs, inputs))[real].max() <= TOLERANCE
  base_logits = reference_logits(model_class.from_pretrained(base).eval(), inputs)
  assert np.abs(ours - base_logits)[real].max() > 100 * TOLERANCE


def test_a_run_without_checkpoints_or_the_asked_step_is_named(tmp_path):
  with pytest.raises(configs.BalcapError, match="holds no training checkpoints"):
    trained.find(str(tmp_path))
  os.makedirs(tmp_path / "sft" / "checkpoints" / "7" / "state")
  assert trained.find(str(tmp_path)) == trained.Source(str(tmp_path), "sft", 7)
  with pytest.raises(configs.BalcapError, match="has no rl checkpoints; it has"):
    trained.find(str(tmp_path), "rl")
  with pytest.raises(configs.BalcapError, match=r"has no step 3; its steps are \[7\]"):
    trained.find(str(tmp_path), "sft", 3)
