"""The optimiser: AdamW with warmup + constant/cosine learning rate, global-norm clipping of the
raw gradients, frozen parameter groups without optimizer state, float32 moments and updates.

The chain, in order, for the trainable parameters:
  1. gradients cast to float32 (bf16 gradients would clip and square in 8 mantissa bits);
  2. clipping to `max_grad_norm` by the GLOBAL norm of the raw gradients, BEFORE Adam (Adam
     normalises per coordinate, so clipping after it would bound nothing useful);
  3. Adam moments kept in `moment_dtype` (float32 by default, whatever the param dtype);
  4. decoupled weight decay (AdamW), only on parameters with >= 2 dimensions: weight
     matrices and embeddings. 1-D parameters (norm scales, biases) and scalars are not decayed,
     as is standard: decaying a norm scale towards 0 fights the normalisation it exists for;
  5. scaling by -learning_rate(step), times a per-group multiplier where a
     `learning_rate_multipliers` regex matches (e.g. a faster or slower vision tower).
Parameters whose "/"-joined path (relative to the tree given to `init`: the model's params
without the "params" collection, e.g. "visual/blocks/0/attn/qkv/kernel") matches a `freeze` regex
(`re.search`) get a zero update and no state at all (optax.multi_transform with set_to_zero):
freezing the vision tower saves its Adam memory. The SFT step and the RL update also stop their
gradients (`stop_frozen`), so a frozen tower's backward pass is never computed.

Updates come out in float32; `apply_updates` adds them to the params in float32 and casts back
to each param's dtype.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from balcap import configs

SCHEDULES = ("constant", "cosine")
MOMENT_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Everything `make_optimizer` needs; `from_config(section)` builds it."""
  learning_rate: float = 1e-6        # peak learning rate (after warmup)
  weight_decay: float = 0.0          # AdamW's decoupled decay, on >= 2-D params only
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  warmup_steps: int = 0              # linear warmup from 0 to learning_rate over these steps
  schedule: str = "constant"         # after warmup: constant | cosine
  # cosine: the step at which the rate reaches its minimum, counted from step 0 (warmup
  # included, as optax.warmup_cosine_decay_schedule); 0 = the `total_steps` of make_optimizer.
  decay_steps: int = 0
  min_learning_rate_ratio: float = 0.0  # cosine ends at learning_rate * this
  max_grad_norm: float = 1.0         # global-norm clipping of the raw gradients (0 = off)
  freeze: tuple[str, ...] = ()       # regexes over "/"-joined param paths, e.g. "^visual/"
  moment_dtype: str = "float32"      # Adam mu and nu; float32 even for bfloat16 params
  # ((regex, multiplier), ...): a param whose path matches gets learning_rate * multiplier (the
  # first matching pair wins; weight decay scales with it, as AdamW's does with the rate),
  # e.g. (("^visual/", 10.0),) trains the vision tower and merger ten times faster.
  learning_rate_multipliers: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    problems = []
    if not self.learning_rate >= 0:
      problems.append(f"learning_rate={self.learning_rate} must be >= 0")
    if self.weight_decay < 0:
      problems.append(f"weight_decay={self.weight_decay} must be >= 0")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      problems.append(f"b1={self.b1} and b2={self.b2} must be in [0, 1)")
    if not self.eps > 0:
      problems.append(f"eps={self.eps} must be > 0")
    if self.warmup_steps < 0 or self.decay_steps < 0:
      problems.append(f"warmup_steps={self.warmup_steps} and decay_steps={self.decay_steps} "
                      "must be >= 0")
    if self.schedule not in SCHEDULES:
      problems.append(f"schedule={self.schedule!r} is not one of {list(SCHEDULES)}")
    if self.schedule == "cosine" and self.decay_steps and self.decay_steps <= self.warmup_steps:
      problems.append(f"decay_steps={self.decay_steps} must exceed warmup_steps="
                      f"{self.warmup_steps} (decay_steps counts from step 0, warmup included)")
    if not 0 <= self.min_learning_rate_ratio <= 1:
      problems.append(f"min_learning_rate_ratio={self.min_learning_rate_ratio} must be in [0, 1]")
    if self.max_grad_norm < 0:
      problems.append(f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 = off)")
    if isinstance(self.freeze, str):
      problems.append(f"freeze={self.freeze!r} must be a tuple of regexes, e.g. ('^visual/',)")
    else:
      for pattern in self.freeze:
        try:
          re.compile(pattern)
        except re.error as e:
          problems.append(f"freeze pattern {pattern!r} is not a regex: {e}")
    for pair in self.learning_rate_multipliers:
      if (isinstance(pair, str) or len(pair) != 2 or not isinstance(pair[0], str)
          or not isinstance(pair[1], (int, float))):
        problems.append(f"learning_rate_multipliers entry {pair!r} must be a (regex, "
                        "multiplier) pair, e.g. ('^visual/', 10.0)")
        continue
      try:
        re.compile(pair[0])
      except re.error as e:
        problems.append(f"learning_rate_multipliers pattern {pair[0]!r} is not a regex: {e}")
      if not pair[1] >= 0:
        problems.append(f"learning_rate_multipliers {pair[0]!r}: multiplier {pair[1]} must be "
                        ">= 0")
    if self.moment_dtype not in MOMENT_DTYPES:
      problems.append(f"moment_dtype={self.moment_dtype!r} is not one of {list(MOMENT_DTYPES)}")
    if problems:
      raise ValueError("invalid optimizer config: " + "; ".join(problems))


def from_config(section: Mapping[str, Any]) -> OptimizerConfig:
  """OptimizerConfig from a config section (a ConfigDict or dict); unknown keys are an error."""
  values = configs.known_options(OptimizerConfig, section, "optimizer")
  if "freeze" in values and not isinstance(values["freeze"], str):
    values["freeze"] = tuple(values["freeze"])
  if "learning_rate_multipliers" in values:
    values["learning_rate_multipliers"] = tuple(
        tuple(pair) if isinstance(pair, (list, tuple)) else pair
        for pair in values["learning_rate_multipliers"])
  return OptimizerConfig(**values)


# ---------------------------------------------------------------------------------------------
# Learning rate


def learning_rate_schedule(config: OptimizerConfig, total_steps: int | None = None
                           ) -> Callable[[jax.Array | int], jax.Array]:
  """step -> learning rate (float32): linear from 0 at step 0 to `learning_rate` at
  `warmup_steps` (so the update of step 0 is zero when warming up, as in optax), then constant,
  or a cosine from `learning_rate` to `learning_rate * min_learning_rate_ratio` at step
  `decay_steps` (or `total_steps`), flat after it."""
  peak, warmup = config.learning_rate, config.warmup_steps
  end = config.decay_steps or total_steps
  if config.schedule == "cosine" and not end:
    raise ValueError("optimizer schedule='cosine' needs decay_steps > 0 or total_steps")
  if config.schedule == "cosine" and end <= warmup:
    raise ValueError(f"cosine decay ends at step {end}, not after warmup_steps={warmup}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warming = peak * step / max(warmup, 1)
    if config.schedule == "constant":
      after = jnp.full_like(step, peak)
    else:
      progress = jnp.clip((step - warmup) / (end - warmup), 0.0, 1.0)
      floor = config.min_learning_rate_ratio
      after = peak * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    return jnp.where(step < warmup, warming, after)

  return schedule


# ---------------------------------------------------------------------------------------------
# Pieces of the chain


def grad_norm(grads: Any) -> jax.Array:
  """Global L2 norm of a gradient pytree, accumulated in float32 (for clipping and logging)."""
  leaves = jax.tree.leaves(grads)
  return jnp.sqrt(sum((jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves),
                      jnp.zeros([], jnp.float32)))


def _to_float32() -> optax.GradientTransformation:
  return optax.stateless(lambda updates, params: jax.tree.map(
      lambda u: u.astype(jnp.float32), updates))


def state_shardings(optimizer: optax.GradientTransformation, params: Any, default: Any) -> Any:
  """Where `optimizer.init(params)`'s leaves belong: each copy of the param tree in the state
  (Adam's mu and nu) sharded like the params, everything else (step counts) at `default`.

  `params` are arrays or ShapeDtypeStructs carrying shardings. Jitting `init` without these
  leaves the choice to XLA, and its zeros depend on no param: the TPU compiler replicated the
  3B model's stacked MLP moments (6 x 3 GiB per chip), which alone kept its update off a
  v5e-64."""
  # A state leaf is a copy of a param when its path ends with the param's path (mu['lm'][...]
  # in whichever wrapper: multi_transform, masked, chain) and its shape is the param's.
  by_path = {jax.tree_util.keystr(path): leaf
             for path, leaf in jax.tree_util.tree_leaves_with_path(params)}

  def place(path, leaf):
    for start in range(len(path)):
      param = by_path.get(jax.tree_util.keystr(path[start:]))
      if param is not None and tuple(param.shape) == tuple(leaf.shape):
        return param.sharding
    return default
  return jax.tree_util.tree_map_with_path(place, jax.eval_shape(optimizer.init, params))


def _clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  def clip(updates, params):
    del params
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(grad_norm(updates), 1e-30))
    return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
  return optax.stateless(clip)


def _scale_by_adam(b1: float, b2: float, eps: float, moment_dtype) -> optax.GradientTransformation:
  """Adam's direction with mu and nu stored in `moment_dtype` and computed in float32,
  whatever the params' dtype (optax.scale_by_adam keeps nu in the param dtype). The state is
  optax's ScaleByAdamState, so optax's tree utilities find it."""

  def init(params):
    zeros = lambda p: jnp.zeros_like(p, dtype=moment_dtype)  # noqa: E731 (placed: state_shardings)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=jax.tree.map(zeros, params),
                                  nu=jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    mu = jax.tree.map(lambda m, g: b1 * f32(m) + (1 - b1) * f32(g), state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), state.nu,
                      updates)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    mu_correction, nu_correction = 1 - b1 ** t, 1 - b2 ** t
    direction = jax.tree.map(
        lambda m, v: (m / mu_correction) / (jnp.sqrt(v / nu_correction) + eps), mu, nu)
    cast = lambda tree: jax.tree.map(lambda x: x.astype(moment_dtype), tree)  # noqa: E731
    return direction, optax.ScaleByAdamState(count=count, mu=cast(mu), nu=cast(nu))

  return optax.GradientTransformation(init, update)


def _decay_mask(params: Any) -> Any:
  """True for params with >= 2 dimensions (decayed); False for norms, biases, scalars."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def param_path(path: tuple) -> str:
  """A jax key path as "a/b/0", the form `freeze` regexes match."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _matching(params: Any, patterns: tuple[str, ...], field: str) -> Any:
  """Per leaf, the index of the first pattern its path matches, or -1. A pattern that matches
  nothing is an error naming `field` (a typo would otherwise silently change nothing)."""
  compiled = [re.compile(p) for p in patterns]
  used = set()

  def first(path, _):
    name = param_path(path)
    hits = [i for i, p in enumerate(compiled) if p.search(name)]
    used.update(hits)
    return hits[0] if hits else -1

  matches = jax.tree_util.tree_map_with_path(first, params)
  unused = [p for i, p in enumerate(patterns) if i not in used]
  if unused:
    names = [param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    raise ValueError(f"optimizer {field} pattern(s) {unused} match no parameter; paths look "
                     f"like {names[:5]}")
  return matches


def _scale_by_multipliers(pairs: tuple[tuple[str, float], ...]) -> optax.GradientTransformation:
  """Multiplies each update by the multiplier of the first pair whose regex matches its path."""
  patterns = tuple(p for p, _ in pairs)

  def init(params):
    _matching(params, patterns, "learning_rate_multipliers")  # fail at init, not in a trace
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    matches = _matching(updates, patterns, "learning_rate_multipliers")
    scaled = jax.tree.map(lambda u, i: u if i < 0 else u * jnp.asarray(pairs[i][1], u.dtype),
                          updates, matches)
    return scaled, state

  return optax.GradientTransformation(init, update)


def freeze_labels(params: Any, patterns: tuple[str, ...]) -> Any:
  """"frozen" for params whose path matches a pattern, else "trainable". A pattern that matches
  nothing is an error (a typo would otherwise silently train everything)."""
  return jax.tree.map(lambda i: "trainable" if i < 0 else "frozen",
                      _matching(params, patterns, "freeze"))


def stop_frozen(params: Any, patterns: tuple[str, ...]) -> Any:
  """`params` with `lax.stop_gradient` on every leaf a `freeze` pattern matches. A step applies
  it before its loss: the frozen leaves' gradients are then constant zeros, so XLA never
  computes them (the optimizer discards them anyway), and a frozen vision tower costs no
  backward pass at all."""
  if not patterns:
    return params
  matches = _matching(params, tuple(patterns), "freeze")
  return jax.tree.map(lambda p, i: p if i < 0 else jax.lax.stop_gradient(p), params, matches)


# ---------------------------------------------------------------------------------------------
# The optimizer


def make_optimizer(config: OptimizerConfig, total_steps: int | None = None
                   ) -> optax.GradientTransformation:
  """The AdamW chain of the module docstring. `total_steps` is the cosine length when
  `config.decay_steps` is 0. Apply its updates with `apply_updates`."""
  chain = [_to_float32()]
  if config.max_grad_norm > 0:
    chain.append(_clip_by_global_norm(config.max_grad_norm))
  chain.append(_scale_by_adam(config.b1, config.b2, config.eps, jnp.dtype(config.moment_dtype)))
  if config.weight_decay > 0:
    chain.append(optax.add_decayed_weights(config.weight_decay, mask=_decay_mask))
  chain.append(optax.scale_by_learning_rate(learning_rate_schedule(config, total_steps)))
  if config.learning_rate_multipliers:
    chain.append(_scale_by_multipliers(config.learning_rate_multipliers))
  trainable = optax.chain(*chain)
  if not config.freeze:
    return trainable
  return optax.multi_transform(
      {"trainable": trainable, "frozen": optax.set_to_zero()},
      lambda params: freeze_labels(params, config.freeze))


def apply_updates(params: Any, updates: Any) -> Any:
  """params + updates, added in float32 and cast back to each param's dtype.

  With bfloat16 params (8 significant bits) an update smaller than about 2^-9 of the param's
  magnitude rounds away entirely: at learning rates near 1e-6 most of a step is lost. Keep
  float32 master weights for training (`config.model.param_dtype`) where memory allows.
  """
  return jax.tree.map(
      lambda p, u: (p.astype(jnp.float32) + u.astype(jnp.float32)).astype(p.dtype),
      params, updates)
