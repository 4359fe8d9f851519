"""Qwen2.5-VL in Flax equals transformers' PyTorch model: logits, checkpoints, export, errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import transformers

from balcap import models, parallel
from balcap.models import hf_io, qwen_vl, safetensors_io
from qwen_fixtures import (IMAGE_ID, batch, reference_logits, tiny_config, write_checkpoint)

TOLERANCE = 1e-4  # fp32 logits, max |diff|


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen_untied"))
  reference = write_checkpoint(folder, tiny_config(tie=False))
  return folder, reference, models.load_pretrained(folder)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen_tied"))
  reference = write_checkpoint(folder, tiny_config(tie=True), seed=1)
  return folder, reference, models.load_pretrained(folder)


def assert_logits_match(policy, reference, inputs, tolerance=TOLERANCE):
  ours = np.asarray(policy.apply(policy.params, inputs))
  theirs = reference_logits(reference, inputs)
  real = inputs["attention_mask"].astype(bool)  # padding rows are garbage on both sides
  diff = np.abs(ours - theirs)[real].max()
  assert diff <= tolerance, f"max |diff| {diff:.2e} > {tolerance}"
  return diff


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_text_only_prompts_with_padding(untied, padding_side):
  _, reference, policy = untied
  rng = np.random.default_rng(0)
  inputs = batch(rng, [(list(rng.integers(0, 240, 11)), None),
                       (list(rng.integers(0, 240, 6)), None)], padding_side)
  assert_logits_match(policy, reference, inputs)


def test_one_image(untied):
  _, reference, policy = untied
  rng = np.random.default_rng(1)
  assert_logits_match(policy, reference, batch(rng, [([1, 2, 3, 4, 5], (1, 8, 8))]))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_two_images_of_different_sizes_in_one_batch(untied, padding_side):
  _, reference, policy = untied
  rng = np.random.default_rng(2)
  # 10x14 patches: 5x7 merged, windows of 2x2 merged -> partial windows at the right and
  # bottom; 6x4 patches: a grid that is not a multiple of the window either.
  inputs = batch(rng, [([7, 8, 9], (1, 10, 14)), ([3, 4, 5, 6, 7, 8], (1, 6, 4))], padding_side)
  assert_logits_match(policy, reference, inputs)


def test_grid_that_is_a_multiple_of_the_window_and_mixed_text_rows(untied):
  _, reference, policy = untied
  rng = np.random.default_rng(3)
  inputs = batch(rng, [([5, 6, 7, 8], (1, 8, 4)), (list(rng.integers(0, 240, 9)), None)])
  assert_logits_match(policy, reference, inputs)


def test_tied_embeddings(tied):
  folder, reference, policy = tied
  assert "lm_head" not in policy.params["lm"]
  rng = np.random.default_rng(4)
  assert_logits_match(policy, reference, batch(rng, [([1, 2, 3], (1, 6, 6)),
                                                     ([4, 5, 6, 7, 8, 9, 10], None)]))
  assert "lm_head.weight" not in hf_io.checkpoint_tensors(folder)


def test_rope_index_equals_the_reference(untied):
  _, reference, _ = untied
  rng = np.random.default_rng(5)
  inputs = batch(rng, [([1, 2, 3], (1, 10, 14)), ([4, 5, 6, 7, 8, 9, 10, 11], (1, 6, 4))])
  ours, deltas = qwen_vl.rope_index(inputs["input_ids"], inputs["attention_mask"],
                                    inputs["image_grid_thw"], IMAGE_ID, 2)
  import torch  # pylint: disable=import-outside-toplevel
  ids = torch.tensor(inputs["input_ids"], dtype=torch.long)
  theirs, their_deltas = reference.model.get_rope_index(
      ids, (ids == IMAGE_ID).int(), torch.tensor(inputs["image_grid_thw"]),
      attention_mask=torch.tensor(inputs["attention_mask"]))
  np.testing.assert_array_equal(ours, theirs.numpy())
  np.testing.assert_array_equal(deltas, their_deltas.numpy().reshape(-1))


def test_export_loads_in_transformers_with_identical_logits(untied, tmp_path):
  _, reference, policy = untied
  policy.save_pretrained(str(tmp_path / "export"))
  exported = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      str(tmp_path / "export")).eval()
  rng = np.random.default_rng(6)
  inputs = batch(rng, [([1, 2, 3, 4], (1, 8, 6))])
  np.testing.assert_array_equal(reference_logits(exported, inputs),
                                reference_logits(reference, inputs))
  for name, tensor in exported.state_dict().items():
    np.testing.assert_array_equal(tensor.numpy(), reference.state_dict()[name].numpy(), name)


def test_sharded_multi_file_checkpoint_loads_onto_a_mesh(untied, tmp_path):
  folder, reference, policy = untied
  sharded = str(tmp_path / "sharded")
  tensors = hf_io.hf_tensors(policy.family.rules(policy.config), policy.params,
                             policy.family.hf_shapes(policy.config))
  files = hf_io.save_tensors(sharded, tensors, max_shard_bytes=100_000)
  assert len(files) > 3 and hf_io.INDEX_FILE in files
  shutil.copy(os.path.join(folder, "config.json"), sharded)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  on_mesh = models.load_pretrained(sharded, mesh=mesh)
  q_kernel = on_mesh.params["lm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  rng = np.random.default_rng(7)
  inputs = batch(rng, [([1, 2], (1, 6, 6)), ([3, 4, 5], (1, 4, 8))])
  assert_logits_match(on_mesh, reference, inputs)


def test_published_flat_config_layout_loads(untied, tmp_path):
  """Published Qwen2.5-VL config.json files are flat with rope_scaling; transformers 5 nests."""
  folder, _, policy = untied
  nested = json.load(open(os.path.join(folder, "config.json")))
  text = nested.pop("text_config")
  rope = text.pop("rope_parameters")
  flat = {**nested, **{k: v for k, v in text.items() if k not in ("model_type", "dtype")},
          "rope_theta": rope["rope_theta"],
          "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
  flat["vision_config"]["in_chans"] = flat["vision_config"].pop("in_channels")
  flat_folder = tmp_path / "flat"
  shutil.copytree(folder, flat_folder)
  (flat_folder / "config.json").write_text(json.dumps(flat))
  assert models.load_pretrained(str(flat_folder)).config == policy.config


def _rewrite(folder, destination, edit):
  """Copies a checkpoint with its single safetensors file rewritten by `edit(name, array)`."""
  shutil.copytree(folder, destination)
  infos = safetensors_io.read_header(os.path.join(folder, hf_io.SINGLE_FILE))
  tensors = []
  for name, info in infos.items():
    array = edit(name, safetensors_io.read_tensor(info))
    if array is not None:
      tensors.append((name, array))
  safetensors_io.write_file(os.path.join(destination, hf_io.SINGLE_FILE), tensors)


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(untied, tmp_path):
  folder, _, _ = untied
  def edit(name, array):
    if name == "model.layers.1.mlp.up_proj.weight":
      return None
    if name == "visual.blocks.0.attn.qkv.bias":
      return array[:-1]
    return array
  _rewrite(folder, tmp_path / "bad", edit)
  with pytest.raises(hf_io.CheckpointMismatchError) as info:
    models.load_pretrained(str(tmp_path / "bad"))
  message = str(info.value)
  assert "1 missing, 0 unexpected, 1 mis-shaped" in message
  assert "missing tensor model.layers.1.mlp.up_proj.weight: expected (128, 64)" in message
  assert "mis-shaped tensor visual.blocks.0.attn.qkv.bias: expected (96,)" in message
  assert "found (95,)" in message


def test_a_surplus_tensor_is_named(untied, tmp_path):
  folder, _, _ = untied
  shutil.copytree(folder, tmp_path / "extra")
  path = os.path.join(tmp_path / "extra", hf_io.SINGLE_FILE)
  infos = safetensors_io.read_header(path)
  tensors = [(n, safetensors_io.read_tensor(i)) for n, i in infos.items()]
  tensors.append(("model.layers.2.mlp.up_proj.weight", np.zeros((128, 64), np.float32)))
  safetensors_io.write_file(path, tensors)
  with pytest.raises(hf_io.CheckpointMismatchError,
                     match="unexpected tensor model.layers.2.mlp.up_proj.weight: layer 2 but "
                     "the model has 2 layers"):
    models.load_pretrained(str(tmp_path / "extra"))


def test_a_truncated_file_names_the_tensor(untied, tmp_path):
  folder, _, _ = untied
  shutil.copytree(folder, tmp_path / "cut")
  path = os.path.join(tmp_path / "cut", hf_io.SINGLE_FILE)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 1000)
  with pytest.raises(safetensors_io.CorruptFileError, match=r"tensor '.*' ends at byte .* "
                     r"but the file has .* bytes \(truncated\?\)"):
    models.load_pretrained(str(tmp_path / "cut"))


def test_bfloat16_logits_stay_close_to_float32(untied):
  folder, reference, _ = untied
  policy = models.load_pretrained(folder, dtype="bfloat16")
  assert policy.params["lm"]["embed_tokens"]["embedding"].dtype == jax.numpy.bfloat16
  rng = np.random.default_rng(8)
  inputs = batch(rng, [([1, 2, 3, 4, 5, 6], (1, 8, 8))])
  ours = np.asarray(policy.apply(policy.params, inputs))
  theirs = reference_logits(reference, inputs)
  # bf16 keeps 8 bits of mantissa: logits of scale ~1 move by a few 1e-2 through 2 layers.
  scale = np.abs(theirs).max()
  diff = np.abs(ours - theirs).max()
  assert diff <= 0.03 * scale, (diff, scale)
  agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
  assert agree >= 0.9, agree
