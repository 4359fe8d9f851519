"""The sampler: G rollouts per prompt with a KV cache, in one jitted program per input shape.

    rollouts = generate(policy, policy.params, batch, rng, max_new_tokens=128, num_samples=8)

Each prompt is prefilled once (image + text); its keys and values serve its G rollouts (see
`models/decoding.py`). Decoding runs in a `lax.while_loop` that stops as soon as every row has
emitted an end-of-sequence token, with the cache carried (and updated in place) through the
loop. Prompt lengths and the vision layout are padded to buckets, so an RL run compiles a
bounded number of programs; each new one is logged.

`Rollouts.logprobs` are log-probabilities of the chosen tokens under softmax(logits /
temperature) over the full vocabulary (softmax(logits) when greedy): exactly what a trainer
computes for the same tokens (see `scoring.py`), so sampler and learner agree to float
precision. Top-k / top-p truncation and forbidden ids shape which token is drawn but are not
folded into the reported log-probability.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from balcap import parallel
from balcap.models import decoding, policy as policy_lib

log = logging.getLogger(__name__)

PROMPT_BUCKET = 64  # prompt lengths are padded up to a multiple of this


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Everything static about one sampler program (a change compiles a new one)."""
  max_new_tokens: int
  num_samples: int = 1
  temperature: float = 1.0   # 0: greedy
  top_p: float = 1.0         # nucleus: the smallest set of tokens with this much probability
  top_k: int = 0             # 0: no top-k truncation
  eos_token_ids: tuple[int, ...] = ()
  forbidden_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0
  cache_dtype: str = "float32"
  # The dtype the decoder's floating params are cast to once, before the prefill ("" = as
  # stored): its layers cast their weights to the compute dtype on use, so casting them once
  # is the same arithmetic, and the decode steps no longer gather and convert float32 weights
  # for every token (the 3B decode step on a v5e-64: 1.64 -> 0.99 GiB per chip).
  weights_dtype: str = ""
  # The decoder's weights gathered over the batch axes (data, fsdp) once per sampler call,
  # still split over `tensor`: a decode step then reads them from its own memory instead of
  # all-gathering every weight for every generated token. Costs the decoder's params x
  # weights_dtype bytes / mesh.tensor per device while sampling (`mode=compile` shows whether
  # that fits; a larger mesh.tensor divides it). False keeps the training layout.
  gather_weights: bool = True

  def __post_init__(self):
    problems = []
    if self.max_new_tokens < 1:
      problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.num_samples < 1:
      problems.append(f"num_samples={self.num_samples} must be >= 1")
    if self.temperature < 0:
      problems.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
    if not 0 < self.top_p <= 1:
      problems.append(f"top_p={self.top_p} must be in (0, 1]")
    if self.top_k < 0:
      problems.append(f"top_k={self.top_k} must be >= 0 (0 = off)")
    if problems:
      raise ValueError("invalid sampling parameters: " + "; ".join(problems))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rollouts:
  """Row r = rollout r % G of prompt r // G."""
  tokens: jax.Array    # [B * G, max_new_tokens] int32, pad_token_id after the end
  logprobs: jax.Array  # [B * G, max_new_tokens] float32, 0 after the end
  lengths: jax.Array   # [B * G] int32 generated tokens, the end-of-sequence token included
  finished: jax.Array  # [B * G] bool: ended with an end-of-sequence token


# ---------------------------------------------------------------------------------------------
# Drawing one token per row


def sample_tokens(logits: jax.Array, key: jax.Array, params: SamplingParams
                  ) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row of logits [R, V]; returns (tokens [R], logprobs [R]).

  Forbidden ids are removed, then (temperature > 0) logits are divided by the temperature,
  cut to the top k and to the nucleus of top_p, and sampled in proportion to what is left.
  Logprobs as in the module docstring.
  """
  logits = logits.astype(jnp.float32)
  scaled = logits / params.temperature if params.temperature > 0 else logits
  peak = jnp.max(scaled, axis=-1, keepdims=True)
  weights = jnp.exp(scaled - peak)  # unnormalised probabilities of the full distribution
  log_total = jnp.log(jnp.sum(weights, axis=-1)) + peak[:, 0]
  allowed = jnp.ones(logits.shape[-1], bool)
  if params.forbidden_token_ids:
    allowed = allowed.at[jnp.asarray(params.forbidden_token_ids)].set(False)
  if params.temperature == 0:
    tokens = _first_argmax(jnp.where(allowed, logits, -jnp.inf))
  else:
    weights = jnp.where(allowed, weights, 0.0)
    if params.top_k:
      kth = jax.lax.top_k(weights, params.top_k)[0][:, -1:]
      weights = jnp.where(weights >= kth, weights, 0.0)
    if params.top_p < 1:
      weights = _nucleus(weights, params.top_p)
    tokens = _draw(weights, key)
  tokens = tokens.astype(jnp.int32)
  chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
  return tokens, chosen - log_total


def _first_argmax(x: jax.Array) -> jax.Array:
  """argmax over the last axis (first index on ties), as max + compare + min: XLA's CPU
  argmax reduction is several times slower than these two plain reductions."""
  best = jnp.max(x, axis=-1, keepdims=True)
  index = jnp.arange(x.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(x == best, index, x.shape[-1]), axis=-1)


_BLOCK = 128  # vocabulary block of the two-level draw


def _draw(weights: jax.Array, key: jax.Array) -> jax.Array:
  """One index per row with probability weights / sum(weights), by inverse CDF in two levels:
  a block of 128 ids with probability its weight, then an id within it. Two small cumulative
  sums instead of one over the whole vocabulary (a long cumsum is slow on CPUs); a zero
  weight is never drawn."""
  rows, vocab = weights.shape
  blocks = -(-vocab // _BLOCK)
  padded = jnp.pad(weights, ((0, 0), (0, blocks * _BLOCK - vocab))).reshape(rows, blocks, _BLOCK)
  u_block, u_inner = jax.random.uniform(key, (2, rows, 1), jnp.float32)
  block_cdf = jnp.cumsum(padded.sum(axis=-1), axis=-1)  # [R, blocks]
  block = jnp.sum(block_cdf <= u_block * block_cdf[:, -1:], axis=-1)
  block = jnp.minimum(block, blocks - 1)
  inner_cdf = jnp.cumsum(jnp.take_along_axis(padded, block[:, None, None], axis=1)[:, 0], axis=-1)
  inner = jnp.sum(inner_cdf <= u_inner * inner_cdf[:, -1:], axis=-1)
  return block * _BLOCK + jnp.minimum(inner, _BLOCK - 1)


def _nucleus(weights: jax.Array, top_p: float) -> jax.Array:
  """Zeroes every token outside the smallest top set holding `top_p` of the probability
  (tokens tied with the last one kept are kept too)."""
  probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
  ordered = -jnp.sort(-probs, axis=-1)
  before = jnp.cumsum(ordered, axis=-1) - ordered  # probability of the strictly better ones
  kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # at least 1
  threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
  return jnp.where(probs >= threshold, weights, 0.0)


# ---------------------------------------------------------------------------------------------
# The program


def _program(module: nn.Module, params_spec: SamplingParams, mesh):
  """The jitted prefill + decode loop for one module and one set of sampling parameters."""
  group, steps = params_spec.num_samples, params_spec.max_new_tokens
  eos = jnp.asarray(params_spec.eos_token_ids or (-1,), jnp.int32)
  cache_dtype = jnp.dtype(params_spec.cache_dtype)

  module = decode_module(module)
  shardings = (decoder_shardings(module, mesh)
               if mesh is not None and params_spec.gather_weights else None)

  def run(params, inputs, start_positions, rng):
    variables = {"params": decode_params(params, params_spec.weights_dtype, shardings)}
    logits, prefix_kv = module.apply(variables, **inputs, method=module.prefill)
    cache = decoding.init_cache(prefix_kv, group, steps, cache_dtype)
    cache = _constrain_cache(cache)
    prefix_mask = inputs["attention_mask"] > 0
    rows = logits.shape[0] * group
    logits = jnp.repeat(logits, group, axis=0)
    positions = jnp.repeat(start_positions, group)
    state = dict(step=jnp.int32(0), logits=logits, cache=cache,
                 tokens=jnp.full((rows, steps), params_spec.pad_token_id, jnp.int32),
                 logprobs=jnp.zeros((rows, steps), jnp.float32),
                 lengths=jnp.zeros((rows,), jnp.int32), finished=jnp.zeros((rows,), bool))

    def body(state):
      step = state["step"]
      token, logprob = sample_tokens(state["logits"], jax.random.fold_in(rng, step), params_spec)
      done = state["finished"]
      token = jnp.where(done, params_spec.pad_token_id, token)
      logprob = jnp.where(done, 0.0, logprob)
      tokens = jax.lax.dynamic_update_slice(state["tokens"], token[:, None], (0, step))
      logprobs = jax.lax.dynamic_update_slice(state["logprobs"], logprob[:, None], (0, step))
      lengths = state["lengths"] + (~done).astype(jnp.int32)
      finished = done | jnp.isin(token, eos)
      next_logits, cache = module.apply(
          variables, token, positions + step, state["cache"],
          decoding.DecodeMask(prefix_mask, step), method=module.decode)
      return dict(step=step + 1, logits=next_logits, cache=cache, tokens=tokens,
                  logprobs=logprobs, lengths=lengths, finished=finished)

    def cond(state):
      return (state["step"] < steps) & ~jnp.all(state["finished"])

    state = jax.lax.while_loop(cond, body, state)
    return Rollouts(state["tokens"], state["logprobs"], state["lengths"], state["finished"])

  return parallel.OnMesh(jax.jit(run), mesh)


# Where both families keep the decoder (`QwenLM`: Qwen2.5-VL's and LLaVA's) in their params:
# all a decode step reads. Only it is cast: CLIP's LayerNorms use their float32 scales as
# float32, so casting the vision tower would change LLaVA's image features.
DECODER_PARAMS = "lm"
SCANNED_LAYERS = "layers"  # the decoder's stacked layers (`QwenLM` with scan_layers)


def decode_module(module: nn.Module) -> nn.Module:
  """The module the sampler runs: `module` with its decoder's layers unrolled.

  With scanned layers every decode step would slice each layer's cache out of the stacked one
  and write the updated layer back as the scan's output: the whole cache moved twice per
  generated token besides the attention's read of it. Unrolled, each layer's cache is its own
  loop-carried buffer, written in place at the new token and read once by the attention (the
  3B decode step on a v5e-64: 27.4 -> 21.7 GB; gathering the weights, 9.4 GB, 1.45x ideal).
  """
  config = module.config
  if not config.text.scan_layers:
    return module
  return module.clone(config=config.with_runtime(scan_layers=False))


def decode_params(params: Any, dtype: str, shardings: Any = None) -> Any:
  """The params as `decode_module` reads them: the decoder's stacked layers split into one
  tree per layer, its floating params wider than `dtype` cast to it ("" = as stored), and
  placed by `shardings` (`decoder_shardings`; None: as they are).

  All three happen once per sampler call, before the prefill, in one copy of the decoder's
  weights. Layers cast their weights to the compute dtype on use anyway, so the arithmetic is
  unchanged and the decode steps read half the bytes of float32 weights.
  """
  if DECODER_PARAMS not in params:
    return params
  lm = dict(params[DECODER_PARAMS])
  if dtype:
    target = jnp.dtype(dtype)

    def cast(x):
      wider = jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > target.itemsize
      return x.astype(target) if wider else x
    lm = jax.tree.map(cast, lm)
  if SCANNED_LAYERS in lm:
    stacked = lm.pop(SCANNED_LAYERS)
    count = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(count):
      lm[f"{SCANNED_LAYERS}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  if shardings is not None:
    lm = jax.lax.with_sharding_constraint(lm, shardings)
  return {**params, DECODER_PARAMS: lm}


def decoder_shardings(module: nn.Module, mesh, gathered: bool = True) -> Any:
  """Shardings of the params of `module`'s decoder (`decode_module` layout): gathered over
  the batch axes, split over `tensor` only (`gathered=False`: the training layout)."""
  family = policy_lib.family_of(module.config.MODEL_TYPE)
  boxed, _ = policy_lib.boxed_abstract_params(family, module.config)
  rules = (parallel.rules_without(parallel.BATCH_AXES) if gathered
           else parallel.LOGICAL_AXIS_RULES)
  return parallel.param_shardings(boxed[DECODER_PARAMS], mesh, rules)


def _constrain_cache(cache):
  """Cache rows over the batch axes, key/value heads over `tensor` (no-op without a mesh)."""
  def constrain(x):
    # decoding's [rows, K, length, D], one per layer (`decode_module` unrolls them)
    return nn.with_logical_constraint(x, ("batch", "kv_heads", "length", "head_dim"))
  return jax.tree.map(constrain, cache)


_PROGRAMS: dict[tuple, Any] = {}
_COMPILED_SHAPES: set[tuple] = set()


def _cached_program(module, params_spec, mesh):
  key = (module, params_spec, mesh)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = _program(module, params_spec, mesh)
  return _PROGRAMS[key]


# ---------------------------------------------------------------------------------------------
# Host side


def left_pad(batch: dict[str, Any], multiple: int) -> dict[str, Any]:
  """Prompts moved to the right end of rows padded to a multiple of `multiple` tokens.

  Decoding appends every row's tokens at the same step, so each prompt must end at the last
  column; bucketing the length bounds the number of compiled programs.
  """
  mask = np.asarray(batch["attention_mask"])
  rows, length = mask.shape
  real = mask.sum(axis=1)
  # Every host must pad to the same length: its rows join the others' in one global array.
  target = parallel.host_max(max(multiple, -(-length // multiple) * multiple))
  out = dict(batch)
  for key in ("input_ids", "attention_mask", "position_ids"):
    if key not in batch:
      continue
    value = np.asarray(batch[key])
    padded = np.zeros(value.shape[:-1] + (target,), value.dtype)
    for row in range(rows):
      source = value[..., row, :][..., mask[row] > 0]
      padded[..., row, target - real[row]:] = source
    out[key] = padded
  return out


def prepare_prompts(policy, batch: dict[str, Any], prompt_bucket: int = PROMPT_BUCKET
                    ) -> dict[str, Any]:
  """A processor batch as the sampler feeds it: positions and the vision layout added, images
  in one shard per batch shard of this host (`balcap.models.image_shards`) with bucketed
  sizes, prompts left-padded to a multiple of `prompt_bucket`."""
  shards = parallel.host_rows_multiple(policy.mesh)
  return left_pad(policy.family.prepare_batch(policy.config, batch, shards), prompt_bucket)


def sampling_params(policy, *, max_new_tokens: int, num_samples: int = 1,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    eos_token_ids: tuple[int, ...] | None = None,
                    forbidden_token_ids: tuple[int, ...] | None = None,
                    pad_token_id: int | None = None,
                    cache_dtype: str | None = None, gather_weights: bool = True
                    ) -> SamplingParams:
  """SamplingParams with the policy's defaults: end ids from its config and processor,
  forbidden ids = its image/video/vision special tokens and the embedding rows past the
  tokenizer's vocabulary, the cache in its compute dtype."""
  family, config = policy.family, policy.config
  if eos_token_ids is None:
    eos_token_ids = tuple(config.eos_token_ids)
    if policy.processor is not None:
      eos_token_ids = tuple(sorted(set(eos_token_ids) | set(policy.processor.token_ids.eos_ids)))
  if forbidden_token_ids is None:
    forbidden_token_ids = tuple(family.special_token_ids(config))
    if policy.processor is not None:
      # Rows of an embedding padded past the tokenizer (Qwen: 151936 rows, 151665 tokens; the
      # tiny demo: 896 for 865, so the vocab shards) are no token at all: never sample them.
      known = policy.processor.tokenizer.get_vocab_size(with_added_tokens=True)
      forbidden_token_ids += tuple(range(known, policy.config.text.vocab_size))
  if pad_token_id is None:
    pad_token_id = policy.processor.token_ids.pad_id if policy.processor is not None else 0
  return SamplingParams(max_new_tokens, num_samples, float(temperature), float(top_p),
                        int(top_k), tuple(eos_token_ids), tuple(forbidden_token_ids),
                        int(pad_token_id), cache_dtype or family.compute_dtype(config),
                        family.compute_dtype(config), gather_weights)


def generate(policy, params: Any, batch: dict[str, Any], rng: jax.Array, *,
             max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_token_ids: tuple[int, ...] | None = None,
             forbidden_token_ids: tuple[int, ...] | None = None, pad_token_id: int | None = None,
             cache_dtype: str | None = None, prompt_bucket: int = PROMPT_BUCKET,
             gather_weights: bool = True) -> Rollouts:
  """num_samples rollouts of every prompt of a processor batch (see the module docstring).

  Defaults come from the policy (see `sampling_params`). The same seed, inputs and mesh give
  the same rollouts.
  """
  spec = sampling_params(policy, max_new_tokens=max_new_tokens, num_samples=num_samples,
                         temperature=temperature, top_p=top_p, top_k=top_k,
                         eos_token_ids=eos_token_ids, forbidden_token_ids=forbidden_token_ids,
                         pad_token_id=pad_token_id, cache_dtype=cache_dtype,
                         gather_weights=gather_weights)
  prepared = prepare_prompts(policy, batch, prompt_bucket)
  start = policy.family.decode_start(policy.config, prepared).astype(np.int32)
  inputs = parallel.global_inputs(policy_lib.model_inputs(prepared), policy.mesh)
  return generate_prepared(policy, params, inputs, start, rng, spec)


def generate_prepared(policy, params: Any, inputs: dict[str, Any], start: np.ndarray,
                      rng: jax.Array, spec: SamplingParams) -> Rollouts:
  """`generate` on prompts already prepared (`prepare_prompts`) and placed on the devices;
  `start` [B] on the host (this host's prompts) or placed too."""
  signature = (spec, tuple((jax.tree_util.keystr(path), np.shape(leaf))
                           for path, leaf in jax.tree_util.tree_leaves_with_path(inputs)))
  if signature not in _COMPILED_SHAPES:
    _COMPILED_SHAPES.add(signature)
    log.info("sampler: compiling program #%d (batch %s, prompt length %d, G=%d, %d new tokens)",
             len(_COMPILED_SHAPES), inputs["input_ids"].shape[0], inputs["input_ids"].shape[1],
             spec.num_samples, spec.max_new_tokens)
  program = _cached_program(policy.module, spec, policy.mesh)
  if not isinstance(start, jax.Array):
    start = parallel.global_inputs({"start": np.asarray(start, np.int32)}, policy.mesh)["start"]
  return program(params, inputs, start, rng)


def compiled_programs() -> int:
  """How many distinct sampler programs this process has compiled (shapes x parameters)."""
  return len(_COMPILED_SHAPES)
