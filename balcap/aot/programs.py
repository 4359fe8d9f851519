"""Every program one RL step (and SFT) runs, lowered with abstract inputs on a target mesh.

Nothing is allocated and no weights are read: params, optimizer state and batches are
`jax.ShapeDtypeStruct`s carrying the shardings a run gives them, built from the config alone
(the architecture, or a checkpoint's config.json). Batches have the shapes of the configured
settings: `rl.batch_size` prompts with one `compile.image_size` image each, G rollouts of
`sampling.max_new_tokens` tokens (the longest the update can see), `rl.micro_batch_size`.
Each program comes with its ideal cost (`ideal.py`) for the report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from balcap import models, optim, parallel, sampling, scoring, sft
from balcap.aot import ideal
from balcap.models import decoding, policy as policy_lib
from balcap.rl import losses, update

# The programs, in the order a step runs them.
PROGRAMS = ("sample", "sample_prefill", "sample_decode_step", "score", "update", "sft")


@dataclasses.dataclass
class Program:
  """One program to compile. Its memory is that of `lower()`; its FLOPs and bytes are
  sum(coefficient x cost) over `cost_parts` (default: `lower` itself), each part lowered with
  every layer scan unrolled: XLA's cost analysis counts a loop body once, so loops must be
  unrolled (layers) or measured at two trip counts and extrapolated (micro-batches)."""
  name: str
  lower: Callable[[], Any]      # -> jax.stages.Lowered
  ideal_flops: float            # per device
  ideal_bytes: float            # per device
  repeats: int = 1              # how often one step runs it (decode step: new tokens)
  note: str = ""
  cost_parts: list[tuple[float, Callable[[], Any]]] | None = None

  def costs(self) -> list[tuple[float, Callable[[], Any]]]:
    """[] = no costs measured (memory only)."""
    return self.cost_parts if self.cost_parts is not None else [(1.0, self.lower)]


def family_config(config):
  """The family and its config for `config.model` (architecture, else the checkpoint's)."""
  m = config.model
  if m.architecture:
    architecture = models.architecture_from_config(m)
    return models.family_of(architecture.MODEL_TYPE), architecture
  family, found = policy_lib.checkpoint_config(m.checkpoint)
  return family, found.with_runtime(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                                    scan_layers=m.scan_layers)


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


def abstract_inputs(arrays: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
  """Host arrays as ShapeDtypeStructs sharded the way `parallel.global_inputs` places them."""
  def abstract(value, sharding):
    return jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype, sharding=sharding)
  return {k: jax.tree.map(lambda v, s=parallel.input_sharding(k, mesh): abstract(v, s), value)
          for k, value in arrays.items()}


class Builder:
  """The abstract params, state and batches of one config on one mesh."""

  def __init__(self, config, mesh: Mesh):
    self.config, self.mesh = config, mesh
    self.family, self.model_config = family_config(config)
    self.module = self.family.module(self.model_config)
    # A policy without params: enough for the host-side preparation of batches.
    self.policy = models.Policy(self.family, self.model_config, None, None, mesh)
    boxed, _ = policy_lib.boxed_abstract_params(self.family, self.model_config)
    self.params = _abstract(nn.unbox(boxed), parallel.param_shardings(boxed, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    self.replicated = replicated
    self.rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                    sharding=replicated)
    # Both families keep the decoder under "lm"; the rest is the vision tower and projector.
    leaves = jax.tree_util.tree_leaves_with_path(self.params)
    self.text_params = sum(int(np.prod(x.shape)) for p, x in leaves
                           if jax.tree_util.keystr(p).startswith("['lm']"))
    self.vision_params = sum(int(np.prod(x.shape)) for _, x in leaves) - self.text_params
    self.dims = ideal.dims_of(self.model_config)
    self.compute_bytes = jnp.dtype(self.model_config.text.dtype).itemsize
    self.devices = mesh.size
    self.tensor = mesh.shape["tensor"]
    self.batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]

  # Host-side batches of real shapes -------------------------------------------------------

  def prompts(self, rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(processor-style batch, prepared prompts) of `rows` prompts with one image each."""
    c = self.config
    raw = self.family.example_batch(self.model_config, rows, tuple(c.compile.image_size),
                                    c.compile.prompt_text_tokens)
    return raw, sampling.prepare_prompts(self.policy, raw, c.sampling.prompt_bucket)

  def patches_per_image(self, raw: dict[str, Any]) -> int:
    pixels = raw["pixel_values"]
    return (pixels.shape[0] // raw["input_ids"].shape[0] if pixels.ndim == 2
            else self.model_config.vision.grid ** 2 + 1)

  def spec(self) -> sampling.SamplingParams:
    c = self.config
    return sampling.sampling_params(self.policy, max_new_tokens=c.sampling.max_new_tokens,
                                    num_samples=c.rl.group_size,
                                    temperature=c.sampling.temperature, top_p=c.sampling.top_p,
                                    top_k=c.sampling.top_k,
                                    gather_weights=c.sampling.gather_weights)

  def state(self, optimizer) -> dict[str, Any]:
    # Placed as a run places them (train_state.initial_state): moments like their params.
    opt_shapes = jax.eval_shape(optimizer.init, self.params)
    opt_state = _abstract(opt_shapes,
                          optim.state_shardings(optimizer, self.params, self.replicated))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
    return {"params": self.params, "opt_state": opt_state, "step": step, "rng": self.rng}

  # Ideal costs ------------------------------------------------------------------------------

  def weight_bytes(self, vision: bool = True) -> float:
    """Bytes of every weight (of the decoder alone: `vision=False`) in the compute dtype that
    one device reads for one use."""
    count = self.text_params + (self.vision_params if vision else 0)
    return count * self.compute_bytes / self.tensor

  def residual_bytes(self, rows: int, tokens: int, passes: int) -> float:
    """The decoder's residual-stream bytes on one device for `rows` x `tokens` (rows are split
    over data x fsdp; each tensor shard holds the whole hidden state)."""
    return ideal.residual_bytes(self.dims, rows * tokens / self.batch_shards,
                                self.compute_bytes, passes)

  def training_bytes(self, micro: int, residual_forward: float) -> float:
    """`ideal.training_bytes` of one pass of this model on one device."""
    decoder = self.weight_bytes(vision=False)
    return ideal.training_bytes(decoder, self.weight_bytes() - decoder,
                                (self.text_params + self.vision_params) / self.devices, micro,
                                self.model_config.text.remat != "none", residual_forward)

  def forward_flops(self, rows, tokens, context, scored, images, patches) -> float:
    return (ideal.text_flops(self.dims, rows, tokens, context, scored)
            + ideal.vision_flops(self.model_config, self.dims, images, patches))

  def training_factor(self) -> int:
    return 4 if self.model_config.text.remat != "none" else 3

  # The programs -----------------------------------------------------------------------------

  def programs(self, names) -> list[Program]:
    c, out = self.config, []
    rows = c.rl.batch_size
    group, steps = c.rl.group_size, c.sampling.max_new_tokens
    raw, prepared = self.prompts(rows)
    patches = self.patches_per_image(raw)
    prompt_length = prepared["input_ids"].shape[1]
    inputs = abstract_inputs(policy_lib.model_inputs(prepared), self.mesh)
    start = jax.ShapeDtypeStruct((rows,), jnp.int32,
                                 sharding=parallel.input_sharding("start", self.mesh))
    spec = self.spec()
    prefill_flops = self.forward_flops(rows, prompt_length, prompt_length, 1, rows, patches)
    rollouts = rows * group
    context = prompt_length + steps
    decode_flops = self.forward_flops(rollouts, 1, context, 1, 0, 0)
    kv_bytes = (2 * self.dims.text_layers * self.dims.kv_heads * self.dims.head_dim
                * jnp.dtype(spec.cache_dtype).itemsize)
    # A decode step reads each row's prefix and suffix keys/values and writes one token's.
    cache_read = (rows * prompt_length + rollouts * steps) * kv_bytes
    decode_bytes = (self.weight_bytes(vision=False)
                    + (cache_read + rollouts * kv_bytes) / self.batch_shards / self.tensor)
    if "sample" in names:
      program = sampling._program(self.module, spec, self.mesh)  # pylint: disable=protected-access
      # No costs here: XLA's cost analysis counts the decode loop's body once, so this row
      # holds the sampler's memory (no cost-only copy of the whole loop is compiled); its
      # time is sample_prefill + steps x sample_decode_step.
      out.append(Program("sample", lambda: program.lower(self.params, inputs, start, self.rng),
                         0.0, 0.0,
                         note=f"{rows} prompts x G {group}, {steps} new tokens, prompt "
                              f"{prompt_length}", cost_parts=[]))
    if "sample_prefill" in names or "sample_decode_step" in names:
      out += self._sampler_parts(names, inputs, spec, prefill_flops, decode_flops,
                                 decode_bytes, steps)
    if not {"score", "update"} & set(names):
      return out + (self._sft() if "sft" in names else [])
    total = prompt_length + steps
    score_flops = self.forward_flops(rollouts, total, total, steps, rows, patches)
    micro = rollouts // c.rl.micro_batch_size if c.rl.micro_batch_size else 1
    if "score" in names:
      temperature = c.sampling.temperature or 1.0

      def lowered_score(num_micro: int, num_rows: int):
        with parallel.mesh_context(self.mesh):
          return scoring._continuation_logprobs.lower(  # pylint: disable=protected-access
              self.module, self.params, self.continuations(inputs, num_rows), temperature,
              num_micro)
      # Costs as the update's (below): 1 and 2 micro-batches of the real size, extrapolated.
      size = rollouts // micro
      parts = [(2.0 - micro, lambda: lowered_score(1, size))]
      if micro > 1:
        parts.append((micro - 1.0, lambda: lowered_score(2, 2 * size)))
      out.append(Program(
          "score", lambda: lowered_score(micro, rollouts),
          score_flops / self.devices,
          # the decoder's weights once per micro-batch, the vision tower's once, the
          # residual stream forward
          micro * self.weight_bytes(vision=False) + self.weight_bytes() - self.weight_bytes(
              vision=False) + self.residual_bytes(rollouts, total, passes=2),
          note=f"{rollouts} rollouts of {prompt_length} + {steps} tokens, {micro} "
               "micro-batches", cost_parts=parts))
    if "update" in names:
      out.append(self._update(inputs, rollouts, micro, score_flops))
    if "sft" in names:
      out += self._sft()
    return out

  def continuations(self, prompt_inputs: dict[str, Any], rows: int) -> scoring.Continuations:
    """An abstract continuation batch of `rows` rollouts of the configured length, with the
    images of every prompt (what the scoring and update programs see: fewer rows than the
    whole batch only where costs are measured per micro-batch)."""
    steps = self.config.sampling.max_new_tokens
    prompt_length = prompt_inputs["input_ids"].shape[1]
    row = parallel.input_sharding("tokens", self.mesh)
    struct = lambda shape, key="tokens": jax.ShapeDtypeStruct(  # noqa: E731
        shape, jnp.int32, sharding=parallel.input_sharding(key, self.mesh))
    length = prompt_length + steps
    batch_rows = {"input_ids": struct((rows, length)),
                  "attention_mask": struct((rows, length)),
                  "position_ids": struct((3, rows, length), "position_ids")}
    if "image_row_offsets" in prompt_inputs:
      batch_rows["image_row_offsets"] = struct((rows,))
    images = {k: prompt_inputs[k] for k in scoring.IMAGE_INPUTS if k in prompt_inputs}
    tokens = jax.ShapeDtypeStruct((rows, steps), jnp.int32, sharding=row)
    return scoring.Continuations(batch_rows, images, tokens, tokens, prompt_length)

  def decode_params(self, spec: sampling.SamplingParams) -> Any:
    """The abstract params the sampler runs on (`sampling.decode_params`), placed as it
    places them."""
    module = sampling.decode_module(self.module)
    shapes = jax.eval_shape(lambda p: sampling.decode_params(p, spec.weights_dtype),
                            self.params)
    decoder = sampling.decoder_shardings(module, self.mesh, spec.gather_weights)
    struct = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    lm = sampling.DECODER_PARAMS
    return {**{k: v for k, v in self.params.items() if k != lm},
            lm: jax.tree.map(struct, shapes[lm], decoder)}

  def _sampler_parts(self, names, inputs, spec, prefill_flops, decode_flops, decode_bytes,
                     steps) -> list[Program]:
    # The sampler's own module and params (`sampling.decode_module`, `decode_params`): the
    # decoder's layers unrolled, its weights cast once before the prefill.
    module = sampling.decode_module(self.module)
    params = self.decode_params(spec)
    out = []

    def prefill(params, inputs):
      return module.apply({"params": params}, **inputs, method=module.prefill)
    prefill_program = parallel.OnMesh(jax.jit(prefill), self.mesh)
    if "sample_prefill" in names:
      out.append(Program("sample_prefill", lambda: prefill_program.lower(params, inputs),
                         prefill_flops / self.devices,
                         self.weight_bytes() + self.residual_bytes(
                             inputs["input_ids"].shape[0], inputs["input_ids"].shape[1], 2)))
    if "sample_decode_step" in names:
      group = spec.num_samples
      with parallel.mesh_context(self.mesh):
        _, prefix_kv = jax.eval_shape(prefill, params, inputs)
        cache_shapes = jax.eval_shape(
            lambda kv: decoding.init_cache(kv, group, steps, jnp.dtype(spec.cache_dtype)),
            prefix_kv)
      cache = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.logical_sharding(
              self.mesh, ("batch", "kv_heads", "length", "head_dim"))), cache_shapes)
      rollouts = inputs["input_ids"].shape[0] * group
      rows = parallel.input_sharding("tokens", self.mesh)
      token = jax.ShapeDtypeStruct((rollouts,), jnp.int32, sharding=rows)
      prefix_mask = jax.ShapeDtypeStruct(inputs["attention_mask"].shape, jnp.bool_,
                                         sharding=inputs["attention_mask"].sharding)
      step = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)

      def decode_step(params, token, positions, cache, prefix_mask, step):
        return module.apply({"params": params}, token, positions, cache,
                            decoding.DecodeMask(prefix_mask, step), method=module.decode)
      program = parallel.OnMesh(jax.jit(decode_step, donate_argnums=(3,)), self.mesh)
      out.append(Program("sample_decode_step",
                         lambda: program.lower(params, token, token, cache, prefix_mask, step),
                         decode_flops / self.devices, decode_bytes, repeats=steps,
                         note="one generated token for every rollout"))
    return out

  def _update(self, prompt_inputs, rollouts, micro, score_flops) -> Program:
    c = self.config
    rl = c.rl
    optimizer = optim.make_optimizer(optim.from_config(rl.optimizer), total_steps=rl.num_steps)
    loss_config = losses.from_config(rl.loss)
    state = self.state(optimizer)
    passes = rl.num_inner_updates
    row = parallel.input_sharding("tokens", self.mesh)

    def lowered(num_micro: int, num_passes: int, rows: int):
      program = update.make_update(
          self.module, optimizer, loss_config, num_micro_batches=num_micro,
          num_passes=num_passes, temperature=c.sampling.temperature or 1.0, mesh=self.mesh)
      continuations = self.continuations(prompt_inputs, rows)
      logprobs = jax.ShapeDtypeStruct(continuations.tokens.shape, jnp.float32, sharding=row)
      batch = update.RolloutBatch(
          continuations, logprobs, jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=row),
          logprobs if loss_config.kl_coef > 0 else None)
      return program.lower(state, batch)

    # Costs: one pass with 1 and with 2 micro-batches of the real size (each with every
    # prompt's images, encoded once per pass as in the real program; the micro-batch loop
    # unrolled like the layers): C(n) = C1 + (n - 1)(C2 - C1), times the passes.
    size = rollouts // micro
    parts = [(passes * (2.0 - micro), lambda: lowered(1, 1, size))]
    if micro > 1:
      parts.append((passes * (micro - 1.0), lambda: lowered(2, 1, 2 * size)))
    length = prompt_inputs["input_ids"].shape[1] + c.sampling.max_new_tokens
    ideal_bytes = passes * self.training_bytes(micro, self.residual_bytes(size, length, 2))
    return Program("update", lambda: lowered(micro, passes, rollouts),
                   passes * self.training_factor() * score_flops / self.devices, ideal_bytes,
                   note=f"{rollouts} rollouts, {micro} micro-batches, {passes} pass(es), remat "
                        f"{self.model_config.text.remat}", cost_parts=parts)

  def _sft(self) -> list[Program]:
    c = self.config
    if c.sft.num_steps <= 0:
      return []
    rows, length = c.sft.batch_size, c.sft.max_length
    probe = self.family.example_batch(self.model_config, 1, tuple(c.compile.image_size), 1)
    text = max(1, length - probe["input_ids"].shape[1] + 1)
    raw = self.family.example_batch(self.model_config, rows, tuple(c.compile.image_size), text)
    prepared = self.family.prepare_batch(self.model_config, raw,
                                         parallel.host_rows_multiple(self.mesh))
    prepared["loss_mask"] = np.ones_like(prepared["input_ids"], np.int32)
    inputs = abstract_inputs(dict(policy_lib.model_inputs(prepared),
                                  loss_mask=prepared["loss_mask"]), self.mesh)
    optimizer = optim.make_optimizer(optim.from_config(c.sft.optimizer),
                                     total_steps=c.sft.num_steps)
    program = sft.make_step(self.module, optimizer, self.mesh)
    state = self.state(optimizer)
    tokens = prepared["input_ids"].shape[1]
    flops = self.training_factor() * self.forward_flops(
        rows, tokens, tokens, tokens, rows, self.patches_per_image(raw))
    return [Program("sft", lambda: program.lower(state, inputs), flops / self.devices,
                    self.training_bytes(1, self.residual_bytes(rows, tokens, 2)),
                    note=f"{rows} chats of {tokens} tokens")]
