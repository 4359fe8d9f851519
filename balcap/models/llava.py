"""LLaVA-1.5: CLIP patch features, through a two-layer GELU projector, into the `<image>` tokens.

Device side, `Llava` is one jittable function of arrays with the same entry points as
`QwenVL` (`__call__`, `prefill`, `decode`), so the sampler and learner serve both families.
Host side, `prepare_inputs` adds the position ids (count of real tokens before each one, so
left padding does not shift positions; three equal rows, the decoder's M-RoPE form of RoPE)
and each row's first image feature.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from balcap import parallel
from balcap.models import clip_vision, layers, llama_lm, policy
from balcap.models import image_shards as image_shards_lib
from balcap.models.clip_vision import ClipVisionConfig, ClipVisionTower
from balcap.models.hf_io import Rule
from balcap.models.qwen2_lm import QwenLM, QwenLMConfig
from balcap.models.qwen_vl import continuation_positions, scatter_image_features

MODEL_TYPE = "llava"


@dataclasses.dataclass(frozen=True)
class LlavaConfig(policy.TowersConfig):
  MODEL_TYPE = MODEL_TYPE
  text: QwenLMConfig
  vision: ClipVisionConfig
  image_token_id: int = 32000
  pad_token_id: int = 32001
  eos_token_ids: tuple[int, ...] = (2,)
  projector_act: str = "gelu"
  projector_bias: bool = True

  def __post_init__(self):
    layers.activation(self.projector_act)
    if self.text.attention_bias or any(self.text.mrope_section[1:]):
      raise ValueError("LlavaConfig.text must be a LLaMA decoder (llama_lm.llama_config)")

  @classmethod
  def from_dict(cls, architecture: dict[str, Any]) -> LlavaConfig:
    """The inverse of `architecture()`; unknown or missing fields are named. The text section
    takes `llama_lm.llama_config`'s arguments (or the full decoder fields `architecture()`
    writes)."""
    architecture = {k: v for k, v in architecture.items() if k != "family"}
    text = architecture.pop("text", None)
    if text is None:
      raise KeyError("the architecture has no 'text' section")
    if "mrope_section" in text:
      text = policy.construct_config(QwenLMConfig, text, "text")
    else:
      try:
        text = llama_lm.llama_config(**text)
      except TypeError as e:
        raise KeyError(f"text: {e}") from e
    vision = policy.construct_config(ClipVisionConfig, architecture.pop("vision", None), "vision")
    return policy.construct_config(cls, {**architecture, "text": text, "vision": vision}, "")

  @classmethod
  def from_hf(cls, hf_config) -> LlavaConfig:
    """From a transformers `LlavaConfig`."""
    text = hf_config.text_config
    image_token = getattr(hf_config, "image_token_id", None)
    if image_token is None:
      image_token = hf_config.image_token_index
    eos = text.eos_token_id if text.eos_token_id is not None else 2
    pad = getattr(hf_config, "pad_token_id", None)
    if pad is None:
      pad = getattr(text, "pad_token_id", None)
    return cls(
        text=llama_lm.from_hf(text),
        vision=ClipVisionConfig.from_hf(hf_config.vision_config.to_dict(),
                                        hf_config.vision_feature_layer,
                                        hf_config.vision_feature_select_strategy),
        image_token_id=int(image_token), pad_token_id=int(pad if pad is not None else 0),
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
        projector_act=hf_config.projector_hidden_act,
        projector_bias=bool(getattr(hf_config, "multimodal_projector_bias", True)))

  def to_hf(self):
    """The transformers config object that `save_pretrained` writes as config.json."""
    import transformers  # pylint: disable=import-outside-toplevel
    text = dict(llama_lm.to_hf(self.text), eos_token_id=self.eos_token_ids[0],
                pad_token_id=self.pad_token_id)
    return transformers.LlavaConfig(
        text_config=text, vision_config=self.vision.to_hf(),
        image_token_index=self.image_token_id, projector_hidden_act=self.projector_act,
        vision_feature_layer=self.vision.feature_layer,
        vision_feature_select_strategy=self.vision.select_strategy,
        multimodal_projector_bias=self.projector_bias, image_seq_length=self.vision.grid ** 2,
        pad_token_id=self.pad_token_id, tie_word_embeddings=self.text.tie_word_embeddings,
        dtype=self.text.param_dtype)


class Projector(nn.Module):
  """linear_2(act(linear_1(x))): vision width -> text width (LLaVA-1.5's mlp2x_gelu)."""
  config: LlavaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dtype, param_dtype = jnp.dtype(c.text.dtype), jnp.dtype(c.text.param_dtype)
    width = c.text.hidden_size
    x = layers.Dense(width, (None, "mlp"), c.projector_bias, dtype, param_dtype,
                     name="linear_1")(x)
    x = layers.activation(c.projector_act)(x)
    return layers.Dense(width, ("mlp", "embed"), c.projector_bias, dtype, param_dtype,
                        name="linear_2")(x)


class Llava(nn.Module):
  """The VLM. `__call__` scores whole sequences; `prefill` and `decode` serve the sampler."""
  config: LlavaConfig

  def setup(self):
    self.vision_tower = ClipVisionTower(self.config.vision)
    self.multi_modal_projector = Projector(self.config)
    self.lm = QwenLM(self.config.text)

  def encode_images(self, pixel_values: jax.Array, vision_layout: Any = None) -> jax.Array:
    """pixel_values [S, N, 3, H, W] (S image shards of N images, `prepare_inputs`) ->
    projected features [S, N * num_features, D]; CLIP sees each image alone, so the shards
    are just a batch dimension split over the batch axes."""
    del vision_layout
    shards, images = pixel_values.shape[:2]
    pixels = image_shards_lib.constrain(pixel_values)
    pixels = pixels.reshape((shards * images,) + pixel_values.shape[2:])
    features = self.multi_modal_projector(self.vision_tower(pixels))  # [S * N, F, D]
    return image_shards_lib.constrain(features.reshape(shards, -1, features.shape[-1]))

  def _embed(self, input_ids, pixel_values, image_row_offsets, image_features):
    embeddings = self.lm.embed(input_ids)
    if image_features is None and pixel_values is not None:
      image_features = self.encode_images(pixel_values)
    if image_features is not None:
      embeddings = scatter_image_features(embeddings, input_ids == self.config.image_token_id,
                                          image_features, image_row_offsets)
    return embeddings

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
               pixel_values: jax.Array | None = None, vision_layout: Any = None,
               image_row_offsets: jax.Array | None = None,
               logits_window: tuple[int, int] | None = None,
               image_features: jax.Array | None = None) -> jax.Array:
    """Logits [R, T, V] (float32). pixel_values [S, N, 3, H, W] (CLIP-normalised, in image
    shards) and position_ids [3, R, T] from `prepare_inputs`, or image_features from
    `encode_images`; `vision_layout` is Qwen's and ignored here."""
    del vision_layout
    embeddings = self._embed(input_ids, pixel_values, image_row_offsets, image_features)
    return self.lm(embeddings, position_ids, attention_mask, logits_window)

  def prefill(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
              pixel_values: jax.Array | None = None, vision_layout: Any = None,
              image_row_offsets: jax.Array | None = None,
              last_index: jax.Array | None = None):
    """The prompt once: logits [B, V] after its last token and every layer's (k, v)."""
    del vision_layout
    if last_index is None:
      last_index = jnp.full((input_ids.shape[0],), input_ids.shape[1] - 1)
    embeddings = self._embed(input_ids, pixel_values, image_row_offsets, None)
    return self.lm.prefill(embeddings, position_ids, attention_mask, last_index)

  def decode(self, token_ids: jax.Array, positions: jax.Array, cache, mask):
    """One token per row: token_ids [R] at positions [R] -> logits [R, V], updated cache."""
    embeddings = self.lm.embed(token_ids[:, None])
    positions = jnp.broadcast_to(positions[None, :, None], (3,) + token_ids.shape + (1,))
    return self.lm.decode(embeddings, positions, cache, mask)


# ---------------------------------------------------------------------------------------------
# Host side


def prepare_inputs(config: LlavaConfig, batch: dict[str, Any], *, image_shards: int = 1,
                   across_hosts: bool = False, **unused) -> dict[str, Any]:
  """A processor batch plus `position_ids` [3, B, T] (real tokens count 0, 1, ...; padding
  gets 0), `rope_deltas` (zeros: LLaVA's positions are plain token counts) and, with images,
  the images laid out in `image_shards` shards (`balcap.models.image_shards`):
  `pixel_values` [S, N, 3, H, W] (each shard's images, zero images padding it to the largest
  shard's N; with `across_hosts`, the largest of any host's) and `image_row_offsets` [B]."""
  del unused
  input_ids = np.asarray(batch["input_ids"])
  attention_mask = np.asarray(batch["attention_mask"])
  positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0) * (attention_mask > 0)
  prepared = dict(batch, position_ids=np.broadcast_to(positions[None], (3,) + positions.shape
                                                      ).astype(np.int32),
                  rope_deltas=np.zeros((input_ids.shape[0],), np.int32))
  prepared.pop("image_sizes", None)
  if batch.get("pixel_values") is None:
    return prepared
  pixels = np.asarray(batch["pixel_values"])
  per_image = config.vision.num_features
  is_image = (input_ids == config.image_token_id) & (attention_mask > 0)
  counts = is_image.sum(axis=1)
  if int(counts.sum()) != pixels.shape[0] * per_image:
    raise ValueError(f"the batch has {int(counts.sum())} image tokens but its "
                     f"{pixels.shape[0]} image(s) make {pixels.shape[0] * per_image} "
                     f"features ({per_image} each)")
  shard = image_shards_lib.image_shard_of(counts, np.full(pixels.shape[0], per_image),
                                          image_shards)
  parts = [pixels[shard == s] for s in range(image_shards)]
  largest = max(part.shape[0] for part in parts)
  if across_hosts:
    largest = parallel.host_max(largest)
  prepared["pixel_values"] = image_shards_lib.stack_padded(parts, largest)
  prepared["image_row_offsets"] = image_shards_lib.row_offsets(counts, image_shards)
  return prepared


def prepare_batch(config: LlavaConfig, batch: dict[str, Any], image_shards: int = 1
                  ) -> dict[str, Any]:
  """`prepare_inputs` as training and sampling call it: images in `image_shards` shards of
  one size on every host."""
  return prepare_inputs(config, batch, image_shards=image_shards,
                        across_hosts=jax.process_count() > 1)


def model_rules(config: LlavaConfig) -> tuple[Rule, ...]:
  """The whole checkpoint table. CLIP's weights are read as `vision_tower.vision_model.*`
  (published llava-hf files; written back that way) or `vision_tower.*` (transformers 5's
  saves), each also under `model.`; the projector as `multi_modal_projector.*`."""
  vision = clip_vision.vision_rules("vision_tower", (
      "vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
      "model.vision_tower."))
  projector = []
  for name in ("linear_1", "linear_2"):
    names = (f"multi_modal_projector.{name}", f"model.multi_modal_projector.{name}")
    projector.append(Rule(tuple(n + ".weight" for n in names),
                          f"multi_modal_projector/{name}/kernel", "transpose"))
    if config.projector_bias:
      projector.append(Rule(tuple(n + ".bias" for n in names),
                            f"multi_modal_projector/{name}/bias"))
  return (*vision, *projector, *llama_lm.llama_rules("lm", config.text.scan_layers,
                                                      config.text.tie_word_embeddings))


def example_batch(config: LlavaConfig, batch_size: int = 1,
                  image_size: tuple[int, int] | None = None,
                  text_tokens: int = 1) -> dict[str, np.ndarray]:
  """A processor-style batch of zeros: `batch_size` rows of one image and `text_tokens` text
  tokens (default: the smallest that runs every parameter). `image_size` is ignored: every
  image is resized to the tower's fixed size."""
  del image_size
  v = config.vision
  ids = [1] + [config.image_token_id] * v.num_features + [2] * text_tokens
  return {"input_ids": np.array([ids] * batch_size, np.int32),
          "attention_mask": np.ones((batch_size, len(ids)), np.int32),
          "pixel_values": np.zeros((batch_size, v.num_channels, v.image_size, v.image_size),
                                   np.float32)}


def hf_shapes(config: LlavaConfig) -> dict[str, tuple[int, ...]]:
  """The conv2d shape of the patch embedding, which its flat kernel cannot tell."""
  v = config.vision
  return {"vision_tower/patch_embedding/kernel": (v.hidden_size, v.num_channels, v.patch_size,
                                                  v.patch_size)}


def _processor_from_pretrained(folder: str, model_config=None):
  """The folder's tokenizer and image settings; `config.model.pad_to_square` if given."""
  from balcap.processing.llava import LlavaProcessor  # pylint: disable=import-outside-toplevel
  pad = bool(model_config.get("pad_to_square", False)) if model_config is not None else False
  return LlavaProcessor.from_pretrained(folder, pad_to_square=pad)


def special_token_ids(config: LlavaConfig) -> tuple[int, ...]:
  """Tokens a caption must never contain: `<image>` (it would be read as a placeholder) and
  the padding token."""
  return (config.image_token_id, config.pad_token_id)


def decode_start(config: LlavaConfig, prepared: dict[str, Any]) -> np.ndarray:
  """[B] position of each prompt's first generated token: its real length."""
  del config
  return np.asarray(prepared["attention_mask"]).sum(axis=1).astype(np.int32)


FAMILY = policy.register(policy.Family(
    model_type=MODEL_TYPE, config_class=LlavaConfig, module=Llava, rules=model_rules,
    prepare_inputs=prepare_inputs, example_batch=example_batch, hf_shapes=hf_shapes,
    processor_from_pretrained=_processor_from_pretrained,
    special_token_ids=special_token_ids, compute_dtype=lambda config: config.text.dtype,
    decode_start=decode_start, prepare_batch=prepare_batch,
    continuation_positions=continuation_positions))
