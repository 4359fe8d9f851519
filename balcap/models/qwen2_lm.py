"""The Qwen2 decoder of Qwen2.5-VL: GQA attention with q/k/v biases, SwiGLU, RMSNorm, M-RoPE.

M-RoPE (multimodal rotary embedding) gives each token three position ids (temporal, height,
width; equal for text tokens) and rotates each frequency band of a head by one of them: the
first `mrope_section[0]` frequencies by the temporal id, the next `mrope_section[1]` by the
height id, the last by the width id. With all three ids equal it is ordinary RoPE.

Layers run under `nn.scan` (params stacked on a leading "layers" axis: one compiled layer
instead of N, the MaxText habit) with an optional `jax.checkpoint` policy.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from balcap.models import layers
from balcap.models.hf_io import Rule


@dataclasses.dataclass(frozen=True)
class QwenLMConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)  # frequencies per (t, h, w); sum = head_dim/2
  rms_norm_eps: float = 1e-6
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 128_000
  dtype: str = "float32"        # activations and matmuls
  param_dtype: str = "float32"  # stored parameters
  remat: str = "none"           # layers.REMAT_POLICIES

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def __post_init__(self):
    problems = []
    if self.hidden_size % self.num_heads:
      problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                      f"{self.num_heads}")
    elif self.num_heads % self.num_kv_heads:
      problems.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                      f"{self.num_kv_heads}")
    elif 2 * sum(self.mrope_section) != self.head_dim:
      problems.append(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = "
                      f"{self.head_dim // 2}")
    if self.remat not in layers.REMAT_POLICIES:
      problems.append(f"remat {self.remat!r} is not one of {sorted(layers.REMAT_POLICIES)}")
    if problems:
      raise ValueError("invalid QwenLMConfig: " + "; ".join(problems))


def mrope_angles(config: QwenLMConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, head_dim] (float32) for position ids [3, B, T] (temporal, height, width)."""
  inverse = layers.rotary_inverse_frequencies(config.head_dim, config.rope_theta)  # [Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * inverse  # [3, B, T, Dh/2]
  bands, start = [], 0
  for axis, width in enumerate(config.mrope_section):  # band k follows position axis k
    bands.append(angles[axis, ..., start:start + width])
    start += width
  angles = jnp.concatenate(bands, axis=-1)
  angles = jnp.concatenate([angles, angles], axis=-1)  # rotate_half pairs dim i with i + Dh/2
  return jnp.cos(angles), jnp.sin(angles)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
  """[B, 1, T, T] True where query t may attend key s: s <= t and s is not padding."""
  length = attention_mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  return causal[None, None] & attention_mask[:, None, None, :].astype(bool)


class Attention(nn.Module):
  config: QwenLMConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

    def proj(heads, axes, bias, name):
      return layers.Dense(heads * c.head_dim, axes, bias, dtype, param_dtype, name=name)

    batch, length, _ = x.shape
    q = proj(c.num_heads, ("embed", "heads"), True, "q_proj")(x)
    k = proj(c.num_kv_heads, ("embed", "kv_heads"), True, "k_proj")(x)
    v = proj(c.num_kv_heads, ("embed", "kv_heads"), True, "v_proj")(x)
    q = layers.apply_rotary(q.reshape(batch, length, c.num_heads, c.head_dim), cos, sin)
    k = layers.apply_rotary(k.reshape(batch, length, c.num_kv_heads, c.head_dim), cos, sin)
    v = v.reshape(batch, length, c.num_kv_heads, c.head_dim)
    out = layers.attention(q, k, v, mask).reshape(batch, length, c.num_heads * c.head_dim)
    return layers.Dense(c.hidden_size, ("heads", "embed"), False, dtype, param_dtype,
                        name="o_proj")(out)


class DecoderLayer(nn.Module):
  """Pre-norm attention and MLP blocks with residuals; `(x, None)` out for nn.scan."""
  config: QwenLMConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    norm = lambda name: layers.RMSNorm(c.rms_norm_eps, dtype, param_dtype, name=name)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = x + Attention(c, name="self_attn")(norm("input_layernorm")(x), cos, sin, mask)
    mlp = layers.GatedMLP(c.intermediate_size, c.hidden_act, False, dtype=dtype,
                          param_dtype=param_dtype, name="mlp")
    x = x + mlp(norm("post_attention_layernorm")(x))
    return x, None


class QwenLM(nn.Module):
  """Token embedding, N decoder layers, final norm, output projection (tied or not)."""
  config: QwenLMConfig

  def setup(self):
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")))
    layer = layers.maybe_remat(DecoderLayer, c.remat)
    self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                          length=c.num_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})(c)
    self.norm = layers.RMSNorm(c.rms_norm_eps, dtype, param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = layers.Dense(c.vocab_size, ("embed", "vocab"), False, dtype, param_dtype,
                                  output_dtype=jnp.float32)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, T] token ids -> [B, T, hidden] embeddings."""
    return self.embed_tokens(input_ids)

  def __call__(self, embeddings: jax.Array, positions: jax.Array,
               attention_mask: jax.Array) -> jax.Array:
    """embeddings [B, T, D], positions [3, B, T], attention_mask [B, T] -> logits [B, T, V].

    Logits are float32 whatever the compute dtype (log-probabilities are taken from them).
    """
    cos, sin = mrope_angles(self.config, positions)
    hidden, _ = self.layers(embeddings, cos, sin, causal_mask(attention_mask))
    hidden = self.norm(hidden)
    if self.config.tie_word_embeddings:
      kernel = self.embed_tokens.embedding.T.astype(hidden.dtype)  # [D, V]
      return jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
    return self.lm_head(hidden)


def lm_rules(param_prefix: str = "lm", hf_prefixes: tuple[str, ...] = ("model.",
                                                                          "model.language_model.")
             ) -> tuple[Rule, ...]:
  """The decoder's checkpoint table. Published Qwen2.5-VL files name the decoder `model.*`;
  files saved by some transformers 4.x releases say `model.language_model.*`: both are read."""
  def rule(hf: str, param: str, transform: str = "identity", optional: bool = False):
    return Rule(tuple(p + hf for p in hf_prefixes), f"{param_prefix}/{param}", transform,
                optional)
  attention = [rule(f"layers.{{layer}}.self_attn.{p}.weight", f"layers/self_attn/{p}/kernel",
                    "transpose") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
  biases = [rule(f"layers.{{layer}}.self_attn.{p}.bias", f"layers/self_attn/{p}/bias")
            for p in ("q_proj", "k_proj", "v_proj")]
  mlp = [rule(f"layers.{{layer}}.mlp.{p}.weight", f"layers/mlp/{p}/kernel", "transpose")
         for p in ("gate_proj", "up_proj", "down_proj")]
  norms = [rule(f"layers.{{layer}}.{n}.weight", f"layers/{n}/scale")
           for n in ("input_layernorm", "post_attention_layernorm")]
  return (rule("embed_tokens.weight", "embed_tokens/embedding"), *attention, *biases, *mlp,
          *norms, rule("norm.weight", "norm/scale"),
          # Tied models have no lm_head parameter; some of their checkpoints still carry it.
          Rule(("lm_head.weight",), f"{param_prefix}/lm_head/kernel", "transpose",
               optional=True))
