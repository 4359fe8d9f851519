"""The LLaMA / Vicuna decoder of LLaVA-1.5: RMSNorm, SwiGLU, RoPE (theta 10000), no biases.

The computation is the shared decoder of `balcap.models.qwen2_lm` with `attention_bias=False`
and `mrope_section=(head_dim / 2, 0, 0)`: every rotary frequency follows the first position row,
and LLaVA's position rows are equal anyway, so this is exactly LLaMA's 1-D RoPE. Keeping one
decoder means one KV cache, one sampler path and one sharding table for both families. This
module holds what is LLaMA's own: the config translation and the checkpoint table.
"""

from __future__ import annotations

from typing import Any

from balcap.models.hf_io import Rule
from balcap.models.qwen2_lm import QwenLMConfig, lm_rules


def llama_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
                 num_heads: int, num_kv_heads: int | None = None, rope_theta: float = 10_000.0,
                 rms_norm_eps: float = 1e-5, max_position_embeddings: int = 4096,
                 tie_word_embeddings: bool = False, **runtime) -> QwenLMConfig:
  """A LLaMA decoder (multi-head attention unless `num_kv_heads` says otherwise)."""
  head_dim = hidden_size // num_heads
  return QwenLMConfig(
      vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
      num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads or num_heads,
      rope_theta=rope_theta, mrope_section=(head_dim // 2, 0, 0), rms_norm_eps=rms_norm_eps,
      hidden_act="silu", attention_bias=False, tie_word_embeddings=tie_word_embeddings,
      max_position_embeddings=max_position_embeddings, **runtime)


def from_hf(text: Any) -> QwenLMConfig:
  """From a transformers `LlamaConfig`; features LLaVA-1.5's Vicuna does not use are refused
  by name rather than silently computed differently."""
  rope = dict(getattr(text, "rope_parameters", None) or {})
  problems = []
  if rope.get("rope_type", "default") != "default":
    problems.append(f"rope_type {rope['rope_type']!r} (only the default RoPE is ported)")
  if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False):
    problems.append("attention_bias / mlp_bias")
  if text.hidden_act != "silu":
    problems.append(f"hidden_act {text.hidden_act!r}")
  head_dim = getattr(text, "head_dim", None)
  if head_dim and head_dim != text.hidden_size // text.num_attention_heads:
    problems.append(f"head_dim {head_dim} != hidden_size / num_attention_heads")
  if problems:
    raise ValueError("unsupported LLaMA text_config: " + "; ".join(problems))
  return llama_config(
      vocab_size=text.vocab_size, hidden_size=text.hidden_size,
      intermediate_size=text.intermediate_size, num_layers=text.num_hidden_layers,
      num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads,
      rope_theta=float(rope.get("rope_theta", 10_000.0)), rms_norm_eps=text.rms_norm_eps,
      max_position_embeddings=text.max_position_embeddings,
      tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))


def to_hf(config: QwenLMConfig) -> dict[str, Any]:
  """The `text_config` dict of a transformers LlavaConfig."""
  return dict(model_type="llama", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
              intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
              num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
              rms_norm_eps=config.rms_norm_eps,
              max_position_embeddings=config.max_position_embeddings,
              rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
              tie_word_embeddings=config.tie_word_embeddings)


def llama_rules(param_prefix: str, scan_layers: bool, tie_word_embeddings: bool
                ) -> tuple[Rule, ...]:
  """The decoder's table in llava-hf checkpoints: `language_model.model.*` and
  `language_model.lm_head` (published llava-hf files, and what transformers 5 writes), or
  `model.language_model.*` and `lm_head` (transformers 4.5x's own layout)."""
  return lm_rules(param_prefix, ("language_model.model.", "model.language_model."),
                  scan_layers=scan_layers, attention_bias=False,
                  lm_head_names=("language_model.lm_head.weight", "lm_head.weight"),
                  lm_head_optional=tie_word_embeddings)
