"""LLaVA-1.5 in Flax equals transformers' PyTorch model: logits, checkpoints, export, errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import transformers

from balcap import models
from balcap.models import hf_io, llava, safetensors_io
from llava_fixtures import IMAGE_ID, batch, reference_logits, tiny_config, write_checkpoint

TOLERANCE = 1e-4  # fp32 logits, max |diff|


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("llava_untied"))
  reference = write_checkpoint(folder, tiny_config())
  return folder, reference, models.load_pretrained(folder)


def assert_logits_match(policy, reference, inputs, tolerance=TOLERANCE):
  ours = np.asarray(policy.apply(policy.params, inputs))
  theirs = reference_logits(reference, inputs)
  real = inputs["attention_mask"].astype(bool)  # padding positions are garbage on both sides
  diff = np.abs(ours - theirs)[real].max()
  assert diff <= tolerance, f"max |diff| {diff:.2e} > {tolerance}"
  return diff


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_text_only_prompts_with_padding(untied, padding_side):
  _, reference, policy = untied
  rng = np.random.default_rng(0)
  inputs = batch(rng, [(list(rng.integers(0, 240, 11)), False),
                       (list(rng.integers(0, 240, 6)), False)], padding_side)
  assert_logits_match(policy, reference, inputs)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_images_and_a_text_only_row_with_padding(untied, padding_side):
  _, reference, policy = untied
  rng = np.random.default_rng(1)
  inputs = batch(rng, [([1, 5, 6, 7], True), (list(rng.integers(0, 240, 12)), False),
                       ([1, 8, 9], True)], padding_side)
  assert_logits_match(policy, reference, inputs)


@pytest.mark.parametrize("feature_layer,strategy", [(-1, "default"), (1, "full")])
def test_other_feature_layers_and_the_full_strategy(tmp_path, feature_layer, strategy):
  folder = str(tmp_path / "ckpt")
  reference = write_checkpoint(folder, tiny_config(feature_layer=feature_layer,
                                                   strategy=strategy), seed=2)
  policy = models.load_pretrained(folder)
  features = 5 if strategy == "full" else 4
  rng = np.random.default_rng(2)
  assert_logits_match(policy, reference, batch(rng, [([1, 2, 3], True)], features=features))


def test_tied_embeddings(tmp_path):
  folder = str(tmp_path / "tied")
  reference = write_checkpoint(folder, tiny_config(tie=True), seed=3)
  policy = models.load_pretrained(folder)
  assert "lm_head" not in policy.params["lm"]
  rng = np.random.default_rng(3)
  assert_logits_match(policy, reference, batch(rng, [([1, 2, 3], True)]))


def test_export_in_the_published_layout_loads_in_transformers_identically(untied, tmp_path):
  _, reference, policy = untied
  out = str(tmp_path / "export")
  policy.save_pretrained(out)
  names = hf_io.checkpoint_tensors(out)
  # The published llava-hf layout: CLIP under vision_tower.vision_model, the unused last block
  # and pooler norm included, so nothing is lost on the way through balcap.
  assert "vision_tower.vision_model.post_layernorm.weight" in names
  assert "vision_tower.vision_model.encoder.layers.2.mlp.fc2.bias" in names
  assert "language_model.lm_head.weight" in names
  exported = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  for name, tensor in exported.state_dict().items():
    np.testing.assert_array_equal(tensor.numpy(), reference.state_dict()[name].numpy(), name)
  assert models.load_pretrained(out).config == policy.config


def _respelled(folder, destination, rename):
  shutil.copytree(folder, destination)
  infos = safetensors_io.read_header(os.path.join(folder, hf_io.SINGLE_FILE))
  tensors = [(rename(name), safetensors_io.read_tensor(info)) for name, info in infos.items()]
  safetensors_io.write_file(os.path.join(destination, hf_io.SINGLE_FILE), tensors)


def test_model_prefixed_spellings_load(untied, tmp_path):
  """transformers 4.5x wrote `model.vision_tower.vision_model.*`, `model.language_model.*`,
  `model.multi_modal_projector.*` and `lm_head.weight`."""
  folder, reference, _ = untied
  def rename(name):
    if name.startswith("language_model.model."):
      return "model.language_model." + name[len("language_model.model."):]
    if name == "language_model.lm_head.weight":
      return "lm_head.weight"
    if name.startswith("vision_tower."):
      return "model.vision_tower.vision_model." + name[len("vision_tower."):]
    return "model." + name
  _respelled(folder, tmp_path / "respelled", rename)
  policy = models.load_pretrained(str(tmp_path / "respelled"))
  rng = np.random.default_rng(4)
  assert_logits_match(policy, reference, batch(rng, [([1, 2, 3], True)]))


def test_a_missing_tensor_is_named(untied, tmp_path):
  folder, _, _ = untied
  shutil.copytree(folder, tmp_path / "bad")
  path = os.path.join(tmp_path / "bad", hf_io.SINGLE_FILE)
  infos = safetensors_io.read_header(path)
  tensors = [(n, safetensors_io.read_tensor(i)) for n, i in infos.items()
             if n != "multi_modal_projector.linear_2.weight"]
  safetensors_io.write_file(path, tensors)
  with pytest.raises(hf_io.CheckpointMismatchError,
                     match="missing tensor multi_modal_projector.linear_2.weight"):
    models.load_pretrained(str(tmp_path / "bad"))


def test_prepare_inputs_checks_image_tokens_against_images(untied):
  _, _, policy = untied
  rng = np.random.default_rng(5)
  inputs = batch(rng, [([1, 2, 3], True)])
  inputs["input_ids"][0, -1] = IMAGE_ID  # one image token too many
  with pytest.raises(ValueError, match="5 image tokens but its 1 image"):
    llava.prepare_inputs(policy.config, inputs)


def test_architecture_round_trips_through_a_config_dict(untied):
  _, _, policy = untied
  architecture = json.loads(json.dumps(policy.config.architecture()))
  assert llava.LlavaConfig.from_dict(architecture) == policy.config.with_runtime(
      scan_layers=True)


# llava-hf/llava-1.5-7b-hf's config.json as published (transformers 4.36 format).
PUBLISHED_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
    "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama",
                    "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                      "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}


def test_llava7b_config_is_the_published_architecture(tmp_path):
  from testlib import load_config_file  # pylint: disable=import-outside-toplevel
  (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_7B))
  published = llava.LlavaConfig.from_hf(transformers.AutoConfig.from_pretrained(str(tmp_path)))
  config = load_config_file("llava7b")
  ours = models.architecture_from_config(config.model)
  assert ours.architecture() == published.architecture()
  assert ours.vision.num_features == 576
  # 7.06B parameters: Vicuna-7B 6.74B, CLIP ViT-L 0.30B, projector 0.02B (shapes only).
  from balcap.models import policy  # pylint: disable=import-outside-toplevel
  boxed, _ = policy.boxed_abstract_params(llava.FAMILY, ours)
  sizes = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in boxed.items()}
  assert sum(sizes.values()) == pytest.approx(7.06e9, rel=0.005), sizes
  assert sizes["vision_tower"] == pytest.approx(0.3035e9, rel=0.005), sizes
  # The config's frozen groups are CLIP's unused last block and pooler norm, and nothing else.
  from balcap import optim  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  labels = optim.freeze_labels(nn.unbox(boxed), tuple(config.rl.optimizer.freeze))
  frozen = [optim.param_path(p) for p, label in jax.tree_util.tree_leaves_with_path(labels)
            if label == "frozen"]
  # 16 tensors of the block (4 attention + 2 MLP projections, 2 norms, each weight + bias), 2 of
  # the norm.
  assert len(frozen) == 18 and all("layers_23/" in p or "post_layernorm" in p for p in frozen)


def test_bfloat16_logits_stay_close_to_float32(untied):
  folder, reference, _ = untied
  policy = models.load_pretrained(folder, dtype="bfloat16")
  assert policy.params["vision_tower"]["patch_embedding"]["kernel"].dtype == jax.numpy.bfloat16
  rng = np.random.default_rng(8)
  inputs = batch(rng, [([1, 2, 3, 4, 5, 6], True), ([7, 8, 9], True)], padding_side="right")
  real = inputs["attention_mask"].astype(bool)
  ours = np.asarray(policy.apply(policy.params, inputs))[real]
  theirs = reference_logits(reference, inputs)[real]
  # bf16 keeps 8 bits of mantissa: logits move by a few 1e-2 of their scale through CLIP,
  # the projector and 2 decoder layers.
  scale = np.abs(theirs).max()
  assert np.abs(ours - theirs).max() <= 0.03 * scale
  assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_remat_changes_memory_not_gradients(untied):
  _, _, policy = untied
  rng = np.random.default_rng(9)
  inputs = policy.prepare(batch(rng, [([1, 2, 3], True)]))
  inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids",
                                   "pixel_values")}

  def grads(remat):
    module = llava.Llava(policy.config.with_runtime(remat=remat))
    loss = lambda p: module.apply({"params": p}, **inputs).sum()  # noqa: E731
    return jax.jit(jax.grad(loss))(policy.params)

  plain, remat = grads("none"), grads("full")
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # float reassociation only


def test_init_random_writes_a_checkpoint_transformers_reads_identically(tmp_path):
  config = llava.LlavaConfig.from_hf(tiny_config())
  policy = models.init_random(config, jax.random.key(3))
  policy.save_pretrained(str(tmp_path / "random"))
  theirs = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "random"))
  rng = np.random.default_rng(10)
  assert_logits_match(policy, theirs.eval(), batch(rng, [([1, 2, 3, 4], True)]))
