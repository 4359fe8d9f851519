"""The optimiser by hand: warmup and cosine values, clipping before Adam, frozen params without
state, weight decay only on matrices, float32 moments and updates for bfloat16 params."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from balcap import optim


def params_tree(dtype=jnp.float32):
  return {"visual": {"kernel": jnp.full((2, 2), 1.0, dtype), "bias": jnp.full((2,), 1.0, dtype)},
          "text": {"kernel": jnp.full((2, 3), 2.0, dtype), "scale": jnp.full((3,), 2.0, dtype)}}


def run(optimizer, params, grads_per_step):
  """Applies one update per gradient tree; returns the final params, state and last updates."""
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = optimizer.update(grads, state, params)
    return optim.apply_updates(params, updates), state, updates

  updates = None
  for grads in grads_per_step:
    params, state, updates = step(params, state, grads)
  return params, state, updates


def moments(state):
  return optax.tree_utils.tree_get(state, "mu"), optax.tree_utils.tree_get(state, "nu")


# ---------------------------------------------------------------------------------------------
# Learning rate


def test_warmup_is_linear_from_zero_then_constant():
  schedule = optim.learning_rate_schedule(optim.OptimizerConfig(learning_rate=1e-3,
                                                                warmup_steps=10))
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 11, 1000)],
                             [0.0, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)


def test_cosine_values_after_warmup():
  # Warmup to 1 over 10 steps, cosine from step 10 to step 110 down to 0.1:
  # lr = 0.1 + 0.9 * 0.5 * (1 + cos(pi * (step - 10) / 100)).
  config = optim.OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine",
                                 decay_steps=110, min_learning_rate_ratio=0.1)
  schedule = optim.learning_rate_schedule(config)
  expected = [0.5, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, 0.1, 0.1]
  np.testing.assert_allclose([schedule(s) for s in (5, 10, 35, 60, 110, 500)], expected,
                             rtol=1e-5)


def test_cosine_length_defaults_to_total_steps():
  config = optim.OptimizerConfig(learning_rate=1.0, schedule="cosine")
  np.testing.assert_allclose(optim.learning_rate_schedule(config, total_steps=100)(50), 0.5,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="decay_steps"):
    optim.learning_rate_schedule(config)


# ---------------------------------------------------------------------------------------------
# Clipping, Adam, weight decay


def test_matches_optax_adamw_for_float32_params():
  config = optim.OptimizerConfig(learning_rate=0.1, weight_decay=0.01, max_grad_norm=0.0)
  params = params_tree()
  grads = [jax.tree.map(lambda p, k=k: (k + 1.0) * jnp.cos(p + k), params) for k in range(3)]
  ours, _, _ = run(optim.make_optimizer(config), params, grads)
  reference = optax.adamw(0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                          mask=lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree))
  theirs, _, _ = run(reference, params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)


def test_clipping_happens_before_adam_on_the_raw_gradient():
  # A huge gradient of norm 5e6 is clipped to norm 1 BEFORE entering Adam's moments: after
  # two steps, every update and moment equals those of the pre-clipped gradient.
  config = optim.OptimizerConfig(learning_rate=1.0, max_grad_norm=1.0, eps=1e-3)
  params = {"w": jnp.zeros((2,))}
  huge = {"w": jnp.asarray([3e6, 4e6])}
  clipped = {"w": jnp.asarray([0.6, 0.8])}
  small = {"w": jnp.asarray([-0.1, 0.05])}
  optimizer = optim.make_optimizer(config)
  p_huge, s_huge, u_huge = run(optimizer, params, [huge, small])
  p_clip, s_clip, u_clip = run(optimizer, params, [clipped, small])
  np.testing.assert_allclose(p_huge["w"], p_clip["w"], rtol=1e-6)
  np.testing.assert_allclose(u_huge["w"], u_clip["w"], rtol=1e-6)
  mu, _ = moments(s_huge)
  # mu = 0.9 * 0.1 * [0.6, 0.8] + 0.1 * small: bounded by the clipped gradient.
  np.testing.assert_allclose(mu["w"], [0.054 - 0.01, 0.072 + 0.005], rtol=1e-5)
  np.testing.assert_allclose(moments(s_clip)[0]["w"], mu["w"], rtol=1e-6)
  # Unclipped, the first step of the huge gradient would dominate the second one's update.
  p_raw, _, _ = run(optim.make_optimizer(optim.OptimizerConfig(
      learning_rate=1.0, max_grad_norm=0.0, eps=1e-3)), params, [huge, small])
  assert np.abs(np.asarray(p_raw["w"]) - np.asarray(p_clip["w"])).max() > 1e-2


def test_weight_decay_skips_one_dimensional_params():
  # Zero gradients: Adam's direction is 0, so the update is the decay alone,
  # -lr * wd * p = -0.1 p on matrices, nothing on norm scales and biases.
  config = optim.OptimizerConfig(learning_rate=1.0, weight_decay=0.1)
  params = params_tree()
  zeros = jax.tree.map(jnp.zeros_like, params)
  new, _, _ = run(optim.make_optimizer(config), params, [zeros])
  np.testing.assert_allclose(new["visual"]["kernel"], 0.9, rtol=1e-6)
  np.testing.assert_allclose(new["text"]["kernel"], 1.8, rtol=1e-6)
  np.testing.assert_allclose(new["visual"]["bias"], 1.0)
  np.testing.assert_allclose(new["text"]["scale"], 2.0)


def test_grad_norm_is_global_and_float32():
  grads = {"a": jnp.asarray([3.0], jnp.bfloat16), "b": jnp.asarray([[4.0]], jnp.bfloat16)}
  norm = optim.grad_norm(grads)
  assert norm.dtype == jnp.float32
  np.testing.assert_allclose(norm, 5.0)


# ---------------------------------------------------------------------------------------------
# Frozen params


def test_frozen_params_never_change_and_have_no_optimizer_state():
  config = optim.OptimizerConfig(learning_rate=0.1, weight_decay=0.1, freeze=("^visual/",))
  params = params_tree()
  grads = [jax.tree.map(jnp.ones_like, params)] * 3
  optimizer = optim.make_optimizer(config)
  new, state, updates = run(optimizer, params, grads)
  np.testing.assert_array_equal(new["visual"]["kernel"], params["visual"]["kernel"])
  np.testing.assert_array_equal(new["visual"]["bias"], params["visual"]["bias"])
  np.testing.assert_array_equal(updates["visual"]["kernel"], 0.0)
  assert not np.allclose(new["text"]["kernel"], params["text"]["kernel"])
  # No moment anywhere in the state for a frozen param: only text's 6 + 3 entries, twice.
  state_paths = [optim.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  assert not [p for p in state_paths if "visual" in p], state_paths
  mu, nu = moments(state)
  assert sum(x.size for x in jax.tree.leaves(mu)) == 9
  assert sum(x.size for x in jax.tree.leaves(nu)) == 9


def test_freeze_pattern_matching_nothing_is_an_error():
  optimizer = optim.make_optimizer(optim.OptimizerConfig(freeze=("^vision/",)))
  with pytest.raises(ValueError, match="vision"):
    optimizer.init(params_tree())


def test_learning_rate_multipliers_scale_matching_groups_first_match_wins():
  params = params_tree()
  grads = [jax.tree.map(lambda p: jnp.full(p.shape, 0.3), params)]
  config = optim.OptimizerConfig(learning_rate=0.01, max_grad_norm=0.0,
                                 learning_rate_multipliers=(("^visual/", 10.0), ("kernel", 0.5)))
  _, _, updates = run(optim.make_optimizer(config), params, grads)
  # First Adam step: -lr * g / (|g| + eps) = -lr per coordinate, times the group's multiplier
  # ("visual/kernel" matches both patterns: the first, 10, wins).
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    name = optim.param_path(path)
    expected = -0.1 if name.startswith("visual/") else -0.005 if "kernel" in name else -0.01
    np.testing.assert_allclose(u, expected, rtol=1e-5, err_msg=name)


def test_learning_rate_multipliers_are_checked():
  with pytest.raises(ValueError, match="must be a \\(regex, multiplier\\) pair"):
    optim.OptimizerConfig(learning_rate_multipliers=("^visual/",))
  with pytest.raises(ValueError, match="must be >= 0"):
    optim.OptimizerConfig(learning_rate_multipliers=(("^visual/", -1.0),))
  optimizer = optim.make_optimizer(optim.OptimizerConfig(
      learning_rate_multipliers=(("^vision/", 2.0),)))
  with pytest.raises(ValueError, match="learning_rate_multipliers pattern.*vision"):
    optimizer.init(params_tree())
  # From a config section, lists (as a command-line override writes them) become pairs.
  section = {"learning_rate_multipliers": [["^visual/", 10]]}
  assert optim.from_config(section).learning_rate_multipliers == (("^visual/", 10),)


# ---------------------------------------------------------------------------------------------
# bfloat16 params


def test_bf16_params_keep_fp32_moments_and_apply_an_fp32_update_then_cast():
  params = params_tree(jnp.bfloat16)
  grads = [jax.tree.map(lambda p: jnp.full(p.shape, 0.3, jnp.bfloat16), params)]
  config = optim.OptimizerConfig(learning_rate=0.01, max_grad_norm=0.0)
  optimizer = optim.make_optimizer(config)
  new, state, updates = run(optimizer, params, grads)
  mu, nu = moments(state)
  assert {x.dtype for x in jax.tree.leaves((mu, nu))} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(new)} == {jnp.dtype(jnp.bfloat16)}
  # First Adam step: -lr * g / (|g| + eps) = -0.01, added in float32, then rounded to bf16.
  np.testing.assert_allclose(updates["text"]["kernel"], -0.01, rtol=1e-5)
  expected = (jnp.float32(2.0) - 0.01).astype(jnp.bfloat16)  # 1.99 -> 1.9921875 in bf16
  np.testing.assert_array_equal(new["text"]["kernel"], expected)
  # The precision lost: an update below half the bf16 spacing at 1.0 (2^-8) vanishes.
  tiny = optim.apply_updates({"w": jnp.ones((1,), jnp.bfloat16)}, {"w": jnp.full((1,), 1e-3)})
  assert float(tiny["w"][0]) == 1.0


def test_bf16_moments_when_asked():
  config = optim.OptimizerConfig(moment_dtype="bfloat16")
  mu, nu = moments(optim.make_optimizer(config).init(params_tree()))
  assert {x.dtype for x in jax.tree.leaves((mu, nu))} == {jnp.dtype(jnp.bfloat16)}


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("field, value", [
    ("learning_rate", -1.0), ("weight_decay", -0.1), ("b2", 1.0), ("eps", 0.0),
    ("warmup_steps", -1), ("schedule", "linear"), ("min_learning_rate_ratio", 2.0),
    ("max_grad_norm", -1.0), ("freeze", ("(",)), ("freeze", "^visual/"),
    ("moment_dtype", "float16"),
])
def test_invalid_optimizer_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    optim.OptimizerConfig(**{field: value})


def test_from_config_builds_tuples_and_rejects_unknown_keys():
  config = optim.from_config({"learning_rate": 1e-5, "freeze": ["^visual/"]})
  assert config == optim.OptimizerConfig(learning_rate=1e-5, freeze=("^visual/",))
  with pytest.raises(ValueError, match="lr"):
    optim.from_config({"lr": 1e-5})


@pytest.mark.parametrize("options", [{}, {"freeze": ("^visual/",)},
                                     {"learning_rate_multipliers": (("^visual/", 0.1),)}])
def test_moments_are_sharded_like_their_params(options):
  # Left to XLA, init's zeros (which read no param) may come out replicated: the TPU compiler
  # put the 3B model's stacked MLP moments whole on every chip.
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  from balcap import parallel, train_state  # pylint: disable=import-outside-toplevel
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  rows = NamedSharding(mesh, PartitionSpec("fsdp"))
  params = {"visual": {"kernel": jax.device_put(jnp.ones((4, 2)), rows),
                       "bias": jax.device_put(jnp.ones((2,)), NamedSharding(mesh, PartitionSpec()))},
            "text": {"kernel": jax.device_put(jnp.ones((4, 3)), rows),
                     "scale": jax.device_put(jnp.ones((8,)), rows)}}
  optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-3, **options),
                                   total_steps=10)
  policy = type("Policy", (), {"params": params, "mesh": mesh})
  state = train_state.initial_state(policy, optimizer, 0)["opt_state"]
  by_param = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    key = jax.tree_util.keystr(path)
    for name in ("['visual']['kernel']", "['text']['kernel']", "['text']['scale']"):
      if key.endswith(name):
        by_param.setdefault(name, []).append(leaf.sharding.spec)
  trained = 2 if "freeze" in options else 3
  assert len(by_param) == trained and all(len(specs) == 2 for specs in by_param.values())
  assert all(spec == PartitionSpec("fsdp") for specs in by_param.values() for spec in specs)
  counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)
            if leaf.ndim == 0]
  assert counts and all(c.sharding.spec == PartitionSpec() for c in counts)


def test_stop_frozen_gives_zero_gradients_that_are_never_computed():
  params = {"visual": {"kernel": jnp.ones((64, 64))}, "lm": {"kernel": jnp.ones((64, 64))}}
  x = jnp.ones((32, 64))

  def loss(p, patterns):
    p = optim.stop_frozen(p, patterns)
    hidden = jnp.tanh(x @ p["visual"]["kernel"])
    return jnp.sum(jnp.tanh(hidden @ p["lm"]["kernel"]))

  plain = jax.grad(loss)(params, ())
  frozen = jax.grad(loss)(params, ("^visual/",))
  assert float(jnp.abs(frozen["visual"]["kernel"]).max()) == 0.0
  np.testing.assert_array_equal(frozen["lm"]["kernel"], plain["lm"]["kernel"])
  # The frozen branch's backward is gone from the compiled program, not computed and dropped:
  # the x^T @ d(hidden) matmul of the visual kernel's gradient (2 * 32 * 64 * 64 FLOPs).
  flops = lambda patterns: jax.jit(jax.grad(loss), static_argnums=1).lower(  # noqa: E731
      params, patterns).compile().cost_analysis()["flops"]
  assert flops(()) - flops(("^visual/",)) >= 2 * 32 * 64 * 64
  with pytest.raises(ValueError, match="freeze pattern"):
    optim.stop_frozen(params, ("^vision/",))
