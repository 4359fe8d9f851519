"""balcap.models.qwen_vision against transformers' Qwen2.5-VL vision tower: features, layouts,
padding, one compile for many grids, locality of window attention, the checkpoint table."""

import dataclasses
import itertools
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from transformers import vision_utils

from balcap.models import hf_io, safetensors_io
from balcap.models import qwen_vision
from balcap.models.qwen_vision import QwenVisionConfig, QwenVisionTower

# window_size 56 px = 4 patches = 2 merge blocks per side: 16 patches per window.
VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=48,
              window_size=56, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2)
TEXT = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [2, 2, 2]})
PARTIAL = [[1, 10, 14]]         # 5 x 7 merge blocks: windows cut at the right and bottom
EXACT = [[1, 8, 8]]             # 4 x 4 blocks: exactly 2 x 2 windows
TWO_IMAGES = [[1, 10, 14], [1, 6, 4]]
VIDEO = [[2, 4, 6]]             # two frames: full attention stays inside each frame
# One static shape for every grid above (and the locality test's).
SIZES = dict(num_patches=192, num_windows=26, num_images=4, image_patches=140)
TOLERANCE = 1e-4


def pixels_for(grid, seed=0):
  """Random patches shaped like the processor's pixel_values [sum(t*h*w), 3*2*14*14]."""
  count = int(np.prod(np.asarray(grid), axis=1).sum())
  return np.random.RandomState(seed).normal(size=(count, 3 * 2 * 14 * 14)).astype(np.float32)


def pad_rows(x, rows):
  return np.concatenate([x, np.zeros((rows - len(x), x.shape[1]), x.dtype)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A random transformers model (biases and norm scales randomised too), its checkpoint as
  save_pretrained writes it, and the tower's tensors alone in a second folder."""
  torch.manual_seed(0)
  hf_config = transformers.Qwen2_5_VLConfig(vision_config=VISION, text_config=TEXT)
  model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config).eval()
  with torch.no_grad():
    for name, param in model.model.visual.named_parameters():
      if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "ln_q" in name:
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      else:
        param.copy_(0.1 * torch.randn_like(param))
  full = str(tmp_path_factory.mktemp("hf_full"))
  model.save_pretrained(full)
  visual_only = str(tmp_path_factory.mktemp("hf_visual"))
  written = safetensors_io.read_header(os.path.join(full, "model.safetensors"))
  safetensors_io.write_file(os.path.join(visual_only, "model.safetensors"),
                            [(n, safetensors_io.read_tensor(i)) for n, i in written.items()
                             if n.startswith("visual.")])
  return model.model.visual, hf_config, full, visual_only


@pytest.fixture(scope="module")
def tower(reference):
  """(config, params loaded from the transformers checkpoint, jitted forward, trace counter)."""
  _, hf_config, _, visual_only = reference
  config = QwenVisionConfig.from_hf(hf_config.vision_config.to_dict())
  module = QwenVisionTower(config)
  layout = qwen_vision.vision_layout(np.array(EXACT), config)
  boxed = jax.eval_shape(module.init, jax.random.key(0), pixels_for(EXACT), layout)["params"]
  params = hf_io.load_params(visual_only, qwen_vision.vision_rules(),
                             {"visual": nn.unbox(boxed)})["visual"]
  traces = []

  @jax.jit
  def forward(params, pixels, layout):
    traces.append(pixels.shape)  # runs once per trace, not per call
    return module.apply({"params": params}, pixels, layout)

  return config, params, forward, traces


def hf_features(reference, grid, pixels):
  visual = reference[0]
  with torch.no_grad():
    return visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grid)).pooler_output.numpy()


def balcap_features(tower, grid, pixels, sizes=None):
  """Features of the real rows; `sizes` pads the layout (and the pixels) to static sizes."""
  config, params, forward, _ = tower
  layout = qwen_vision.vision_layout(np.array(grid), config, **(sizes or {}))
  real = len(pixels)
  padded = pad_rows(pixels, layout["position_ids"].shape[0])
  return np.asarray(forward(params, padded, layout))[:real // config.merge_unit]


def max_diff(a, b):
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


# ---------------------------------------------------------------------------------------------
# Parity with transformers


def test_partial_windows_match_transformers(reference, tower):
  pixels = pixels_for(PARTIAL)
  ours = balcap_features(tower, PARTIAL, pixels)  # exact sizes: no padding at all
  assert ours.shape == (140 // 4, 48)
  assert max_diff(ours, hf_features(reference, PARTIAL, pixels)) <= TOLERANCE


def test_grid_multiple_of_window_matches_transformers(reference, tower):
  pixels = pixels_for(EXACT, seed=1)
  ours = balcap_features(tower, EXACT, pixels, SIZES)
  assert max_diff(ours, hf_features(reference, EXACT, pixels)) <= TOLERANCE


def test_video_frames_match_transformers(reference, tower):
  pixels = pixels_for(VIDEO, seed=2)
  ours = balcap_features(tower, VIDEO, pixels, SIZES)
  assert max_diff(ours, hf_features(reference, VIDEO, pixels)) <= TOLERANCE


def test_two_images_match_transformers_and_never_attend_to_each_other(reference, tower):
  pixels = pixels_for(TWO_IMAGES, seed=3)
  together = balcap_features(tower, TWO_IMAGES, pixels, SIZES)
  assert max_diff(together, hf_features(reference, TWO_IMAGES, pixels)) <= TOLERANCE
  first_patches = 10 * 14
  first = balcap_features(tower, TWO_IMAGES[:1], pixels[:first_patches], SIZES)
  second = balcap_features(tower, TWO_IMAGES[1:], pixels[first_patches:], SIZES)
  assert max_diff(together, np.concatenate([first, second])) <= 1e-5


def test_padded_layout_gives_the_same_features(tower):
  pixels = pixels_for(PARTIAL, seed=4)
  exact = balcap_features(tower, PARTIAL, pixels)
  padded = balcap_features(tower, PARTIAL, pixels, SIZES)
  assert max_diff(exact, padded) <= 1e-5
  config, params, forward, _ = tower
  layout = qwen_vision.vision_layout(np.array(PARTIAL), config, **SIZES)
  assert np.all(np.isfinite(np.asarray(forward(params, pad_rows(pixels, 192), layout))))


def test_one_compile_serves_every_grid_that_fits(reference, tower):
  config, params, _, _ = tower
  traces = []

  @jax.jit
  def forward(params, pixels, layout):
    traces.append(1)
    return QwenVisionTower(config).apply({"params": params}, pixels, layout)

  for seed, grid in enumerate([PARTIAL, EXACT, TWO_IMAGES, VIDEO, [[1, 2, 2]] * 4]):
    pixels = pixels_for(grid, seed=10 + seed)
    layout = qwen_vision.vision_layout(np.array(grid), config, **SIZES)
    out = np.asarray(forward(params, pad_rows(pixels, SIZES["num_patches"]), layout))
    assert max_diff(out[:len(pixels) // 4], hf_features(reference, grid, pixels)) <= TOLERANCE
  assert len(traces) == 1


# ---------------------------------------------------------------------------------------------
# Layouts


def reference_groups(grid, config):
  """Windows, frames and positions as transformers computes them, in patches."""
  grid_t = torch.tensor(grid)
  window_units, cu_windows = vision_utils.get_vision_window_index(
      grid_t, config.spatial_merge_size, config.window_size, config.patch_size)
  order = (window_units[:, None] * 4 + torch.arange(4)).reshape(-1).numpy()
  cu_windows = cu_windows.numpy()
  windows = [order[a:b].tolist() for a, b in zip(cu_windows[:-1], cu_windows[1:])]
  cu_frames = vision_utils.get_vision_cu_seqlens(grid_t).numpy()
  frames = [list(range(a, b)) for a, b in zip(cu_frames[:-1], cu_frames[1:])]
  positions = vision_utils.get_vision_position_ids(grid_t, config.spatial_merge_size).numpy()
  return windows, frames, positions


def groups_of(index, mask):
  return [row[keep].tolist() for row, keep in zip(index, mask) if keep.any()]


@pytest.mark.parametrize("grid", [PARTIAL, EXACT, TWO_IMAGES, VIDEO, [[1, 2, 2]],
                                  [[1, 2, 30], [3, 12, 6], [1, 18, 4]]])
def test_layout_groups_patches_exactly_like_transformers(grid):
  config = QwenVisionConfig.from_hf(VISION)
  windows, frames, positions = reference_groups(grid, config)
  layout = qwen_vision.vision_layout(np.array(grid), config, **qwen_vision.worst_case_sizes(
      config, num_patches=600, num_images=6, image_patches=200))
  num_patches = len(positions)
  assert groups_of(layout["window_index"], layout["window_mask"]) == windows
  assert groups_of(layout["image_index"], layout["image_mask"]) == frames
  np.testing.assert_array_equal(layout["position_ids"][:num_patches], positions)
  for index, position in ((layout["window_index"], layout["window_position"]),
                          (layout["image_index"], layout["image_position"])):
    assert np.all(index[~(index < 600)] == 600)  # padding points at the dummy row
    np.testing.assert_array_equal(index.reshape(-1)[position[:num_patches]],
                                  np.arange(num_patches))
    assert np.all(position[num_patches:] == index.size)


def test_worst_case_sizes_fit_every_grid_within_budget():
  config = QwenVisionConfig.from_hf(dict(VISION, window_size=112))  # 4 blocks per window side
  sides = range(2, 41, 2)
  for h, w in itertools.product(sides, sides):
    sizes = qwen_vision.worst_case_sizes(config, num_patches=h * w, num_images=1,
                                         image_patches=h * w)
    assert qwen_vision.required_sizes(np.array([[1, h, w]]), config)["num_windows"] <= (
        sizes["num_windows"]), (h, w)
  strips = qwen_vision.worst_case_sizes(config, num_patches=3 * 2 * 18, num_images=3,
                                        image_patches=36)
  qwen_vision.vision_layout(np.array([[1, 2, 18]] * 3), config, **strips)  # 3 x 3 windows


def test_layout_rejects_sizes_too_small_and_odd_grids():
  config = QwenVisionConfig.from_hf(VISION)
  with pytest.raises(ValueError, match="num_windows=3 < 12"):
    qwen_vision.vision_layout(np.array(PARTIAL), config, num_windows=3)
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    qwen_vision.vision_layout(np.array([[1, 5, 4]]), config)
  with pytest.raises(ValueError, match="multiple of 4"):
    qwen_vision.vision_layout(np.array(EXACT), config, num_patches=66)


def test_window_attention_is_local(tower):
  """With every block windowed, changing one patch changes only its window's features."""
  config, params, _, _ = tower
  module = QwenVisionTower(dataclasses.replace(config, fullatt_block_indexes=()))
  layout = qwen_vision.vision_layout(np.array(PARTIAL), module.config, **SIZES)
  pixels = pad_rows(pixels_for(PARTIAL, seed=5), SIZES["num_patches"])
  forward = jax.jit(lambda x: module.apply({"params": params}, x, layout))
  patch = 77
  changed = pixels.copy()
  changed[patch] += 1.0
  moved = np.abs(np.asarray(forward(changed)) - np.asarray(forward(pixels))).max(axis=1)
  moved = moved[:140 // 4] > 0
  window = np.flatnonzero((layout["window_index"] == patch).any(axis=1))[0]
  in_window = layout["window_index"][window][layout["window_mask"][window]] // 4
  expected = np.zeros(140 // 4, bool)
  expected[in_window] = True
  np.testing.assert_array_equal(moved, expected)
  assert 1 < expected.sum() < 140 // 4


def test_bfloat16_with_remat_runs_and_differentiates(tower):
  config, params, _, _ = tower
  module = QwenVisionTower(dataclasses.replace(config, dtype="bfloat16", remat="full"))
  layout = qwen_vision.vision_layout(np.array(EXACT), config)
  pixels = pixels_for(EXACT, seed=6)

  def loss(params):
    features = module.apply({"params": params}, pixels, layout)
    return (features.astype(np.float32) ** 2).mean(), features

  (_, features), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert features.dtype == np.dtype("bfloat16")
  reference = balcap_features(tower, EXACT, pixels)
  assert max_diff(np.asarray(features, np.float32), reference) <= 0.05 * np.abs(reference).max()
  qkv_grad = np.asarray(grads["blocks"]["attn"]["qkv"]["kernel"])
  assert np.all(np.isfinite(qkv_grad)) and np.all(np.abs(qkv_grad).sum(axis=(1, 2)) > 0)


# ---------------------------------------------------------------------------------------------
# Checkpoints and configs


def test_rules_read_transformers_checkpoint_and_write_it_back(reference, tower):
  _, hf_config, full, _ = reference
  config, params, _, _ = tower
  written = safetensors_io.read_header(os.path.join(full, "model.safetensors"))
  visual = {n: i for n, i in written.items() if n.startswith("visual.")}
  conv_shape = (config.hidden_size, config.in_channels, config.temporal_patch_size,
                config.patch_size, config.patch_size)
  round_trip = dict(hf_io.hf_tensors(qwen_vision.vision_rules(), {"visual": params},
                                     {"visual/patch_embed/kernel": conv_shape}))
  assert sorted(round_trip) == sorted(visual)
  for name, info in visual.items():
    np.testing.assert_array_equal(round_trip[name], safetensors_io.read_tensor(info),
                                  err_msg=name)
  # The loader (used by the tower fixture) checked that nothing is missing or surplus; a
  # surplus tensor is reported, not ignored.
  with pytest.raises(hf_io.CheckpointMismatchError, match="unexpected tensor model.norm"):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    hf_io.load_params(full, qwen_vision.vision_rules(), {"visual": abstract})
  assert hf_config.vision_config.depth == params["blocks"]["norm1"]["scale"].shape[0]


def test_params_carry_logical_axes():
  config = QwenVisionConfig.from_hf(VISION)
  layout = qwen_vision.vision_layout(np.array(EXACT), config)
  boxed = jax.eval_shape(QwenVisionTower(config).init, jax.random.key(0), pixels_for(EXACT),
                         layout)["params"]
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  specs = {"/".join(str(k.key) for k in path): tuple(spec)
           for path, spec in jax.tree_util.tree_leaves_with_path(nn.get_partition_spec(boxed),
                                                                 is_leaf=is_spec)}
  assert specs["patch_embed/kernel"] == (None, "embed")
  assert specs["blocks/attn/qkv/kernel"] == ("layers", "embed", "heads")
  assert specs["blocks/attn/proj/bias"] == ("layers", "embed")
  assert specs["blocks/mlp/gate_proj/kernel"] == ("layers", "embed", "mlp")
  assert specs["blocks/norm1/scale"] == ("layers", "norm")
  assert specs["merger/ln_q/scale"] == ("norm",)
  assert specs["merger/mlp_2/kernel"] == ("mlp", "embed")


def test_config_reads_both_hf_spellings_and_round_trips():
  published = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                   in_chans=3, out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                   spatial_patch_size=14, window_size=112, hidden_act="silu",
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
                   temporal_patch_size=2)
  config = QwenVisionConfig.from_hf(published)
  assert (config.in_channels, config.rope_theta, config.window_len) == (3, 10000.0, 64)
  assert config.fullatt_block_indexes == (7, 15, 23, 31)
  via_transformers = transformers.Qwen2_5_VLVisionConfig(**config.to_hf()).to_dict()
  assert QwenVisionConfig.from_hf(via_transformers) == config
  legacy = transformers.Qwen2_5_VLVisionConfig(**published).to_dict()  # keeps in_chans
  assert QwenVisionConfig.from_hf(legacy) == config
  bf16 = QwenVisionConfig.from_hf(published, dtype="bfloat16", remat="full")
  assert dataclasses.replace(bf16, dtype="float32", remat="none") == config
  with pytest.raises(ValueError, match="remat"):
    QwenVisionConfig.from_hf(published, remat="some")
