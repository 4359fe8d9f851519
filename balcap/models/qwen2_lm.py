"""The Qwen2 decoder of Qwen2.5-VL: GQA attention with q/k/v biases, SwiGLU, RMSNorm, M-RoPE.

It is also the LLaMA decoder of LLaVA (`balcap.models.llama_lm`): without the biases
(`attention_bias=False`) and with all three M-RoPE position rows equal, which is plain RoPE.

M-RoPE (multimodal rotary embedding) gives each token three position ids (temporal, height,
width; equal for text tokens) and rotates each frequency band of a head by one of them: the
first `mrope_section[0]` frequencies by the temporal id, the next `mrope_section[1]` by the
height id, the last by the width id. With all three ids equal it is ordinary RoPE.

Layers run under `nn.scan` (params stacked on a leading "layers" axis: one compiled layer
instead of N, the MaxText habit) with an optional `jax.checkpoint` policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from balcap.models import decoding, layers
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
  attention_bias: bool = True   # q/k/v biases: Qwen2 has them, LLaMA does not
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 128_000
  dtype: str = "float32"        # activations and matmuls
  param_dtype: str = "float32"  # stored parameters
  remat: str = "none"           # layers.REMAT_POLICIES
  # Layers under nn.scan (one compiled layer, params stacked on a "layers" axis: compile time
  # and TPU/GPU memory) or unrolled (per-layer params: faster decoding on CPUs, where slicing a
  # stacked array in a loop copies it).
  scan_layers: bool = True

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
  """GQA self-attention (with q/k/v biases when `config.attention_bias`).

  Without a cache it attends within `x` under `mask` and returns (output, (k, v) of `x`)
  (training, prefill). With a decode cache, `x` is one new token per row, `mask` a
  `decoding.DecodeMask`, and it returns (output, the cache with the token written in).
  """
  config: QwenLMConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None):
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

    def proj(heads, axes, bias, name):
      return layers.Dense(heads * c.head_dim, axes, bias, dtype, param_dtype, name=name)

    batch, length, _ = x.shape
    bias = c.attention_bias
    q = proj(c.num_heads, ("embed", "heads"), bias, "q_proj")(x)
    k = proj(c.num_kv_heads, ("embed", "kv_heads"), bias, "k_proj")(x)
    v = proj(c.num_kv_heads, ("embed", "kv_heads"), bias, "v_proj")(x)
    q = layers.apply_rotary(q.reshape(batch, length, c.num_heads, c.head_dim), cos, sin)
    k = layers.apply_rotary(k.reshape(batch, length, c.num_kv_heads, c.head_dim), cos, sin)
    v = v.reshape(batch, length, c.num_kv_heads, c.head_dim)
    if cache is None:
      out, kv = layers.attention(q, k, v, mask), (k, v)
    else:  # the updated cache replaces the layer's (k, v)
      kv = decoding.write_token(cache, k, v, mask.step)
      out = decoding.decode_attention(q, kv, mask)
    out = layers.Dense(c.hidden_size, ("heads", "embed"), False, dtype, param_dtype,
                       name="o_proj")(out.reshape(batch, length, c.num_heads * c.head_dim))
    return out, kv


class DecoderLayer(nn.Module):
  """Pre-norm attention and MLP blocks with residuals; returns (x, (k, v)) (nn.scan's form)."""
  config: QwenLMConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None):
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    norm = lambda name: layers.RMSNorm(c.rms_norm_eps, dtype, param_dtype, name=name)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    attended, kv = Attention(c, name="self_attn")(norm("input_layernorm")(x), cos, sin, mask,
                                                  cache)
    x = x + attended
    mlp = layers.GatedMLP(c.intermediate_size, c.hidden_act, False, dtype=dtype,
                          param_dtype=param_dtype, name="mlp")
    x = x + mlp(norm("post_attention_layernorm")(x))
    return x, kv


class QwenLM(nn.Module):
  """Token embedding, N decoder layers, final norm, output projection (tied or not).

  Three entry points: `__call__` (logits at every position: training, scoring), `prefill`
  (logits at one position per row and the prompt's keys/values) and `decode` (one token per
  row against a `decoding` cache).
  """
  config: QwenLMConfig

  def setup(self):
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")))
    layer = layers.maybe_remat(DecoderLayer, c.remat)
    if c.scan_layers:
      self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                            length=c.num_layers, unroll=layers.scan_unroll(c.num_layers),
                            metadata_params={nn.PARTITION_NAME: "layers"})(c)
    else:
      self.layers = [layer(c, name=f"layers_{i}") for i in range(c.num_layers)]
    self.norm = layers.RMSNorm(c.rms_norm_eps, dtype, param_dtype)
    if not c.tie_word_embeddings:
      # Stored [vocab, embed] like an embedding (and like the checkpoint): a CPU reads a
      # [V, D] matrix row by row ~40% faster than [D, V] when decoding one row at a time.
      self.lm_head = nn.Embed(
          c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                      ("vocab", "embed")))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, T] token ids -> [B, T, hidden] embeddings."""
    return self.embed_tokens(input_ids)

  def _run_layers(self, x, cos, sin, mask, cache):
    """x through every layer; also each layer's (k, v): stacked, or a list when unrolled."""
    if self.config.scan_layers:
      return self.layers(x, cos, sin, mask, cache)
    kvs = []
    for i, layer in enumerate(self.layers):
      x, kv = layer(x, cos, sin, mask, None if cache is None else cache[i])
      kvs.append(kv)
    return x, kvs

  def _logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits whatever the compute dtype (log-probabilities are taken from them)."""
    hidden = self.norm(hidden)
    output = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
    return jnp.einsum("...d,vd->...v", hidden, output.embedding.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, embeddings: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               logits_window: tuple[int, int] | None = None) -> jax.Array:
    """embeddings [B, T, D], positions [3, B, T], attention_mask [B, T] -> logits [B, T, V].

    `logits_window=(start, length)` (static) computes logits only for those positions (the
    vocabulary projection of a whole prompt is wasted when only continuations are scored).
    """
    cos, sin = mrope_angles(self.config, positions)
    hidden, _ = self._run_layers(embeddings, cos, sin, causal_mask(attention_mask), None)
    if logits_window is not None:
      start, length = logits_window
      hidden = hidden[:, start:start + length]
    return self._logits(hidden)

  def prefill(self, embeddings: jax.Array, positions: jax.Array, attention_mask: jax.Array,
              last_index: jax.Array) -> tuple[jax.Array, Any]:
    """Logits [B, V] at position last_index[b] of each row, and every layer's (k, v)."""
    cos, sin = mrope_angles(self.config, positions)
    hidden, kv = self._run_layers(embeddings, cos, sin, causal_mask(attention_mask), None)
    last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
    return self._logits(last), kv

  def decode(self, embeddings: jax.Array, positions: jax.Array, cache: decoding.Cache,
             mask: decoding.DecodeMask) -> tuple[jax.Array, Any]:
    """One new token per row: embeddings [R, 1, D], positions [3, R, 1] -> logits [R, V] and
    the cache with the token's keys and values written at `mask.step`."""
    cos, sin = mrope_angles(self.config, positions)
    hidden, kv = self._run_layers(embeddings, cos, sin, mask, cache)
    return self._logits(hidden[:, 0]), kv


def lm_rules(param_prefix: str = "lm", hf_prefixes: tuple[str, ...] = ("model.",
                                                                          "model.language_model."),
             scan_layers: bool = True, attention_bias: bool = True,
             lm_head_names: tuple[str, ...] = ("lm_head.weight",),
             lm_head_optional: bool = True) -> tuple[Rule, ...]:
  """The decoder's checkpoint table. Published Qwen2.5-VL files name the decoder `model.*`;
  files saved by some transformers 4.x releases say `model.language_model.*`: both are read.
  `lm_head_optional`: tied models have no lm_head parameter, yet some of their checkpoints
  carry the tensor."""
  def rule(hf: str, param: str, transform: str = "identity", optional: bool = False):
    return Rule(tuple(p + hf for p in hf_prefixes), f"{param_prefix}/{param}", transform,
                optional)
  layer = "layers" if scan_layers else "layers_{layer}"  # one stacked param, or one per layer
  attention = [rule(f"layers.{{layer}}.self_attn.{p}.weight", f"{layer}/self_attn/{p}/kernel",
                    "transpose") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
  biases = [rule(f"layers.{{layer}}.self_attn.{p}.bias", f"{layer}/self_attn/{p}/bias")
            for p in ("q_proj", "k_proj", "v_proj")] if attention_bias else []
  mlp = [rule(f"layers.{{layer}}.mlp.{p}.weight", f"{layer}/mlp/{p}/kernel", "transpose")
         for p in ("gate_proj", "up_proj", "down_proj")]
  norms = [rule(f"layers.{{layer}}.{n}.weight", f"{layer}/{n}/scale")
           for n in ("input_layernorm", "post_attention_layernorm")]
  return (rule("embed_tokens.weight", "embed_tokens/embedding"), *attention, *biases, *mlp,
          *norms, rule("norm.weight", "norm/scale"),
          Rule(lm_head_names, f"{param_prefix}/lm_head/embedding", optional=lm_head_optional))
