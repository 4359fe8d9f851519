"""Qwen2.5-VL: the vision tower's features scattered into the `<|image_pad|>` tokens of the LM.

Device side, `QwenVL` is one jittable function of arrays. Host side, `prepare_inputs` turns a
processor batch (transformers' field names) into everything the device needs: the 3-D M-RoPE
position ids of text + image tokens (the reference's `get_rope_index`), the `rope_deltas` a
sampler adds to decode positions, and the vision tower's window/image layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from balcap import parallel
from balcap.models import image_shards as image_shards_lib
from balcap.models import policy, qwen_vision
from balcap.models.hf_io import Rule
from balcap.models.qwen2_lm import QwenLM, QwenLMConfig, lm_rules
from balcap.models.qwen_vision import QwenVisionConfig, QwenVisionTower

MODEL_TYPE = "qwen2_5_vl"


@dataclasses.dataclass(frozen=True)
class QwenVLConfig(policy.TowersConfig):
  MODEL_TYPE = MODEL_TYPE
  text: QwenLMConfig
  vision: QwenVisionConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  eos_token_ids: tuple[int, ...] = (151645,)

  @classmethod
  def from_dict(cls, architecture: dict[str, Any]) -> QwenVLConfig:
    """The inverse of `architecture()`; unknown or missing fields are named."""
    architecture = {k: v for k, v in architecture.items() if k != "family"}
    text = policy.construct_config(QwenLMConfig, architecture.pop("text", None), "text")
    vision = policy.construct_config(QwenVisionConfig, architecture.pop("vision", None), "vision")
    top = policy.construct_config(cls, {**architecture, "text": text, "vision": vision}, "")
    return top

  @classmethod
  def from_hf(cls, hf_config) -> QwenVLConfig:
    """From a transformers `Qwen2_5_VLConfig` (any config.json layout, normalised by it)."""
    text = hf_config.text_config
    rope = dict(text.rope_parameters or {})
    eos = text.eos_token_id if text.eos_token_id is not None else 151645
    return cls(
        text=QwenLMConfig(
            vocab_size=text.vocab_size, hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size, num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads,
            rope_theta=float(rope.get("rope_theta", 1_000_000.0)),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            rms_norm_eps=text.rms_norm_eps, hidden_act=text.hidden_act,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            max_position_embeddings=text.max_position_embeddings),
        vision=QwenVisionConfig.from_hf(hf_config.vision_config.to_dict()),
        image_token_id=hf_config.image_token_id, video_token_id=hf_config.video_token_id,
        vision_start_token_id=hf_config.vision_start_token_id,
        vision_end_token_id=hf_config.vision_end_token_id,
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))

  def to_hf(self):
    """The transformers config object that `save_pretrained` writes as config.json."""
    import transformers  # pylint: disable=import-outside-toplevel
    t = self.text
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
            rms_norm_eps=t.rms_norm_eps, hidden_act=t.hidden_act,
            max_position_embeddings=t.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                             "mrope_section": list(t.mrope_section)},
            eos_token_id=self.eos_token_ids[0], tie_word_embeddings=t.tie_word_embeddings),
        vision_config=self.vision.to_hf(),
        image_token_id=self.image_token_id, video_token_id=self.video_token_id,
        vision_start_token_id=self.vision_start_token_id,
        vision_end_token_id=self.vision_end_token_id,
        tie_word_embeddings=t.tie_word_embeddings, dtype=t.param_dtype)


def scatter_image_features(embeddings: jax.Array, is_image: jax.Array, features: jax.Array,
                           row_offsets: jax.Array | None = None) -> jax.Array:
  """Each row's k-th image token takes its shard's features[row_offsets[row] + k].

  embeddings [R, T, D], is_image [R, T], features [S, N, D]: S image shards
  (`balcap.models.image_shards`), rows split into S contiguous blocks, block s reading shard s
  only (so under a mesh every gather is local to a device). Extra feature rows are padding and
  are never taken. row_offsets [R] defaults to each row's first feature when the rows of a
  block hold their own images in order; rows that repeat a prompt (G rollouts) point at that
  prompt's features instead, so images are encoded once per prompt.
  """
  rows, length, width = embeddings.shape
  shards = features.shape[0]
  counts = is_image.sum(axis=1)
  if row_offsets is None:
    blocks = counts.reshape(shards, -1)
    row_offsets = (jnp.cumsum(blocks, axis=1) - blocks).reshape(-1)
  rank = jnp.cumsum(is_image, axis=1) - 1  # k for the k-th image token of a row
  index = jnp.clip(row_offsets[:, None] + rank, 0, features.shape[1] - 1)
  index = index.reshape(shards, rows // shards * length)
  taken = jax.vmap(lambda table, i: table[i])(features, index)  # a gather batched over shards
  taken = taken.astype(embeddings.dtype).reshape(rows, length, width)
  return jnp.where(is_image[..., None], taken, embeddings)


class QwenVL(nn.Module):
  """The VLM. `__call__` scores whole sequences; `prefill` and `decode` serve the sampler;
  `encode_images` runs the vision tower alone (the learner encodes once per update)."""
  config: QwenVLConfig

  def setup(self):
    self.visual = QwenVisionTower(self.config.vision)
    self.lm = QwenLM(self.config.text)

  def encode_images(self, pixel_values: jax.Array, vision_layout: dict[str, jax.Array]
                    ) -> jax.Array:
    """pixel_values [S, P, patch_features] and layouts [S, ...] (`prepare_inputs`) -> merged
    features [S, P / merge_unit, D]: the tower over each shard, data-parallel over S."""
    encode = nn.vmap(lambda tower, pixels, layout: tower(pixels, layout),
                     variable_axes={"params": None}, split_rngs={"params": False},
                     in_axes=(0, 0))
    features = encode(self.visual, image_shards_lib.constrain(pixel_values),
                      jax.tree.map(image_shards_lib.constrain, vision_layout))
    return image_shards_lib.constrain(features)

  def _embed(self, input_ids, pixel_values, vision_layout, image_row_offsets, image_features):
    embeddings = self.lm.embed(input_ids)
    if image_features is None and pixel_values is not None:
      image_features = self.encode_images(pixel_values, vision_layout)
    if image_features is not None:
      embeddings = scatter_image_features(embeddings, input_ids == self.config.image_token_id,
                                          image_features, image_row_offsets)
    return embeddings

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
               pixel_values: jax.Array | None = None,
               vision_layout: dict[str, jax.Array] | None = None,
               image_row_offsets: jax.Array | None = None,
               logits_window: tuple[int, int] | None = None,
               image_features: jax.Array | None = None) -> jax.Array:
    """Logits [R, T, V] (float32) for token ids [R, T] with images' patches already processed.

    position_ids [3, R, T], pixel_values and vision_layout come from `prepare_inputs`;
    image_row_offsets (see `scatter_image_features`) lets R = B x G rows share B prompts'
    images; image_features (`encode_images`' output) replace pixel_values and vision_layout;
    logits_window=(start, length) (static) keeps only those positions' logits.
    """
    embeddings = self._embed(input_ids, pixel_values, vision_layout, image_row_offsets,
                             image_features)
    return self.lm(embeddings, position_ids, attention_mask, logits_window)

  def prefill(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
              pixel_values: jax.Array | None = None,
              vision_layout: dict[str, jax.Array] | None = None,
              image_row_offsets: jax.Array | None = None,
              last_index: jax.Array | None = None):
    """The prompt once: logits [B, V] after its last token and every layer's (k, v)."""
    if last_index is None:
      last_index = jnp.full((input_ids.shape[0],), input_ids.shape[1] - 1)
    embeddings = self._embed(input_ids, pixel_values, vision_layout, image_row_offsets, None)
    return self.lm.prefill(embeddings, position_ids, attention_mask, last_index)

  def decode(self, token_ids: jax.Array, positions: jax.Array, cache, mask):
    """One token per row: token_ids [R] at positions [R] (text positions are equal on the
    three M-RoPE axes) -> logits [R, V] and the updated cache."""
    embeddings = self.lm.embed(token_ids[:, None])
    positions = jnp.broadcast_to(positions[None, :, None], (3,) + token_ids.shape + (1,))
    return self.lm.decode(embeddings, positions, cache, mask)


# ---------------------------------------------------------------------------------------------
# Host side: position ids and layouts


def rope_index(input_ids: np.ndarray, attention_mask: np.ndarray,
               image_grid_thw: np.ndarray | None, image_token_id: int,
               spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE position ids [3, B, T] and rope_deltas [B], as transformers' `get_rope_index`.

  Text tokens count up by one on all three axes. An image's tokens get (t, h, w) = start +
  their grid coordinates (in merged patches), and the text after it starts at
  start + max(h, w). Padding gets position 0. rope_delta = max position + 1 - real length, so
  a decode step at real length L is at position L + rope_delta on every axis.
  """
  batch, length = input_ids.shape
  positions = np.zeros((3, batch, length), np.int32)
  deltas = np.zeros((batch,), np.int32)
  grids = iter(np.asarray(image_grid_thw).tolist() if image_grid_thw is not None else [])
  for row in range(batch):
    real = np.flatnonzero(attention_mask[row])
    ids = input_ids[row, real]
    row_positions = np.zeros((3, len(ids)), np.int64)
    current, i = 0, 0
    while i < len(ids):
      if ids[i] != image_token_id:
        end = i
        while end < len(ids) and ids[end] != image_token_id:
          end += 1
        row_positions[:, i:end] = current + np.arange(end - i)
        current += end - i
        i = end
        continue
      grid = next(grids, None)
      if grid is None:
        raise ValueError(f"row {row} has more image tokens than image_grid_thw has images")
      t, h, w = (int(grid[0]), int(grid[1]) // spatial_merge_size,
                 int(grid[2]) // spatial_merge_size)
      count = t * h * w
      if not np.all(ids[i:i + count] == image_token_id):
        raise ValueError(f"row {row}: an image of grid {tuple(grid)} needs {count} image tokens "
                         f"at position {real[i]}, found fewer")
      tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
      row_positions[:, i:i + count] = current + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
      current += max(h, w)
      i += count
    positions[:, row, real] = row_positions
    deltas[row] = (row_positions.max() + 1 if len(ids) else 0) - len(ids)
  if next(grids, None) is not None:
    raise ValueError("image_grid_thw has more images than the token ids have image tokens")
  return positions, deltas


def prepare_inputs(config: QwenVLConfig, batch: dict[str, Any], *, image_shards: int = 1,
                   across_hosts: bool = False, bucketed: bool = False, **layout_sizes
                   ) -> dict[str, Any]:
  """A processor batch plus `position_ids`, `rope_deltas` and, with images, the image inputs
  laid out in `image_shards` shards (`balcap.models.image_shards`): `pixel_values`
  [S, P, patch_features] (each shard's patches, padded to P), `vision_layout` (each field with
  a leading S) and `image_row_offsets` [B] (each row's first feature in its shard).

  `layout_sizes` pads every shard's layout to static sizes (see `qwen_vision.vision_layout`),
  so one compiled program serves every image grid that fits; by default the largest shard's.
  `bucketed`: sizes from `layout_buckets` over the largest shard instead. `across_hosts`:
  the sizes are the largest over every host's shards (each host lays out its own images;
  the shards of all hosts join in one global array).
  """
  input_ids = np.asarray(batch["input_ids"])
  attention_mask = np.asarray(batch["attention_mask"])
  grid = batch.get("image_grid_thw")
  positions, deltas = rope_index(input_ids, attention_mask, grid, config.image_token_id,
                                 config.vision.spatial_merge_size)
  prepared = dict(batch, position_ids=positions, rope_deltas=deltas)
  if batch.get("pixel_values") is None:
    return prepared
  grid = np.asarray(grid, np.int64).reshape(-1, 3)
  is_image = (input_ids == config.image_token_id) & (attention_mask > 0)
  counts = is_image.sum(axis=1)
  merge = config.vision.merge_unit
  image_patches = grid.prod(axis=1)
  if int(counts.sum()) != int(image_patches.sum()) // merge:
    raise ValueError(f"the batch has {int(counts.sum())} image tokens but its images make "
                     f"{int(image_patches.sum()) // merge} features (image_grid_thw "
                     f"{grid.tolist()})")
  pixels = np.asarray(batch["pixel_values"])
  shard = image_shards_lib.image_shard_of(counts, image_patches // merge, image_shards)
  first_patch = np.cumsum(image_patches) - image_patches
  parts, grids = [], []
  for s in range(image_shards):
    images = np.flatnonzero(shard == s)
    parts.append(np.concatenate([pixels[first_patch[i]:first_patch[i] + image_patches[i]]
                                 for i in images]) if images.size
                 else np.zeros((0, pixels.shape[1]), pixels.dtype))
    grids.append(grid[images])
  need = [qwen_vision.required_sizes(g, config.vision) for g in grids]
  largest = {k: max(n[k] for n in need) for k in need[0]}
  if bucketed:
    sizes = layout_buckets(config, largest)
  else:
    sizes = {k: int(layout_sizes.get(k) or v) for k, v in largest.items()}
  if across_hosts:
    sizes = parallel.host_max_each(sizes)
  sizes["num_patches"] = qwen_vision.round_up(max(sizes["num_patches"], merge), merge)
  layouts = [qwen_vision.vision_layout(g, config.vision, **sizes) for g in grids]
  prepared["vision_layout"] = {k: np.stack([layout[k] for layout in layouts])
                               for k in layouts[0]}
  prepared["pixel_values"] = image_shards_lib.stack_padded(parts, sizes["num_patches"])
  prepared["image_row_offsets"] = image_shards_lib.row_offsets(counts, image_shards)
  return prepared


def prepare_batch(config: QwenVLConfig, batch: dict[str, Any], image_shards: int = 1
                  ) -> dict[str, Any]:
  """`prepare_inputs` as training and sampling call it: images in `image_shards` shards,
  layout sizes bucketed over the largest shard of ANY host (every host compiles the same
  program)."""
  return prepare_inputs(config, batch, image_shards=image_shards,
                        across_hosts=jax.process_count() > 1, bucketed=True)


def model_rules(config: QwenVLConfig) -> tuple[Rule, ...]:
  """The whole checkpoint table: vision tower + decoder (published and transformers-5 names)."""
  # One table serves every size; tied embeddings are handled by `optional`.
  vision = qwen_vision.vision_rules("visual", "visual.")
  older = qwen_vision.vision_rules("visual", "model.visual.")  # some transformers 4.x saves
  vision = tuple(dataclasses.replace(r, names=r.names + o.names) for r, o in zip(vision, older))
  return vision + lm_rules("lm", scan_layers=config.text.scan_layers)


def example_batch(config: QwenVLConfig, batch_size: int = 1,
                  image_size: tuple[int, int] | None = None,
                  text_tokens: int = 1) -> dict[str, np.ndarray]:
  """A processor-style batch of zeros: by default the smallest that runs every parameter (one
  image of 2x2 merged patches + one text token); with sizes, `batch_size` rows each with an
  image of `image_size` (height, width; multiples of patch x merge) and `text_tokens` text
  tokens, the shapes a real batch of that kind has (ahead-of-time compilation)."""
  v = config.vision
  if image_size is None:
    grid_h = grid_w = 2 * v.spatial_merge_size
  else:
    unit = v.patch_size * v.spatial_merge_size
    if image_size[0] % unit or image_size[1] % unit:
      raise ValueError(f"image_size {image_size} must be multiples of {unit} px")
    grid_h, grid_w = image_size[0] // v.patch_size, image_size[1] // v.patch_size
  features = grid_h * grid_w // v.spatial_merge_size ** 2
  ids = [config.vision_start_token_id] + [config.image_token_id] * features + [
      config.vision_end_token_id] + [0] * text_tokens
  return {"input_ids": np.array([ids] * batch_size, np.int32),
          "attention_mask": np.ones((batch_size, len(ids)), np.int32),
          "pixel_values": np.zeros((batch_size * grid_h * grid_w, v.in_channels
                                    * v.temporal_patch_size * v.patch_size ** 2), np.float32),
          "image_grid_thw": np.array([[1, grid_h, grid_w]] * batch_size, np.int64)}


def hf_shapes(config: QwenVLConfig) -> dict[str, tuple[int, ...]]:
  """The conv3d shape of the patch embedding, which its flat kernel cannot tell."""
  v = config.vision
  return {"visual/patch_embed/kernel": (v.hidden_size, v.in_channels, v.temporal_patch_size,
                                        v.patch_size, v.patch_size)}


def _processor_from_pretrained(folder: str, model_config=None):
  """The folder's tokenizer and image settings; `config.model`'s pixel bounds win if given."""
  from balcap.processing.qwen import QwenProcessor  # pylint: disable=import-outside-toplevel
  processor = QwenProcessor.from_pretrained(folder)
  if model_config is not None:
    processor.image_config = dataclasses.replace(processor.image_config,
                                                 min_pixels=model_config.min_pixels,
                                                 max_pixels=model_config.max_pixels)
  return processor


def special_token_ids(config: QwenVLConfig) -> tuple[int, ...]:
  """Tokens a caption must never contain: they would be read as image placeholders."""
  return (config.image_token_id, config.video_token_id, config.vision_start_token_id,
          config.vision_end_token_id)


def decode_start(config: QwenVLConfig, prepared: dict[str, Any]) -> np.ndarray:
  """[B] position of each prompt's first generated token: real length + rope delta."""
  del config
  return (np.asarray(prepared["attention_mask"]).sum(axis=1)
          + np.asarray(prepared["rope_deltas"])).astype(np.int32)


def layout_buckets(config: QwenVLConfig, sizes: dict[str, int]) -> dict[str, int]:
  """Layout sizes (`qwen_vision.required_sizes`) rounded up to powers of two: a bounded
  number of programs."""
  power = lambda n: 1 << max(int(n) - 1, 0).bit_length()
  buckets = {k: power(v) for k, v in sizes.items()}
  buckets["num_patches"] = qwen_vision.round_up(buckets["num_patches"],
                                                config.vision.merge_unit)
  return buckets


def continuation_positions(config: QwenVLConfig, prepared: dict[str, Any], start: np.ndarray,
                           num_samples: int, length: int) -> np.ndarray:
  """[3, B * G, T + n]: each prompt's M-RoPE positions, repeated G times, then n generated
  tokens counting up from `start` equally on the three axes."""
  del config
  prompt = np.repeat(np.asarray(prepared["position_ids"]), num_samples, axis=1)
  generated = np.repeat(start, num_samples)[:, None] + np.arange(length)[None]
  generated = np.broadcast_to(generated[None], (3,) + generated.shape)
  return np.concatenate([prompt, generated], axis=-1).astype(np.int32)


FAMILY = policy.register(policy.Family(
    model_type=MODEL_TYPE, config_class=QwenVLConfig, module=QwenVL, rules=model_rules,
    prepare_inputs=prepare_inputs, example_batch=example_batch, hf_shapes=hf_shapes,
    processor_from_pretrained=_processor_from_pretrained,
    special_token_ids=special_token_ids, compute_dtype=lambda config: config.text.dtype,
    decode_start=decode_start, prepare_batch=prepare_batch,
    continuation_positions=continuation_positions))
