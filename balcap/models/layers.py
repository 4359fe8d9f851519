"""Layers shared by every model: dense projections, RMSNorm, gated MLPs, attention, rotary helpers.

Conventions of all balcap models:
- a projection's kernel is `[in_features, out_features]` (the transpose of PyTorch's Linear), so
  a checkpoint tensor maps to a parameter by at most a transpose;
- every parameter carries logical axis names (`embed`, `heads`, `mlp`, ...) that
  `balcap.parallel.LOGICAL_AXIS_RULES` turns into shardings;
- `dtype` is the computation dtype, `param_dtype` the storage dtype; norms, softmax and rotary
  angles are always computed in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype
LogicalAxes = tuple[str | None, ...]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() default
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class Dense(nn.Module):
  """y = x @ kernel (+ bias), kernel [in, out] annotated with `logical_axes` = (in, out)."""
  features: int
  logical_axes: LogicalAxes
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.normal(0.02)
  # Accumulate and return in this dtype (e.g. float32 logits from bfloat16 weights).
  output_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.logical_axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype),
                preferred_element_type=self.output_dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.logical_axes[-1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """x / rms(x) * scale, the statistics in float32 (as the reference implementations do)."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * normed.astype(self.dtype)


class LayerNorm(nn.Module):
  """(x - mean) / std * scale + bias, the statistics in float32 (CLIP's pre-norm blocks)."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (width,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (width,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(variance + self.eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class GatedMLP(nn.Module):
  """down(act(gate(x)) * up(x)): SwiGLU with `activation="silu"`."""
  hidden_features: int
  activation: str = "silu"
  use_bias: bool = False
  embed_axis: str = "embed"
  mlp_axis: str = "mlp"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def proj(features, axes, name):
      return Dense(features, axes, self.use_bias, self.dtype, self.param_dtype, name=name)
    up_axes = (self.embed_axis, self.mlp_axis)
    hidden = (activation(self.activation)(proj(self.hidden_features, up_axes, "gate_proj")(x))
              * proj(self.hidden_features, up_axes, "up_proj")(x))
    return proj(x.shape[-1], (self.mlp_axis, self.embed_axis), "down_proj")(hidden)


def rotate_half(x: jax.Array) -> jax.Array:
  """[x1, x2] -> [-x2, x1] over the last dimension (the rotary convention of HF models)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x` [..., T, heads, head_dim] by angles given as cos/sin [..., T, head_dim].

  Computed in float32 and cast back, so bf16 activations keep exact angles.
  """
  x32 = x.astype(jnp.float32)
  cos, sin = cos[..., None, :], sin[..., None, :]
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def rotary_inverse_frequencies(dim: int, theta: float) -> jax.Array:
  """theta ** (-2i / dim) for i < dim / 2, in float32 as the references compute it."""
  return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
              scale: float | None = None) -> jax.Array:
  """Softmax attention with grouped key/value heads.

  query [B, T, H, D], key/value [B, S, K, D] with H a multiple of K (GQA: each key/value head
  serves H / K query heads, without materialising repeated copies); mask broadcastable to
  [B, 1, T, S], True where a query may attend. Logits and softmax in float32; a query row with
  no allowed key gets uniform weights instead of NaN (its output is garbage but finite, and
  such rows are padding). Returns [B, T, H, D] in query's dtype.
  """
  batch, length, heads, head_dim = query.shape
  kv_heads = key.shape[2]
  if heads % kv_heads:
    raise ValueError(f"{heads} query heads do not group over {kv_heads} key/value heads")
  scale = head_dim ** -0.5 if scale is None else scale
  grouped = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", grouped, key,
                      preferred_element_type=jnp.float32) * scale
  if mask is not None:
    mask = jnp.broadcast_to(mask, (batch, 1, length, key.shape[1]))[:, :, None]  # [B,1,1,T,S]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, value)
  return out.reshape(batch, length, heads, head_dim)


REMAT_POLICIES = {
    "none": None,  # keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def maybe_remat(module_class, policy: str):
  """`module_class` wrapped in jax.checkpoint with a named policy (`REMAT_POLICIES`)."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat policy {policy!r} is not one of {sorted(REMAT_POLICIES)}")
  if policy == "none":
    return module_class
  return nn.remat(module_class, policy=REMAT_POLICIES[policy], prevent_cse=False)


# ---------------------------------------------------------------------------------------------
# Scanned layers, unrolled for cost analysis

# XLA's cost analysis counts a loop body once, so a model with scanned layers reports one
# layer's FLOPs. Under `unrolled_scans()` every nn.scan over layers is fully unrolled (same
# params, same results, no loop), which is how `balcap.aot` measures a program's real costs.
_UNROLL_SCANS = contextvars.ContextVar("unroll_scans", default=False)


@contextlib.contextmanager
def unrolled_scans() -> Iterator[None]:
  """Layer scans built (traced) inside this context are fully unrolled."""
  token = _UNROLL_SCANS.set(True)
  try:
    yield
  finally:
    _UNROLL_SCANS.reset(token)


def scan_unroll(length: int) -> int:
  """The `unroll` of a layer scan of `length` steps: 1 (a loop), or all of them."""
  return length if _UNROLL_SCANS.get() else 1
