"""The policy-update loss of GRPO-family methods: clipped surrogate, KL to a reference policy,
aggregation over tokens, entropy. Pure JAX, jittable, float32 math.

Per-token inputs are `[R, T]` (R rollouts, T response positions) with a `mask` `[R, T]` that is
1 on real response tokens and 0 on padding and after the end; advantages are per rollout `[R]`
and broadcast over its tokens. Masked positions never contribute to a loss, a gradient or a
statistic, whatever they hold (NaN and inf included): they are replaced with `where`, never
multiplied by 0 (0 * NaN is NaN, in the forward pass and in the gradient).

Sign convention: every loss here is MINIMISED. Advantage > 0 means "more of this": the policy
term is -min(s A, clip(s, 1 - eps_low, 1 + eps_high) A) with s = pi_theta / pi_old, and the
KL penalty is ADDED, `loss = policy + kl_coef * kl`. Gradients flow through `logprobs` only:
old and reference log-probabilities and advantages are constants (stop_gradient).

Statistics over "the batch" are over the GLOBAL batch: under `jit` with the batch sharded, XLA
reduces over every device; inside `shard_map`, pass the mesh axes as `axis_name` and the sums
are `psum`-ed (min/max `pmin`/`pmax`-ed), as in `balcap.rl.advantages`.

References: PPO (Schulman et al. 2017), asymmetric clip-higher (DAPO, Yu et al. 2025), dual clip
(Ye et al. 2020, as in verl), KL estimators k1/k2/k3 (Schulman, "Approximating KL divergence",
2020), Dr. GRPO's constant-length normalisation (Liu et al. 2025).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from balcap import configs

AxisName = str | tuple[str, ...] | None

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# log(pi / pi_old) and log(ref / pi) are clamped to +-LOG_RATIO_LIMIT before exp (as verl
# does): a ratio of e^20 is already meaningless, and exp of a larger one overflows float32 to inf.
LOG_RATIO_LIMIT = 20.0


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Everything `rl_loss` needs; `from_config(section)` builds it."""
  eps_low: float = 0.2     # ratio clipped below at 1 - eps_low (binds when A < 0)
  eps_high: float = 0.2    # ratio clipped above at 1 + eps_high (binds when A > 0; DAPO: 0.28)
  dual_clip: float = 0.0   # c > 1: the loss of an A < 0 token is capped at -c A (0 = off)
  kl_coef: float = 0.0     # beta of `+ beta * KL(pi || ref)` (0 = off; no reference needed)
  kl_estimator: str = "k3"  # one of KL_ESTIMATORS
  aggregation: str = "token-mean"  # one of AGGREGATIONS
  # seq-mean-token-sum-norm divides each sequence's sum by this constant (Dr. GRPO uses the
  # maximum generation length); 0 = the padded length T of the batch.
  norm_length: int = 0

  def __post_init__(self):
    problems = []
    if not 0 <= self.eps_low < 1:
      problems.append(f"eps_low={self.eps_low} must be in [0, 1) (the lower clip is 1 - eps_low)")
    if self.eps_high < 0:
      problems.append(f"eps_high={self.eps_high} must be >= 0")
    if self.dual_clip != 0 and not self.dual_clip > 1:
      problems.append(f"dual_clip={self.dual_clip} must be 0 (off) or > 1")
    if self.kl_coef < 0:
      problems.append(f"kl_coef={self.kl_coef} must be >= 0")
    if self.kl_estimator not in KL_ESTIMATORS:
      problems.append(f"kl_estimator={self.kl_estimator!r} is not one of {list(KL_ESTIMATORS)}")
    if self.aggregation not in AGGREGATIONS:
      problems.append(f"aggregation={self.aggregation!r} is not one of {list(AGGREGATIONS)}")
    if self.norm_length < 0:
      problems.append(f"norm_length={self.norm_length} must be >= 0 (0 = the padded length)")
    if problems:
      raise ValueError("invalid loss config: " + "; ".join(problems))


def from_config(section: Mapping[str, Any]) -> LossConfig:
  """LossConfig from a config section (a ConfigDict or dict); unknown keys are an error."""
  return LossConfig(**configs.known_options(LossConfig, section, "loss"))


# ---------------------------------------------------------------------------------------------
# Masked reductions (global over `axis_name`)


def _sum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  total = jnp.sum(x)
  return jax.lax.psum(total, axis_name) if axis_name is not None else total


def _masked_mean(x: jax.Array, mask: jax.Array, axis_name: AxisName) -> jax.Array:
  count = _sum(mask.astype(jnp.float32), axis_name)
  return _sum(jnp.where(mask, x, 0.0), axis_name) / jnp.maximum(count, 1.0)


def _masked_extreme(x: jax.Array, mask: jax.Array, axis_name: AxisName, *, largest: bool
                    ) -> jax.Array:
  fill = -jnp.inf if largest else jnp.inf
  value = (jnp.max if largest else jnp.min)(jnp.where(mask, x, fill))
  if axis_name is not None:
    value = (jax.lax.pmax if largest else jax.lax.pmin)(value, axis_name)
  return jnp.where(jnp.isfinite(value), value, 1.0)  # no tokens at all: report a neutral 1


def _as_mask(mask: jax.Array) -> jax.Array:
  return jnp.asarray(mask) > 0


# ---------------------------------------------------------------------------------------------
# Per-token terms


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                mask: jax.Array, *, eps_low: float = 0.2, eps_high: float = 0.2,
                dual_clip: float | None = None, axis_name: AxisName = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped-surrogate loss per token [R, T] (0 on masked tokens) and scalar statistics.

  loss = -min(s A, clip(s, 1 - eps_low, 1 + eps_high) A), s = exp(logp - old_logp); with
  `dual_clip` = c > 1, a token with A < 0 has its loss capped at -c A (verl's dual clip: a huge
  ratio on a bad token cannot produce an unbounded loss; the gradient there is 0).

  Statistics, as means over the masked tokens (global over `axis_name`):
    clip_fraction       the clipped term was taken (clip active AND binding): the sum of
    clip_fraction_high    A > 0 and s > 1 + eps_high
    clip_fraction_low     A < 0 and s < 1 - eps_low
    dual_clip_fraction  A < 0 and the -c A cap was taken (0 when off)
    kl_old_k1, kl_old_k3  KL(pi_old || pi) estimated by mean(old_logp - logp) and by k3
    ratio_mean, ratio_min, ratio_max   of s over the masked tokens
  """
  if dual_clip is not None and dual_clip != 0 and not dual_clip > 1:
    raise ValueError(f"dual_clip={dual_clip} must be None/0 (off) or > 1")
  mask = _as_mask(mask)
  logprobs = jnp.where(mask, logprobs.astype(jnp.float32), 0.0)                   # [R, T]
  old = jnp.where(mask, jax.lax.stop_gradient(old_logprobs).astype(jnp.float32), 0.0)
  adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))[:, None]      # [R, 1]
  adv = jnp.where(mask, adv, 0.0)                                                  # [R, T]

  log_ratio = jnp.clip(logprobs - old, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
  ratio = jnp.exp(log_ratio)
  unclipped = -ratio * adv
  clipped = -jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
  loss = jnp.maximum(unclipped, clipped)  # = -min(s A, clip(s) A)
  clip_taken = clipped > unclipped
  dual_taken = jnp.zeros_like(mask)
  if dual_clip:
    cap = -dual_clip * adv
    dual_taken = (adv < 0) & (loss > cap)
    loss = jnp.where(adv < 0, jnp.minimum(loss, cap), loss)
  loss = jnp.where(mask, loss, 0.0)

  # Statistics are logged, not differentiated (pmin/pmax have no derivative rule).
  log_ratio, ratio = jax.lax.stop_gradient((log_ratio, ratio))
  mean = lambda x: _masked_mean(x.astype(jnp.float32), mask, axis_name)  # noqa: E731
  stats = {
      "clip_fraction": mean(clip_taken),
      "clip_fraction_high": mean(clip_taken & (adv > 0)),
      "clip_fraction_low": mean(clip_taken & (adv < 0)),
      "dual_clip_fraction": mean(dual_taken),
      # The tokens were sampled from pi_old: log(pi_old / pi) = -log_ratio per sample.
      "kl_old_k1": mean(-log_ratio),
      "kl_old_k3": mean(_k3(-log_ratio)),
      "ratio_mean": mean(ratio),
      "ratio_min": _masked_extreme(ratio, mask, axis_name, largest=False),
      "ratio_max": _masked_extreme(ratio, mask, axis_name, largest=True),
  }
  return loss, stats


def _k3(log_ratio: jax.Array) -> jax.Array:
  """Schulman's k3 of KL(p || q) per sample x ~ p from l = log p(x) - log q(x):
  r - 1 - log r with r = q(x) / p(x) = exp(-l). Unbiased and >= 0."""
  return jnp.exp(-log_ratio) + log_ratio - 1.0


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, kind: str = "k3") -> jax.Array:
  """Per-token estimate of KL(pi || ref) from tokens sampled from pi [R, T] (Schulman's):

  k1 = logp - ref                            unbiased, can be negative
  k2 = 0.5 (logp - ref)^2                    biased, >= 0, low variance
  k3 = exp(ref - logp) - (ref - logp) - 1    unbiased, >= 0, low variance (GRPO's choice)

  The reference is a constant (stop_gradient); masking is the aggregation's job.
  """
  log_ratio = (logprobs.astype(jnp.float32)
               - jax.lax.stop_gradient(ref_logprobs).astype(jnp.float32))
  if kind == "k1":
    return log_ratio
  if kind == "k2":
    return 0.5 * jnp.square(log_ratio)
  if kind == "k3":
    return _k3(jnp.clip(log_ratio, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
  raise ValueError(f"kl estimator {kind!r} is not one of {list(KL_ESTIMATORS)}")


def entropy(logits: jax.Array, mask: jax.Array, *, axis_name: AxisName = None
            ) -> tuple[jax.Array, jax.Array]:
  """Per-token entropy [R, T] of softmax(logits [R, T, V]) in float32 (0 on masked tokens),
  and its mean over the masked tokens. Tokens forbidden with -inf logits count 0 (not NaN)."""
  mask = _as_mask(mask)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)        # [R, T, V]
  p = jnp.exp(logp)
  # Double where: p * logp is 0 * -inf = NaN for a -inf logit, in the value and the gradient.
  safe_logp = jnp.where(p > 0, logp, 0.0)
  per_token = -jnp.sum(p * safe_logp, axis=-1)                          # [R, T]
  per_token = jnp.where(mask, per_token, 0.0)
  return per_token, _masked_mean(per_token, mask, axis_name)


# ---------------------------------------------------------------------------------------------
# Aggregation [R, T] -> scalar


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str = "token-mean", *,
              global_tokens: jax.Array | float | None = None,
              global_sequences: jax.Array | float | None = None,
              norm_length: int | None = None, axis_name: AxisName = None) -> jax.Array:
  """One scalar from per-token values [R, T]; masked tokens never count.

  token-mean               sum of every masked token / number of masked tokens
  seq-mean-token-mean      per sequence: mean over its tokens; then mean over the sequences
                           with at least one token
  seq-mean-token-sum-norm  per sequence: sum over its tokens / `norm_length` (default T, a
                           constant: Dr. GRPO); then mean over the sequences with at least one
                           token (padding rows of the batch have none)

  Over the GLOBAL batch: with `axis_name` (inside shard_map) numerator and count are psum-ed,
  so every device returns the same global value (under shard_map's default check_vma, the
  gradient w.r.t. replicated params is then the global gradient). With `global_tokens`
  (token-mean) or `global_sequences` (seq modes), the count is that number instead: for
  micro-batches, each call returns its share and the shares add up to the batch's value.
  """
  mask = _as_mask(mask)
  values = jnp.where(mask, per_token.astype(jnp.float32), 0.0)          # [R, T]
  if mode == "token-mean":
    count = (_sum(mask.astype(jnp.float32), axis_name) if global_tokens is None
             else jnp.asarray(global_tokens, jnp.float32))
    return _sum(values, axis_name) / jnp.maximum(count, 1.0)
  if mode not in AGGREGATIONS:
    raise ValueError(f"aggregation {mode!r} is not one of {list(AGGREGATIONS)}")
  tokens = mask.sum(axis=-1).astype(jnp.float32)                         # [R]
  if mode == "seq-mean-token-mean":
    per_seq = values.sum(axis=-1) / jnp.maximum(tokens, 1.0)
  else:
    per_seq = values.sum(axis=-1) / float(norm_length or per_token.shape[-1])
  has_tokens = tokens > 0
  count = (_sum(has_tokens.astype(jnp.float32), axis_name) if global_sequences is None
           else jnp.asarray(global_sequences, jnp.float32))
  return _sum(jnp.where(has_tokens, per_seq, 0.0), axis_name) / jnp.maximum(count, 1.0)


# ---------------------------------------------------------------------------------------------
# Statistics of micro-batches -> statistics of the batch

# How `rl_loss`'s statistics of n micro-batches make the batch's: the loss terms are shares of
# one global aggregate (`global_tokens` / `global_sequences`), so they add up; counts add up;
# extremes take the extreme; every other statistic is a mean over the micro-batch's tokens,
# so the batch's is their token-weighted mean.
_SUMMED = ("loss", "loss/policy", "policy/tokens")
_EXTREMES = {"policy/ratio_min": jnp.min, "policy/ratio_max": jnp.max}


def combine_micro_batch_stats(stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The batch's statistics from `rl_loss`'s statistics of n micro-batches, stacked [n]: what
  one call on the whole batch would have reported (up to float reassociation)."""
  tokens = stats["policy/tokens"]
  has_tokens = tokens > 0
  out = {}
  for key, values in stats.items():
    if key in _SUMMED:
      out[key] = jnp.sum(values)
    elif key in _EXTREMES:
      reduce = _EXTREMES[key]
      fill = jnp.inf if reduce is jnp.min else -jnp.inf
      value = reduce(jnp.where(has_tokens, values, fill))
      out[key] = jnp.where(jnp.isfinite(value), value, 1.0)  # no tokens at all: neutral 1
    else:
      out[key] = jnp.sum(values * tokens) / jnp.maximum(jnp.sum(tokens), 1.0)
  return out


# ---------------------------------------------------------------------------------------------
# The loss


def rl_loss(logprobs: jax.Array, old_logprobs: jax.Array | None,
            ref_logprobs: jax.Array | None, advantages: jax.Array, mask: jax.Array,
            config: LossConfig, *, logits: jax.Array | None = None,
            global_tokens: jax.Array | float | None = None,
            global_sequences: jax.Array | float | None = None,
            axis_name: AxisName = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar loss = aggregate(policy_loss + kl_coef * kl_penalty) and statistics.

  logprobs [R, T]: of the sampled tokens under the policy being trained (the only input the
  gradient flows through). old_logprobs [R, T]: under the policy that sampled them; None means
  "the same parameters" (one update per batch: s = 1, the gradient is A grad logp).
  ref_logprobs [R, T]: under the frozen reference, or None (then kl_coef must be 0).
  advantages [R], mask [R, T]. `logits` [R, T, V], if given, adds the entropy statistic.

  Statistics: loss (the value returned), loss/policy (the policy term aggregated like the loss),
  policy/* (see `policy_loss`; means over this call's masked tokens, global over `axis_name`),
  policy/tokens (number of those tokens), kl/ref (mean per-token KL(pi || ref) with the
  configured estimator, when a reference is given), policy/entropy (when logits are given).
  """
  if config.kl_coef > 0 and ref_logprobs is None:
    raise ValueError(f"kl_coef={config.kl_coef} needs ref_logprobs (got None); set kl_coef=0 "
                     "to train without a reference policy")
  mask = _as_mask(mask)
  # Sanitised here too: the KL's gradient at a NaN position would be 0 * NaN = NaN.
  logprobs = jnp.where(mask, logprobs.astype(jnp.float32), 0.0)
  if old_logprobs is None:
    old_logprobs = jax.lax.stop_gradient(logprobs)
  if ref_logprobs is not None:
    ref_logprobs = jnp.where(mask, ref_logprobs.astype(jnp.float32), 0.0)
  per_token, policy_stats = policy_loss(
      logprobs, old_logprobs, advantages, mask, eps_low=config.eps_low,
      eps_high=config.eps_high, dual_clip=config.dual_clip or None, axis_name=axis_name)
  agg = lambda x: aggregate(  # noqa: E731
      x, mask, config.aggregation, global_tokens=global_tokens,
      global_sequences=global_sequences, norm_length=config.norm_length or None,
      axis_name=axis_name)
  stats = {f"policy/{k}": v for k, v in policy_stats.items()}
  stats["policy/tokens"] = _sum(mask.astype(jnp.float32), axis_name)
  stats["loss/policy"] = agg(per_token)
  total = per_token
  if ref_logprobs is not None:
    kl = jnp.where(mask, kl_penalty(logprobs, ref_logprobs, config.kl_estimator), 0.0)
    stats["kl/ref"] = _masked_mean(kl, mask, axis_name)
    if config.kl_coef > 0:
      total = per_token + config.kl_coef * kl
  if logits is not None:
    stats["policy/entropy"] = entropy(jax.lax.stop_gradient(logits), mask,
                                      axis_name=axis_name)[1]
  loss = agg(total)
  stats["loss"] = loss
  return loss, jax.tree.map(jax.lax.stop_gradient, stats)
