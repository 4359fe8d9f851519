"""The CLIP ViT vision tower of LLaVA-1.5 (ViT-L/14 at 336 px): patch features for the projector.

A class token and learned absolute positions are added to the patch embeddings, then a
LayerNorm (`pre_layrnorm`, the checkpoint's spelling) and pre-norm transformer blocks
(LayerNorm, full bidirectional multi-head attention with biases, LayerNorm, quick-GELU MLP).
LLaVA reads the hidden states after `feature_layer` blocks (-2: the second-to-last block's
output, as transformers' `hidden_states[-2]`) and, with the "default" select strategy, drops
the class token: 576 features of a 336 px image.

Only the blocks the features need are computed. The unused last block(s) and `post_layernorm`
still exist as parameters (created at init) so a loaded checkpoint is written back whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from balcap.models import layers
from balcap.models.hf_io import Rule

SELECT_STRATEGIES = ("default", "full")  # default: drop the class token; full: keep it


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  feature_layer: int = -2          # hidden_states index: 0 = embeddings, -1 = last block
  select_strategy: str = "default"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_features(self) -> int:
    """Features per image: every patch, plus the class token under "full"."""
    return self.grid ** 2 + (self.select_strategy == "full")

  @property
  def blocks_used(self) -> int:
    """How many blocks run: hidden_states[feature_layer] is the output of this many."""
    return self.feature_layer % (self.num_layers + 1)

  def __post_init__(self):
    problems = []
    if self.hidden_size % self.num_heads:
      problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                      f"{self.num_heads}")
    if self.image_size % self.patch_size:
      problems.append(f"image_size {self.image_size} is not a multiple of patch_size "
                      f"{self.patch_size}")
    if not -(self.num_layers + 1) <= self.feature_layer <= self.num_layers:
      problems.append(f"feature_layer {self.feature_layer} is outside the {self.num_layers + 1} "
                      "hidden states (embeddings + one per block)")
    if self.select_strategy not in SELECT_STRATEGIES:
      problems.append(f"select_strategy {self.select_strategy!r} is not one of "
                      f"{list(SELECT_STRATEGIES)}")
    layers.activation(self.hidden_act)  # unknown names raise here, not at the first call
    if self.remat not in layers.REMAT_POLICIES:
      problems.append(f"remat {self.remat!r} is not one of {sorted(layers.REMAT_POLICIES)}")
    if problems:
      raise ValueError("invalid ClipVisionConfig: " + "; ".join(problems))

  @classmethod
  def from_hf(cls, vision: dict[str, Any], feature_layer: int, select_strategy: str
              ) -> ClipVisionConfig:
    """From a transformers `CLIPVisionConfig` dict and LLaVA's feature selection."""
    if not isinstance(feature_layer, int):
      raise ValueError(f"vision_feature_layer {feature_layer!r}: only one feature layer is "
                       "supported (LLaVA-1.5 uses -2)")
    return cls(hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
               num_layers=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
               image_size=vision["image_size"], patch_size=vision["patch_size"],
               num_channels=vision.get("num_channels", 3),
               layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
               hidden_act=vision.get("hidden_act", "quick_gelu"), feature_layer=feature_layer,
               select_strategy=select_strategy)

  def to_hf(self) -> dict[str, Any]:
    return dict(model_type="clip_vision_model", hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, image_size=self.image_size,
                patch_size=self.patch_size, num_channels=self.num_channels,
                layer_norm_eps=self.layer_norm_eps, hidden_act=self.hidden_act,
                projection_dim=768)


class ClipAttention(nn.Module):
  config: ClipVisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    images, length, _ = x.shape

    def proj(name, axes):
      return layers.Dense(c.hidden_size, axes, True, dtype, param_dtype, name=name)

    q, k, v = (proj(n, ("embed", "heads"))(x).reshape(images, length, c.num_heads, c.head_dim)
               for n in ("q_proj", "k_proj", "v_proj"))
    out = layers.attention(q, k, v, None)  # every patch sees every patch
    return proj("out_proj", ("heads", "embed"))(out.reshape(images, length, c.hidden_size))


class ClipBlock(nn.Module):
  config: ClipVisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    norm = lambda name: layers.LayerNorm(c.layer_norm_eps, dtype, param_dtype, name=name)
    x = x + ClipAttention(c, name="self_attn")(norm("layer_norm1")(x))
    hidden = layers.Dense(c.intermediate_size, ("embed", "mlp"), True, dtype, param_dtype,
                          name="fc1")(norm("layer_norm2")(x))
    hidden = layers.activation(c.hidden_act)(hidden)
    return x + layers.Dense(c.hidden_size, ("mlp", "embed"), True, dtype, param_dtype,
                            name="fc2")(hidden)


def patchify(pixel_values: jax.Array, patch_size: int) -> jax.Array:
  """[N, C, H, W] -> [N, (H/p) * (W/p), C * p * p], patches row-major, each flattened (c, y, x)
  as a conv weight [out, C, p, p] is, so the stride-p convolution is one matmul."""
  images, channels, height, width = pixel_values.shape
  gh, gw = height // patch_size, width // patch_size
  x = pixel_values.reshape(images, channels, gh, patch_size, gw, patch_size)
  return x.transpose(0, 2, 4, 1, 3, 5).reshape(images, gh * gw, channels * patch_size ** 2)


class ClipVisionTower(nn.Module):
  """pixel_values [N, C, H, W] (CLIP-normalised) -> features [N, num_features, hidden]."""
  config: ClipVisionConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    if pixel_values.shape[-2:] != (c.image_size, c.image_size):
      raise ValueError(f"CLIP expects {c.image_size}x{c.image_size} images, got pixel_values "
                       f"of shape {pixel_values.shape}")
    patches = layers.Dense(c.hidden_size, (None, "embed"), False, dtype, param_dtype,
                           name="patch_embedding")(patchify(pixel_values, c.patch_size))
    cls = self.param("class_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                     (c.hidden_size,), param_dtype)
    positions = self.param("position_embedding",
                           nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        (None, "embed")),
                           (c.grid ** 2 + 1, c.hidden_size), param_dtype)
    images = patches.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (images, 1, c.hidden_size)),
                         patches.astype(dtype)], axis=1) + positions.astype(dtype)
    x = layers.LayerNorm(c.layer_norm_eps, dtype, param_dtype, name="pre_layrnorm")(x)
    block = layers.maybe_remat(ClipBlock, c.remat)
    blocks = [block(c, name=f"layers_{i}") for i in range(c.num_layers)]
    for b in blocks[:c.blocks_used]:
      x = b(x)
    features = x
    if self.is_initializing():  # create the unused blocks' and the pooler norm's params
      for b in blocks[c.blocks_used:]:
        x = b(x)
      layers.LayerNorm(c.layer_norm_eps, dtype, param_dtype, name="post_layernorm")(x[:, 0])
    return features[:, 1:] if c.select_strategy == "default" else features


def vision_rules(param_prefix: str, hf_prefixes: tuple[str, ...]) -> tuple[Rule, ...]:
  """The tower's checkpoint table, one param per block (CLIP blocks are few and unrolled)."""
  def rule(hf: str, param: str, transform: str = "identity") -> Rule:
    return Rule(tuple(p + hf for p in hf_prefixes), f"{param_prefix}/{param}", transform)

  block = []
  for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
    block += [rule(f"encoder.layers.{{layer}}.self_attn.{name}.weight",
                   f"layers_{{layer}}/self_attn/{name}/kernel", "transpose"),
              rule(f"encoder.layers.{{layer}}.self_attn.{name}.bias",
                   f"layers_{{layer}}/self_attn/{name}/bias")]
  for name in ("fc1", "fc2"):
    block += [rule(f"encoder.layers.{{layer}}.mlp.{name}.weight",
                   f"layers_{{layer}}/{name}/kernel", "transpose"),
              rule(f"encoder.layers.{{layer}}.mlp.{name}.bias", f"layers_{{layer}}/{name}/bias")]
  norms = []
  for hf, param in (("encoder.layers.{layer}.layer_norm1", "layers_{layer}/layer_norm1"),
                    ("encoder.layers.{layer}.layer_norm2", "layers_{layer}/layer_norm2"),
                    ("pre_layrnorm", "pre_layrnorm"), ("post_layernorm", "post_layernorm")):
    norms += [rule(f"{hf}.weight", f"{param}/scale"), rule(f"{hf}.bias", f"{param}/bias")]
  return (rule("embeddings.patch_embedding.weight", "patch_embedding/kernel", "flatten_conv"),
          rule("embeddings.class_embedding", "class_embedding"),
          rule("embeddings.position_embedding.weight", "position_embedding"),
          *block, *norms)
