"""The policy loss by hand: clipping on both sides, dual clip, KL estimators, aggregation on ragged
masks, NaN in padding, global token counts under shard_map, entropy, where gradients flow."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from balcap import parallel
from balcap.rl import losses

# Jitted once per static configuration: one compile per test instead of one per operation.
policy_loss = jax.jit(losses.policy_loss,
                      static_argnames=("eps_low", "eps_high", "dual_clip", "axis_name"))
aggregate = jax.jit(losses.aggregate, static_argnames=("mode", "norm_length", "axis_name"))
rl_loss = jax.jit(losses.rl_loss, static_argnames=("config", "axis_name"))

def one_token_each(ratios, advantages, **kwargs):
  """Policy loss of R one-token rollouts with the given ratios s and advantages A -> [R]."""
  logprobs = jnp.log(jnp.asarray(ratios, jnp.float32))[:, None]  # old logprobs are 0
  loss, stats = policy_loss(logprobs, jnp.zeros_like(logprobs),
                                   jnp.asarray(advantages, jnp.float32),
                                   jnp.ones_like(logprobs), **kwargs)
  return np.asarray(loss[:, 0]), stats


# ---------------------------------------------------------------------------------------------
# Clipped surrogate


def test_clip_binds_above_for_positive_and_below_for_negative_advantage():
  # A=+1, s=1.5, eps_high 0.2: -min(1.5, 1.2) = -1.2.   A=-1, s=0.5, eps_low 0.2:
  # -min(-0.5, -0.8) = 0.8.
  loss, stats = one_token_each([1.5, 0.5], [1.0, -1.0])
  np.testing.assert_allclose(loss, [-1.2, 0.8], rtol=1e-6)
  assert float(stats["clip_fraction"]) == 1.0
  assert float(stats["clip_fraction_high"]) == 0.5
  assert float(stats["clip_fraction_low"]) == 0.5


def test_inside_the_band_loss_is_minus_ratio_times_advantage():
  loss, stats = one_token_each([1.1, 0.9, 1.0], [2.0, -1.0, 3.0])
  np.testing.assert_allclose(loss, [-2.2, 0.9, -3.0], rtol=1e-6)
  assert float(stats["clip_fraction"]) == 0.0


def test_clip_never_binds_on_the_pessimistic_side():
  # A=+1 with s=0.5: -min(0.5, 0.8) = -0.5 (unclipped); A=-1 with s=1.5: -min(-1.5, -1.2) = 1.5.
  loss, stats = one_token_each([0.5, 1.5], [1.0, -1.0])
  np.testing.assert_allclose(loss, [-0.5, 1.5], rtol=1e-6)
  assert float(stats["clip_fraction"]) == 0.0


def test_asymmetric_clip_uses_eps_low_below_and_eps_high_above():
  # eps_high 0.28 (DAPO's clip-higher): s=1.25 is inside, s=1.5 clips at 1.28; below, 0.8.
  loss, stats = one_token_each([1.25, 1.5, 0.5, 0.75], [1.0, 1.0, -1.0, -1.0],
                               eps_low=0.2, eps_high=0.28)
  np.testing.assert_allclose(loss, [-1.25, -1.28, 0.8, 0.8], rtol=1e-6)
  np.testing.assert_allclose(stats["clip_fraction_high"], 0.25)
  np.testing.assert_allclose(stats["clip_fraction_low"], 0.5)


def test_dual_clip_caps_large_ratio_with_negative_advantage():
  # A=-1, s=5: the plain loss is 5, capped at -c A = 3. s=2 is under the cap. A>0 untouched.
  ratios, advantages = [5.0, 2.0, 5.0], [-1.0, -1.0, 1.0]
  plain, _ = one_token_each(ratios, advantages)
  np.testing.assert_allclose(plain, [5.0, 2.0, -1.2], rtol=1e-6)
  capped, stats = one_token_each(ratios, advantages, dual_clip=3.0)
  np.testing.assert_allclose(capped, [3.0, 2.0, -1.2], rtol=1e-6)
  np.testing.assert_allclose(stats["dual_clip_fraction"], 1 / 3, rtol=1e-6)
  # The capped token gives no gradient; the uncapped ones do (d(-s A)/d logp = -s A).
  grad = jax.jit(jax.grad(lambda lp: losses.policy_loss(
      lp, jnp.zeros_like(lp), jnp.asarray(advantages), jnp.ones_like(lp),
      dual_clip=3.0)[0].sum()))(jnp.log(jnp.asarray(ratios))[:, None])
  np.testing.assert_allclose(grad[:, 0], [0.0, 2.0, 0.0], atol=1e-6)


def test_ratio_and_old_policy_kl_statistics():
  _, stats = one_token_each([0.5, 1.0, 1.5], [1.0, 1.0, 1.0])
  np.testing.assert_allclose(stats["ratio_min"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(stats["ratio_max"], 1.5, rtol=1e-6)
  np.testing.assert_allclose(stats["ratio_mean"], 1.0, rtol=1e-6)
  # Tokens come from pi_old, so KL(pi_old || pi): k1 = mean(old - logp) = -mean(log s);
  # k3 = mean(s - 1 - log s) (r = pi / pi_old = s).
  np.testing.assert_allclose(stats["kl_old_k1"], -(math.log(0.5) + math.log(1.5)) / 3,
                             rtol=1e-5)
  k3 = np.mean([0.5 - 1 - math.log(0.5), 0.0, 1.5 - 1 - math.log(1.5)])
  np.testing.assert_allclose(stats["kl_old_k3"], k3, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# KL to the reference


@pytest.mark.parametrize("kind, expected", [
    ("k1", [1.0, -1.0, 0.0]),
    ("k2", [0.5, 0.5, 0.0]),
    # exp(ref - logp) - (ref - logp) - 1: e^-1 - (-1) - 1 = e^-1; e^1 - 1 - 1 = e - 2.
    ("k3", [math.exp(-1), math.e - 2, 0.0]),
])
def test_kl_estimators_by_hand(kind, expected):
  logprobs = jnp.asarray([[-1.0, -2.0, -0.3]])
  ref = jnp.asarray([[-2.0, -1.0, -0.3]])
  np.testing.assert_allclose(losses.kl_penalty(logprobs, ref, kind)[0], expected, rtol=1e-6,
                             atol=1e-7)


def test_k3_is_never_negative():
  logprobs, ref = np.random.default_rng(0).normal(0, 3, (2, 64, 32)).astype(np.float32)
  assert float(losses.kl_penalty(logprobs, ref, "k3").min()) >= 0.0


def test_unknown_kl_estimator_is_an_error():
  with pytest.raises(ValueError, match="k4"):
    losses.kl_penalty(jnp.zeros((1, 1)), jnp.zeros((1, 1)), "k4")


# ---------------------------------------------------------------------------------------------
# Aggregation

# Lengths 4, 2, 1 and an empty (padding) row; the masked positions hold garbage.
NAN, INF = float("nan"), float("inf")
RAGGED = jnp.asarray([[1, 2, 3, 4], [5, 6, NAN, INF], [7, -INF, NAN, 9], [NAN, INF, 1, 1]],
                     jnp.float32)
RAGGED_MASK = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], jnp.float32)


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 28 / 7),                         # (10 + 11 + 7) / 7 tokens
    ("seq-mean-token-mean", (2.5 + 5.5 + 7) / 3),   # three sequences with tokens
    ("seq-mean-token-sum-norm", (10 + 11 + 7) / 4 / 3),  # sums / T=4, mean over 3 sequences
])
def test_aggregation_modes_on_a_ragged_mask_ignore_nan_padding(mode, expected):
  value = aggregate(RAGGED, RAGGED_MASK, mode)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  # Gradients of padding are exactly 0, not NaN.
  grad = jax.jit(jax.grad(lambda x: losses.aggregate(x, RAGGED_MASK, mode)))(RAGGED)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[RAGGED_MASK == 0] == 0)


def test_token_sum_norm_divides_by_a_constant_length():
  value = aggregate(RAGGED, RAGGED_MASK, "seq-mean-token-sum-norm", norm_length=8)
  np.testing.assert_allclose(value, 28 / 8 / 3, rtol=1e-6)


def test_empty_mask_aggregates_to_zero():
  for mode in losses.AGGREGATIONS:
    assert float(aggregate(RAGGED, jnp.zeros_like(RAGGED_MASK), mode)) == 0.0


def test_unknown_aggregation_is_an_error():
  with pytest.raises(ValueError, match="seq-sum"):
    aggregate(RAGGED, RAGGED_MASK, "seq-sum")


def test_masked_tokens_holding_nan_change_neither_loss_nor_gradient():
  config = losses.LossConfig(kl_coef=0.1)
  mask = RAGGED_MASK
  clean = jnp.where(mask > 0, -0.5, 0.0)
  dirty = jnp.where(mask > 0, -0.5, RAGGED)  # NaN/inf wherever the mask is 0
  old = jnp.where(mask > 0, -0.4, jnp.nan)
  ref = jnp.where(mask > 0, -0.7, -jnp.inf)
  advantages = jnp.asarray([1.0, -1.0, 0.5, jnp.nan])  # the padding row's advantage is NaN too

  def loss(logprobs):
    return rl_loss(logprobs, old, ref, advantages, mask, config)

  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (value, stats), grad = value_and_grad(dirty)
  (clean_value, _), clean_grad = value_and_grad(clean)
  assert np.isfinite(float(value)) and all(np.isfinite(float(v)) for v in stats.values())
  np.testing.assert_allclose(value, clean_value, rtol=1e-6)
  np.testing.assert_allclose(grad, clean_grad, rtol=1e-6)
  assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)


def test_token_mean_over_global_count_adds_up_across_shards():
  full = aggregate(RAGGED, RAGGED_MASK, "token-mean")
  count = float(RAGGED_MASK.sum())
  shares = [aggregate(RAGGED[rows], RAGGED_MASK[rows], "token-mean", global_tokens=count)
            for rows in (slice(0, 1), slice(1, 4))]
  np.testing.assert_allclose(sum(shares), full, rtol=1e-6)
  # The local token-mean of the shards would weigh them equally instead: (2.5 + 18/3) / 2.
  local = [aggregate(RAGGED[r], RAGGED_MASK[r], "token-mean")
           for r in (slice(0, 1), slice(1, 4))]
  assert abs(sum(local) / 2 - float(full)) > 0.1


def _eight_rollouts():
  """8 rollouts of different lengths (one per simulated device)."""
  rng = np.random.default_rng(0)
  lengths = np.array([1, 2, 3, 4, 5, 6, 2, 0])
  mask = (np.arange(6)[None] < lengths[:, None]).astype(np.float32)
  logprobs = rng.normal(-1.0, 0.3, (8, 6)).astype(np.float32)
  old = (logprobs + rng.normal(0, 0.3, (8, 6))).astype(np.float32)
  ref = (logprobs + rng.normal(0, 0.3, (8, 6))).astype(np.float32)
  advantages = rng.normal(0, 1, 8).astype(np.float32)
  return logprobs, old, ref, advantages, mask


def test_shard_map_psum_gives_the_global_loss_stats_and_gradient():
  configs = [losses.LossConfig(kl_coef=0.05, aggregation=mode, dual_clip=3.0)
             for mode in losses.AGGREGATIONS]
  logprobs, old, ref, advantages, mask = _eight_rollouts()

  # The logprobs depend on one replicated parameter w, so the gradient must be summed over
  # every device's rollouts: the psum-ed loss gives the global gradient under shard_map.
  # All three aggregation modes in one program (one compile).
  def losses_and_grads(w, logprobs, old, ref, advantages, mask, axis_name=None):
    def loss(w, config):
      return losses.rl_loss(w * logprobs, old, ref, advantages, mask, config,
                            axis_name=axis_name)
    return [jax.value_and_grad(loss, has_aux=True)(w, c) for c in configs]

  w = jnp.asarray(1.1)
  expected = jax.jit(losses_and_grads)(w, logprobs, old, ref, advantages, mask)
  mesh = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  rows = NamedSharding(mesh, P("data"))
  sharded = [jax.device_put(x, rows) for x in (logprobs, old, ref, advantages, mask)]
  per_shard = jax.shard_map(lambda w, *a: losses_and_grads(w, *a, axis_name="data"),
                            mesh=mesh, in_specs=(P(),) + (P("data"),) * 5, out_specs=P())
  got = jax.jit(per_shard)(w, *sharded)
  for config, ((value, stats), grad), ((want, want_stats), want_grad) in zip(configs, got,
                                                                             expected):
    np.testing.assert_allclose(value, want, rtol=1e-5, err_msg=config.aggregation)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, err_msg=config.aggregation)
    for key in want_stats:
      np.testing.assert_allclose(stats[key], want_stats[key], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{config.aggregation}: {key}")


# ---------------------------------------------------------------------------------------------
# Entropy


def test_entropy_of_uniform_is_log_vocab_and_of_one_hot_is_zero():
  uniform = jnp.zeros((1, 1, 8))
  one_hot = jnp.asarray([[[0.0, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf,
                           -jnp.inf]]])
  peaked = jnp.asarray([[[200.0, 0, 0, 0, 0, 0, 0, 0]]], jnp.bfloat16)
  logits = jnp.concatenate([uniform, one_hot, peaked.astype(jnp.float32)], axis=1)  # [1, 3, 8]
  entropy = jax.jit(losses.entropy)
  per_token, mean = entropy(logits, jnp.ones((1, 3)))
  np.testing.assert_allclose(per_token[0], [math.log(8), 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(mean, math.log(8) / 3, rtol=1e-6)
  # Masked tokens are left out of the mean.
  _, mean_first = entropy(logits, jnp.asarray([[1.0, 0.0, 0.0]]))
  np.testing.assert_allclose(mean_first, math.log(8), rtol=1e-6)
  # Forbidden (-inf) tokens give a finite gradient, not NaN.
  grad = jax.jit(jax.grad(lambda x: losses.entropy(x, jnp.ones((1, 3)))[1]))(logits)
  assert np.all(np.isfinite(grad))


# ---------------------------------------------------------------------------------------------
# The combined loss


def test_rl_loss_adds_kl_coef_times_kl_by_hand():
  # One rollout, two tokens, s = 1 (old = logp), A = 2: policy -2 per token.
  # k1 against ref: logp - ref = [0.5, -0.1]; kl_coef 0.1. token-mean:
  # (-2 + 0.05 - 2 - 0.01) / 2 = -1.98.
  logprobs = jnp.asarray([[-1.0, -2.0]])
  ref = jnp.asarray([[-1.5, -1.9]])
  config = losses.LossConfig(kl_coef=0.1, kl_estimator="k1")
  loss, stats = rl_loss(logprobs, logprobs, ref, jnp.asarray([2.0]), jnp.ones((1, 2)),
                               config, logits=jnp.zeros((1, 2, 4)))
  np.testing.assert_allclose(loss, -1.98, rtol=1e-6)
  np.testing.assert_allclose(stats["loss"], -1.98, rtol=1e-6)
  np.testing.assert_allclose(stats["loss/policy"], -2.0, rtol=1e-6)
  np.testing.assert_allclose(stats["kl/ref"], 0.2, rtol=1e-6)
  np.testing.assert_allclose(stats["policy/entropy"], math.log(4), rtol=1e-6)
  assert float(stats["policy/tokens"]) == 2.0
  assert {"policy/clip_fraction", "policy/clip_fraction_low", "policy/clip_fraction_high",
          "policy/dual_clip_fraction", "policy/ratio_mean", "policy/ratio_min",
          "policy/ratio_max", "policy/kl_old_k1", "policy/kl_old_k3"} <= set(stats)


def test_rl_loss_without_reference_when_kl_coef_is_zero():
  logprobs = jnp.asarray([[-1.0, -2.0]])
  loss, stats = rl_loss(logprobs, None, None, jnp.asarray([1.0]), jnp.ones((1, 2)),
                               losses.LossConfig())
  np.testing.assert_allclose(loss, -1.0, rtol=1e-6)  # old=None: s = 1, loss = -A
  assert "kl/ref" not in stats


def test_kl_coef_without_reference_is_an_error():
  with pytest.raises(ValueError, match="kl_coef"):
    rl_loss(jnp.zeros((1, 2)), None, None, jnp.ones(1), jnp.ones((1, 2)),
                   losses.LossConfig(kl_coef=0.1))


def test_gradient_flows_only_through_logprobs():
  logprobs, old, ref, advantages, mask = (jnp.asarray(x) for x in _eight_rollouts())
  config = losses.LossConfig(kl_coef=0.1)

  def loss(*args):
    return rl_loss(*args, mask, config)[0]

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(logprobs, old, ref, advantages)
  assert float(jnp.abs(grads[0]).sum()) > 0
  for name, g in zip(("old", "ref", "advantages"), grads[1:]):
    assert float(jnp.abs(g).sum()) == 0.0, name
  # By hand: one token, s = 1, A = 1, token-mean over 4 tokens -> d loss / d logp = -1/4.
  grad = jax.jit(jax.grad(lambda lp: losses.rl_loss(
      lp, jnp.zeros((1, 4)), None, jnp.ones(1), jnp.ones((1, 4)), losses.LossConfig())[0]))(
          jnp.zeros((1, 4)))
  np.testing.assert_allclose(grad, [[-0.25] * 4], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("field, value", [
    ("eps_low", 1.5), ("eps_low", -0.1), ("eps_high", -0.2), ("dual_clip", 0.5),
    ("kl_coef", -1.0), ("kl_estimator", "k4"), ("aggregation", "seq-sum"), ("norm_length", -1),
])
def test_invalid_loss_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    losses.LossConfig(**{field: value})


def test_from_config_builds_and_rejects_unknown_keys():
  config = losses.from_config({"eps_high": 0.28, "aggregation": "seq-mean-token-mean"})
  assert config == losses.LossConfig(eps_high=0.28, aggregation="seq-mean-token-mean")
  with pytest.raises(ValueError, match="clip_eps"):
    losses.from_config({"clip_eps": 0.2})
