"""Advantage estimators for G rollouts per prompt and K rewards: c-GDPO (default), GRPO and the
baselines, length-conditional reward masking, reward conditioning. Pure JAX, jittable.

Rewards are `[B, G, K]` (prompt, rollout, component) and may hold NaN, meaning "could not be
scored". NaN rewards are left out of every statistic; a reward that is NaN for a whole group
contributes 0 to that group; a rollout whose rewards are all NaN (or that `valid` marks as
padding) gets advantage 0 and is counted in the stats. A group whose reward is constant
contributes exactly 0 for that reward, whatever the value and G: constancy is detected (max ==
min over the scored entries) rather than trusted to `r - mean`, which is NOT exactly 0 there
(the float32 mean of G copies of 0.9 need not be 0.9), and dividing that rounding residue by
its own ~1e-8 std would turn it into a ~0.05 advantage of one sign for the whole group.

Statistics over "the batch" are over the GLOBAL batch: under `jit` with the batch sharded over
devices and hosts, XLA reduces across all of them; inside `shard_map`, pass the mesh axes as
`axis_name` and the sums are `psum`-ed.

c-GDPO (METHOD.md):  A_k = (r_k - mean_g r_k) / (std_g r_k + eps) per reward and group,
  S = sum_k w_k A_k, A = (S - mean_batch S) / (std_batch S + eps).
GRPO:  r = sum_k w_k r_k, A = (r - mean_g r) / (std_g r + eps)  (or without the std).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

AxisName = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
  """Everything `compute` needs; `from_config(config.advantage)` builds it."""
  estimator: str = "c_gdpo"           # one of ESTIMATORS
  components: tuple[str, ...] = ("precision", "recall", "linguistic")
  weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # alpha, beta, gamma: applied after normalising
  eps: float = 1e-6
  ddof: int = 0                       # 0: population std (default); 1: sample std
  # Length-conditional masking of one component (METHOD.md): kept when
  # tau_low <= generated / reference length <= tau_high (inclusive), else 0.
  length_mask: bool = True
  length_masked_component: str = "linguistic"
  tau_low: float = 0.5
  tau_high: float = 2.0
  # Baseline: -lambda * |ratio - 1| added as one more reward (0 = off).
  linear_length_penalty: float = 0.0
  # GDPO paper's conditioning: `conditioned` is paid only when `condition_on` >= threshold.
  conditioned: str = ""
  condition_on: str = ""
  condition_threshold: float = 0.0

  def __post_init__(self):
    problems = []
    if self.estimator not in ESTIMATORS:
      problems.append(f"estimator {self.estimator!r} is not one of {sorted(ESTIMATORS)}")
    if len(self.weights) != len(self.components):
      problems.append(f"{len(self.weights)} weights for {len(self.components)} components "
                      f"{self.components}")
    if self.length_mask and self.length_masked_component not in self.components:
      problems.append(f"length_masked_component {self.length_masked_component!r} is not one of "
                      f"the components {self.components}")
    if not 0 <= self.tau_low <= self.tau_high:
      problems.append(f"need 0 <= tau_low <= tau_high, got {self.tau_low}, {self.tau_high}")
    if bool(self.conditioned) != bool(self.condition_on):
      problems.append("conditioning needs both `conditioned` and `condition_on`")
    for name in (self.conditioned, self.condition_on):
      if name and name not in self.components:
        problems.append(f"conditioning names {name!r}, not one of {self.components}")
    if self.eps <= 0 or self.ddof not in (0, 1):
      problems.append(f"need eps > 0 and ddof in (0, 1), got {self.eps}, {self.ddof}")
    if problems:
      raise ValueError("invalid advantage config: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Statistics that ignore NaN


def _sum(x: jax.Array, axis, axis_name: AxisName) -> jax.Array:
  total = jnp.sum(x, axis=axis)
  return jax.lax.psum(total, axis_name) if axis_name is not None else total


def _constant(values: jax.Array, valid: jax.Array, axis, axis_name: AxisName = None
              ) -> jax.Array:
  """True where every valid entry along `axis` (and over `axis_name`) is the same value, or
  there is none: such a set carries no signal and normalises to exactly 0."""
  high = jnp.max(jnp.where(valid, values, -jnp.inf), axis=axis, keepdims=axis is not None)
  low = jnp.min(jnp.where(valid, values, jnp.inf), axis=axis, keepdims=axis is not None)
  if axis_name is not None:
    high, low = jax.lax.pmax(high, axis_name), jax.lax.pmin(low, axis_name)
  return high <= low


def group_normalize(rewards: jax.Array, *, eps: float = 1e-6, ddof: int = 0,
                    scale: bool = True) -> jax.Array:
  """(r - mean_g r) / (std_g r + eps) within each group (row) of rewards [B, G], NaN-aware.

  NaN entries get 0 and are left out of the group's mean and std; so does a whole-NaN group.
  A group whose scored rewards are all equal gets exactly 0 (see the module docstring).
  """
  valid = ~jnp.isnan(rewards)
  values = jnp.where(valid, rewards, 0.0)
  count = valid.sum(axis=-1, keepdims=True)
  mean = values.sum(axis=-1, keepdims=True) / jnp.maximum(count, 1)
  informative = valid & ~_constant(rewards, valid, axis=-1)
  centered = jnp.where(informative, rewards - mean, 0.0)
  if not scale:
    return centered
  variance = (centered ** 2).sum(axis=-1, keepdims=True) / jnp.maximum(count - ddof, 1)
  return centered / (jnp.sqrt(variance) + eps)


def batch_normalize(values: jax.Array, valid: jax.Array, *, eps: float = 1e-6, ddof: int = 0,
                    axis_name: AxisName = None) -> jax.Array:
  """(x - mean) / (std + eps) over every valid entry of the (global) batch; invalid -> 0, and
  all 0 when the valid entries are all equal."""
  x = jnp.where(valid, values, 0.0)
  count = _sum(valid.astype(jnp.float32), None, axis_name)
  mean = _sum(x, None, axis_name) / jnp.maximum(count, 1.0)
  informative = valid & ~_constant(values, valid, None, axis_name)
  centered = jnp.where(informative, values - mean, 0.0)
  variance = _sum(centered ** 2, None, axis_name) / jnp.maximum(count - ddof, 1.0)
  return centered / (jnp.sqrt(variance) + eps)


# ---------------------------------------------------------------------------------------------
# Estimators: rewards [B, G, K] (+ weights [K]) -> advantages [B, G]


def c_gdpo(rewards: jax.Array, weights: Sequence[float], *, eps: float = 1e-6, ddof: int = 0,
           valid: jax.Array | None = None, axis_name: AxisName = None) -> jax.Array:
  """Per-reward group normalisation, weighted sum, then normalisation over the global batch."""
  per_reward = jnp.stack([group_normalize(rewards[..., k], eps=eps, ddof=ddof)
                          for k in range(rewards.shape[-1])], axis=-1)
  summed = jnp.sum(per_reward * jnp.asarray(weights, rewards.dtype), axis=-1)
  rows = _scored(rewards, valid)
  return batch_normalize(summed, rows, eps=eps, ddof=ddof, axis_name=axis_name)


def gdpo(rewards: jax.Array, weights: Sequence[float], *, eps: float = 1e-6, ddof: int = 0,
         valid: jax.Array | None = None, axis_name: AxisName = None) -> jax.Array:
  """c-GDPO before the batch normalisation (the GDPO paper's worked example)."""
  del axis_name
  per_reward = jnp.stack([group_normalize(rewards[..., k], eps=eps, ddof=ddof)
                          for k in range(rewards.shape[-1])], axis=-1)
  summed = jnp.sum(per_reward * jnp.asarray(weights, rewards.dtype), axis=-1)
  return jnp.where(_scored(rewards, valid), summed, 0.0)


def grpo(rewards: jax.Array, weights: Sequence[float], *, eps: float = 1e-6, ddof: int = 0,
         valid: jax.Array | None = None, axis_name: AxisName = None,
         scale: bool = True) -> jax.Array:
  """Weighted sum of the rewards, then group normalisation (std scaling optional).

  A rollout with any NaN component has no total and is left out (advantage 0).
  """
  del axis_name
  total = jnp.sum(rewards * jnp.asarray(weights, rewards.dtype), axis=-1)  # NaN if any is NaN
  if valid is not None:
    total = jnp.where(valid, total, jnp.nan)
  return group_normalize(total, eps=eps, ddof=ddof, scale=scale)


def grpo_no_std(rewards: jax.Array, weights: Sequence[float], **kwargs) -> jax.Array:
  """GRPO with group mean-centring only (Dr. GRPO)."""
  return grpo(rewards, weights, scale=False, **kwargs)


ESTIMATORS = {"c_gdpo": c_gdpo, "gdpo": gdpo, "grpo": grpo, "grpo_no_std": grpo_no_std}


def _scored(rewards: jax.Array, valid: jax.Array | None) -> jax.Array:
  """[B, G] rollouts with at least one scored reward (and not padding)."""
  scored = ~jnp.all(jnp.isnan(rewards), axis=-1)
  return scored if valid is None else scored & valid


# ---------------------------------------------------------------------------------------------
# Reward shaping before the estimator


def length_mask(reward: jax.Array, ratio: jax.Array, tau_low: float = 0.5,
                tau_high: float = 2.0) -> jax.Array:
  """reward where tau_low <= ratio <= tau_high (inclusive), 0 outside, NaN if ratio is NaN."""
  inside = (ratio >= tau_low) & (ratio <= tau_high)
  return jnp.where(jnp.isnan(ratio), jnp.nan, jnp.where(inside, reward, 0.0))


def linear_length_penalty(ratio: jax.Array, strength: float) -> jax.Array:
  """The baseline's extra reward: -strength * |ratio - 1| (NaN where the ratio is)."""
  return -strength * jnp.abs(ratio - 1.0)


def condition(reward: jax.Array, on: jax.Array, threshold: float) -> jax.Array:
  """reward paid only when `on` >= threshold (else 0); NaN where `on` is NaN."""
  return jnp.where(jnp.isnan(on), jnp.nan, jnp.where(on >= threshold, reward, 0.0))


def shaped_rewards(config: AdvantageConfig, rewards: dict[str, jax.Array],
                   ratio: jax.Array) -> tuple[jax.Array, tuple[float, ...]]:
  """The [B, G, K'] reward array the estimator sees and its weights: conditioning, then the
  length mask, then the optional linear length penalty as one more component."""
  shaped = {name: rewards[name] for name in config.components}
  if config.conditioned:
    shaped[config.conditioned] = condition(shaped[config.conditioned],
                                           rewards[config.condition_on],
                                           config.condition_threshold)
  if config.length_mask:
    name = config.length_masked_component
    shaped[name] = length_mask(shaped[name], ratio, config.tau_low, config.tau_high)
  stacked = [shaped[name] for name in config.components]
  weights = tuple(config.weights)
  if config.linear_length_penalty:
    stacked.append(linear_length_penalty(ratio, config.linear_length_penalty))
    weights += (1.0,)
  return jnp.stack(stacked, axis=-1), weights


def compute(config: AdvantageConfig, rewards: dict[str, jax.Array], ratio: jax.Array, *,
            valid: jax.Array | None = None, axis_name: AxisName = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Advantages [B, G] from reward components {name: [B, G]} and length ratios [B, G], plus
  scalar statistics for the metrics (global when the batch is)."""
  shaped, weights = shaped_rewards(config, rewards, ratio)
  advantages = ESTIMATORS[config.estimator](shaped, weights, eps=config.eps, ddof=config.ddof,
                                            valid=valid, axis_name=axis_name)
  rows = _scored(shaped, valid)
  count = jnp.maximum(_sum(rows.astype(jnp.float32), None, axis_name), 1.0)
  stats = {
      "advantage/mean": _sum(jnp.where(rows, advantages, 0.0), None, axis_name) / count,
      "advantage/abs_mean": _sum(jnp.where(rows, jnp.abs(advantages), 0.0), None,
                                 axis_name) / count,
      "advantage/unscored_rollouts": _sum((~rows).astype(jnp.float32) if valid is None else
                                          (~rows & valid).astype(jnp.float32), None, axis_name),
  }
  if config.length_mask:
    inside = (ratio >= config.tau_low) & (ratio <= config.tau_high)
    outside = ~inside & ~jnp.isnan(ratio) & (rows if valid is None else valid)
    stats["length/masked_fraction"] = _sum(outside.astype(jnp.float32), None,
                                           axis_name) / count
  for k, name in enumerate(config.components):
    column = shaped[..., k]
    scored = ~jnp.isnan(column)
    constant = (scored.sum(axis=-1) > 0) & _constant(column, scored, axis=-1)[:, 0]
    groups = _sum(jnp.ones(column.shape[:1]), None, axis_name)
    stats[f"advantage/zero_std_groups/{name}"] = _sum(constant.astype(jnp.float32), None,
                                                      axis_name) / groups
  return advantages, stats


def from_config(section) -> AdvantageConfig:
  """AdvantageConfig from `config.advantage` (a ConfigDict or dict)."""
  values = dict(section)
  values["components"] = tuple(values["components"])
  values["weights"] = tuple(float(w) for w in values["weights"])
  return AdvantageConfig(**values)
