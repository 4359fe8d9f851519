"""Advantages by hand: the GDPO paper's example, invariances, NaN, length mask, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from balcap import parallel
from balcap.rl import advantages as adv

ROOT_HALF = np.sqrt(0.5)  # 0.7071...


def rewards(*rollouts):
  """One group of rollouts, each a tuple of reward components -> [1, G, K]."""
  return jnp.asarray([rollouts], jnp.float32)


def test_gdpo_paper_example_decoupling_matters():
  # Two binary rewards, two rollouts (METHOD.md). ddof 1 as in the paper.
  case_1 = rewards((0, 0), (1, 0))
  case_2 = rewards((0, 0), (1, 1))
  for case in (case_1, case_2):
    np.testing.assert_allclose(adv.grpo(case, (1, 1), ddof=1)[0], [-ROOT_HALF, ROOT_HALF],
                               atol=1e-5)
  np.testing.assert_allclose(adv.gdpo(case_1, (1, 1), ddof=1)[0], [-ROOT_HALF, ROOT_HALF],
                             atol=1e-5)
  np.testing.assert_allclose(adv.gdpo(case_2, (1, 1), ddof=1)[0],
                             [-2 * ROOT_HALF, 2 * ROOT_HALF], atol=1e-5)


def test_c_gdpo_by_hand():
  # Group 0: r1 = [0, 1, 2] -> A1 = [-1.2247, 0, 1.2247] (population std 0.8165);
  #          r2 constant     -> A2 = 0.       S0 = A1.
  # Group 1: r1 = [1, 1, 1] -> 0; r2 = [0, 0, 3] -> [-0.7071, -0.7071, 1.4142].
  r = jnp.asarray([[[0, 5], [1, 5], [2, 5]], [[1, 0], [1, 0], [1, 3]]], jnp.float32)
  s = np.array([-1.2247449, 0, 1.2247449, -ROOT_HALF, -ROOT_HALF, 2 * ROOT_HALF])
  expected = ((s - s.mean()) / (s.std() + 1e-6)).reshape(2, 3)
  np.testing.assert_allclose(adv.c_gdpo(r, (1, 1)), expected, atol=1e-5)


def test_scale_of_one_reward_changes_grpo_not_c_gdpo():
  rng = np.random.default_rng(0)
  r = jnp.asarray(rng.uniform(size=(4, 5, 3)), jnp.float32)
  scaled = r.at[..., 1].multiply(100.0)
  np.testing.assert_allclose(adv.c_gdpo(r, (1, 1, 1)), adv.c_gdpo(scaled, (1, 1, 1)),
                             atol=1e-4)
  assert np.abs(adv.grpo(r, (1, 1, 1)) - adv.grpo(scaled, (1, 1, 1))).max() > 0.1


def test_constant_group_gets_zero_advantage_without_nan():
  r = rewards((0.5, 0.3), (0.5, 0.3), (0.5, 0.3))
  for estimator in (adv.gdpo, adv.grpo, adv.grpo_no_std):
    out = estimator(r, (1, 1))
    assert np.isfinite(out).all() and (out == 0).all()
  # c-GDPO: the only group is constant, so the whole batch is 0 (and finite).
  assert (adv.c_gdpo(r, (1, 1)) == 0).all()


def test_nan_rewards_are_left_out_and_all_nan_rollouts_get_zero():
  nan = np.nan
  with_nan = jnp.asarray([[[0.2, nan], [0.8, 0.5], [nan, nan], [0.5, 0.1]]], jnp.float32)
  out = adv.c_gdpo(with_nan, (1, 1))
  assert np.isfinite(out).all()
  assert out[0, 2] == 0  # every reward NaN
  # The same as scoring the group without that rollout.
  without = jnp.asarray([[[0.2, nan], [0.8, 0.5], [0.5, 0.1]]], jnp.float32)
  np.testing.assert_allclose(np.delete(np.asarray(out), 2, axis=1), adv.c_gdpo(without, (1, 1)),
                             atol=1e-6)
  # A reward NaN for a whole group contributes 0: equal to leaving that reward out.
  group_nan = jnp.asarray([[[0.1, nan], [0.9, nan], [0.4, nan]]], jnp.float32)
  np.testing.assert_allclose(adv.gdpo(group_nan, (1, 1)), adv.gdpo(group_nan[..., :1], (1,)),
                             atol=1e-6)
  # GRPO cannot total a rollout with a NaN component: it is left out.
  grpo = adv.grpo(with_nan, (1, 1))
  assert grpo[0, 0] == 0 and grpo[0, 2] == 0 and np.isfinite(grpo).all()


@pytest.mark.parametrize("ratio, kept", [(0.5, True), (0.49999, False), (2.0, True),
                                         (2.00001, False), (1.0, True), (0.0, False),
                                         (7.0, False)])
def test_length_mask_bounds_are_inclusive(ratio, kept):
  out = adv.length_mask(jnp.float32(0.8), jnp.float32(ratio), 0.5, 2.0)
  assert float(out) == (pytest.approx(0.8) if kept else 0.0)


def test_length_mask_of_an_unknown_ratio_is_unknown():
  assert np.isnan(adv.length_mask(jnp.float32(0.8), jnp.float32(np.nan)))


def test_conditioning_and_linear_penalty():
  paid = adv.condition(jnp.array([0.9, 0.9, 0.9]), jnp.array([0.2, 0.5, np.nan]), 0.5)
  np.testing.assert_allclose(paid[:2], [0.0, 0.9], rtol=1e-6)
  assert np.isnan(paid[2])
  np.testing.assert_allclose(adv.linear_length_penalty(jnp.array([1.0, 0.5, 3.0]), 0.2),
                             [0.0, -0.1, -0.4])


def test_masked_rollout_is_pushed_below_its_in_band_siblings():
  """The method's length control: out of band, linguistic 0, a clearly negative advantage."""
  config = adv.AdvantageConfig()
  r = {name: jnp.full((1, 4), 0.8) for name in config.components}
  ratio = jnp.array([[1.0, 1.1, 0.9, 0.3]])  # the last one is far too short
  out, stats = adv.compute(config, r, ratio)
  assert out[0, 3] < -1.0 and (out[0, :3] > 0).all()
  assert float(stats["length/masked_fraction"]) == pytest.approx(0.25)


def test_config_rejects_inconsistent_settings():
  with pytest.raises(ValueError, match="estimator 'ppo' is not one of"):
    adv.AdvantageConfig(estimator="ppo")
  with pytest.raises(ValueError, match="2 weights for 3 components"):
    adv.AdvantageConfig(weights=(1.0, 1.0))
  with pytest.raises(ValueError, match="conditioning needs both"):
    adv.AdvantageConfig(conditioned="recall")


def _batch(seed=1, prompts=8, group=4):
  rng = np.random.default_rng(seed)
  r = rng.uniform(size=(prompts, group, 3)).astype(np.float32)
  r[rng.uniform(size=r.shape) < 0.1] = np.nan
  ratio = rng.uniform(0.3, 2.5, size=(prompts, group)).astype(np.float32)
  names = ("precision", "recall", "linguistic")
  return {n: r[..., k] for k, n in enumerate(names)}, ratio


def test_sharded_batch_uses_global_statistics():
  config = adv.AdvantageConfig()
  r, ratio = _batch()
  expected, stats = adv.compute(config, {k: jnp.asarray(v) for k, v in r.items()},
                                jnp.asarray(ratio))
  mesh = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  rows = NamedSharding(mesh, P("data"))
  sharded_r = {k: jax.device_put(v, rows) for k, v in r.items()}
  sharded_ratio = jax.device_put(ratio, rows)
  out, sharded_stats = jax.jit(lambda r, q: adv.compute(config, r, q))(sharded_r, sharded_ratio)
  assert out.sharding.spec == P("data")
  np.testing.assert_allclose(out, expected, atol=1e-5)
  # shard_map: each device sees one prompt's group; batch statistics are psum-ed.
  per_shard = jax.shard_map(lambda r, q: adv.compute(config, r, q, axis_name="data"),
                            mesh=mesh, in_specs=(P("data"), P("data")),
                            out_specs=(P("data"), P()))
  out_map, map_stats = jax.jit(per_shard)(sharded_r, sharded_ratio)
  np.testing.assert_allclose(out_map, expected, atol=1e-5)
  for key in stats:
    np.testing.assert_allclose(map_stats[key], stats[key], atol=1e-5, err_msg=key)
    np.testing.assert_allclose(sharded_stats[key], stats[key], atol=1e-5, err_msg=key)


# Values that float32 cannot hold exactly: the mean of G copies is not always the value itself.
INEXACT = (0.9, 0.7, 1 / 3, 0.1, 0.3, 0.55)
GROUP_SIZES = (2, 3, 5, 6, 7, 8, 16)


def _constant_groups(value: float, group: int, prompts: int = 2) -> jnp.ndarray:
  return jnp.full((prompts, group, 3), value, jnp.float32)


@pytest.mark.parametrize("estimator", sorted(adv.ESTIMATORS))
def test_constant_groups_of_inexact_values_get_exactly_zero(estimator):
  # Before the fix, GRPO on three rollouts all rewarded 0.9 gave each of them +0.056.
  fn = adv.ESTIMATORS[estimator]
  for value in INEXACT:
    for group in GROUP_SIZES:
      out = np.asarray(fn(_constant_groups(value, group), (1.0, 1.0, 1.0)))
      assert (out == 0).all(), (estimator, value, group, out)


def test_a_constant_reward_contributes_exactly_nothing_to_gdpo_and_c_gdpo():
  # Reward 2 is constant within every group (at inexact values): the advantages must be
  # exactly those of the same batch with reward 2 set to 0, bit for bit.
  rng = np.random.default_rng(3)
  for group in GROUP_SIZES:
    r = rng.uniform(size=(4, group, 3)).astype(np.float32)
    r[..., 2] = np.asarray(INEXACT[:4], np.float32)[:, None]
    r[1, :2, 0] = np.nan  # NaN handling unchanged alongside
    zeroed = r.copy()
    zeroed[..., 2] = 0.0
    for fn in (adv.gdpo, adv.c_gdpo):
      np.testing.assert_array_equal(fn(jnp.asarray(r), (1.0, 1.0, 1.0)),
                                    fn(jnp.asarray(zeroed), (1.0, 1.0, 1.0)))


def test_constant_groups_with_nan_stay_zero_and_varying_groups_are_untouched():
  # The scored entries of the group are equal (one is NaN): still exactly 0.
  r = jnp.asarray([[[0.9], [np.nan], [0.9]], [[0.1], [0.3], [0.7]]], jnp.float32)
  out = np.asarray(adv.grpo(r, (1.0,)))
  assert (out[0] == 0).all()
  x = np.array([0.1, 0.3, 0.7])
  np.testing.assert_allclose(out[1], (x - x.mean()) / (x.std() + 1e-6), rtol=1e-5)
  # A constant batch after the weighted sum: c-GDPO's batch normalisation gives 0 too.
  assert (np.asarray(adv.batch_normalize(jnp.full((3, 4), 0.7, jnp.float32),
                                         jnp.ones((3, 4), bool))) == 0).all()


@pytest.mark.parametrize("estimator", sorted(adv.ESTIMATORS))
def test_constant_groups_are_zero_when_sharded(estimator):
  mesh = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  rows = NamedSharding(mesh, P("data"))
  config = adv.AdvantageConfig(estimator=estimator, length_mask=False)
  for value in INEXACT[:3]:
    r = {n: jax.device_put(jnp.full((8, 3), value, jnp.float32), rows)
         for n in config.components}
    ratio = jax.device_put(jnp.ones((8, 3), jnp.float32), rows)
    out, stats = jax.jit(lambda r, q: adv.compute(config, r, q))(r, ratio)
    assert (np.asarray(out) == 0).all(), (estimator, value)
    assert float(stats["advantage/zero_std_groups/precision"]) == 1.0
    per_shard = jax.shard_map(lambda r, q: adv.compute(config, r, q, axis_name="data"),
                              mesh=mesh, in_specs=(P("data"), P("data")),
                              out_specs=(P("data"), P()))
    out_map, _ = jax.jit(per_shard)(r, ratio)
    assert (np.asarray(out_map) == 0).all(), (estimator, value)
