"""One policy interface over every model family: load, run, save, initialise.

    policy = load_pretrained("/ckpt/Qwen2.5-VL-7B-Instruct", dtype="bfloat16", mesh=mesh)
    batch = policy.processor(prompts=["Describe this image."], images=[image])
    logits = policy.apply(policy.params, batch)          # [B, T, V] float32
    policy.save_pretrained("/ckpt/mine")                  # transformers loads it back

A `Family` holds what differs between architectures (config parsing, module, checkpoint rules,
host-side input preparation, processor); everything here is shared.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from balcap import parallel, paths
from balcap.models import hf_io

# Files that travel with the weights: tokenizer and processor settings.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "preprocessor_config.json", "chat_template.json",
                   "generation_config.json", "vocab.json", "merges.txt", "processor_config.json")


# The floating dtypes a policy stores or computes in, by the names config.json and configs use.
DTYPES = ("float32", "bfloat16", "float16")


def dtype_name(dtype: Any, what: str = "dtype") -> str | None:
  """The canonical name ("float32", "bfloat16", "float16") of a dtype given as a string, a
  numpy or JAX dtype or scalar type (jnp.float32, np.dtype("float32"), ...); None stays None.

  Names are what travels beyond the API: configs, checkpoints' config.json (transformers reads
  only names there). Anything else is refused here, naming `what`.
  """
  if dtype is None or (isinstance(dtype, str) and not dtype):
    return None
  try:
    name = jax.numpy.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise ValueError(f"{what}={dtype!r} is not a dtype a policy can use; give one of "
                     f"{list(DTYPES)} (as a string, or the numpy/JAX dtype)")
  return name


class TowersConfig:
  """Mixin of the family configs: a dataclass with `text` and `vision` sub-configs (each with
  dtype, param_dtype, remat; the text one with scan_layers) and the class's MODEL_TYPE."""
  MODEL_TYPE = ""
  _RUNTIME = ("dtype", "param_dtype", "remat", "scan_layers")

  def with_runtime(self, *, dtype: str | None = None, param_dtype: str | None = None,
                   remat: str | None = None, scan_layers: bool | None = None):
    """The same architecture computing in `dtype`, storing params in `param_dtype`, with the
    `remat` policy (both towers) and the decoder's layers scanned or not (None keeps)."""
    dtype, param_dtype = dtype_name(dtype, "dtype"), dtype_name(param_dtype, "param_dtype")
    changes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype),
                                 ("remat", remat)) if v}
    text = dataclasses.replace(self.text, **changes)
    if scan_layers is not None:
      text = dataclasses.replace(text, scan_layers=scan_layers)
    return dataclasses.replace(self, text=text,
                               vision=dataclasses.replace(self.vision, **changes))

  def architecture(self) -> dict[str, Any]:
    """The architecture as a plain dict (config files' `model.architecture`), no runtime."""
    strip = lambda c: {k: v for k, v in dataclasses.asdict(c).items()  # noqa: E731
                       if k not in self._RUNTIME}
    return {"family": self.MODEL_TYPE, "text": strip(self.text), "vision": strip(self.vision),
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("text", "vision")}}

  @property
  def tie_word_embeddings(self) -> bool:
    return self.text.tie_word_embeddings


def construct_config(config_class, values: dict[str, Any] | None, where: str):
  """config_class(**values) with sequences as tuples, and errors that name the field: how
  family configs build their sections from an architecture dict (`from_dict`)."""
  if values is None:
    raise KeyError(f"the architecture has no '{where}' section")
  fields = {f.name for f in dataclasses.fields(config_class)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise KeyError(f"{where + '.' if where else ''}{unknown[0]} is not a field of "
                   f"{config_class.__name__} (fields: {sorted(fields)})")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  try:
    return config_class(**values)
  except TypeError as e:  # a required field is missing
    raise KeyError(f"{where or 'architecture'}: {e}") from e


@dataclasses.dataclass(frozen=True)
class Family:
  """What one model family (e.g. Qwen2.5-VL) supplies to the shared policy code."""
  model_type: str                                  # config.json "model_type"
  config_class: type                               # with from_hf(transformers config)
  module: Callable[[Any], nn.Module]               # balcap config -> flax module
  rules: Callable[[Any], tuple[hf_io.Rule, ...]]   # checkpoint table
  prepare_inputs: Callable[..., dict]              # (config, processor batch) -> model inputs
  # (config, batch_size=1, image_size=None, text_tokens=1) -> a processor-style batch of
  # zeros: the tiniest for init by default, or one of real shapes (ahead-of-time compilation)
  example_batch: Callable[..., dict]
  hf_shapes: Callable[[Any], dict]                 # checkpoint shapes the params cannot tell
  # (folder with tokenizer files, config.model or None) -> processor
  processor_from_pretrained: Callable[..., Any]
  # Sampling: ids never to sample (image/vision tokens), the compute dtype, the position of
  # each prompt's first generated token.
  special_token_ids: Callable[[Any], tuple[int, ...]]
  compute_dtype: Callable[[Any], str]
  decode_start: Callable[[Any, dict], np.ndarray]       # (config, prepared) -> [B]
  # (config, processor batch, image shards) -> model inputs, images in shards and static
  # sizes agreed by every host (`balcap.models.image_shards`)
  prepare_batch: Callable[..., dict]
  # (config, prepared prompts, start [B], G, n) -> positions of prompts + n new tokens, x G
  continuation_positions: Callable[..., np.ndarray]


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  _FAMILIES[family.model_type] = family
  return family


def family_of(model_type: str) -> Family:
  if model_type not in _FAMILIES:
    raise ValueError(f"model_type {model_type!r} is not supported; balcap has "
                     f"{sorted(_FAMILIES)}")
  return _FAMILIES[model_type]


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "vision_layout",
                "image_row_offsets")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
  """The MODEL_INPUTS a prepared batch has (not None): the forward pass's and the sampler's
  arguments, without the host-side extras (loss masks, rope deltas, raw images)."""
  return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


@dataclasses.dataclass
class Policy:
  family: Family
  config: Any
  params: Any
  processor: Any = None
  mesh: Mesh | None = None
  source: str | None = None  # the folder it was loaded from (its tokenizer files are copied)

  @property
  def module(self) -> nn.Module:
    return self.family.module(self.config)

  def prepare(self, batch: dict[str, Any], **layout_sizes) -> dict[str, Any]:
    """Host side: a processor batch plus position ids, rope deltas, vision layout."""
    if "position_ids" in batch:
      return batch
    return self.family.prepare_inputs(self.config, batch, **layout_sizes)

  def apply(self, params: Any, batch: dict[str, Any]) -> jax.Array:
    """Logits [B, T, V] (float32) for a processor batch (or a prepared one)."""
    prepared = self.prepare(batch)
    return _forward(self.module, self.mesh)(params, model_inputs(prepared))

  def save_pretrained(self, folder: str, *, dtype: str | None = None) -> None:
    """An HF folder (config.json, safetensors, tokenizer files) that transformers loads.

    A gs:// folder is written locally first (`paths.local_mirror`), then uploaded by process 0:
    safetensors files are written with seeks, which object stores do not have.
    """
    dtype = dtype_name(dtype, "save_pretrained(dtype=...)")
    if paths.is_remote(folder):
      local = paths.local_mirror(folder)
      self.save_pretrained(local, dtype=dtype)
      if jax.process_index() == 0:
        paths.upload_folder(local, folder)
      return
    os.makedirs(folder, exist_ok=True)
    hf_config = self.config.to_hf()
    if dtype:
      hf_config.dtype = dtype
    tensors = hf_io.hf_tensors(self.family.rules(self.config), self.params,
                               self.family.hf_shapes(self.config),
                               dtype=np.dtype(jax.numpy.dtype(dtype)) if dtype else None)
    hf_io.save_tensors(folder, tensors)
    if jax.process_index() == 0:
      hf_config.save_pretrained(folder)
      if self.source:
        source = paths.download_folder(self.source)
        for name in PROCESSOR_FILES:
          if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(folder, name))


@functools.lru_cache(maxsize=16)
def _forward(module: nn.Module, mesh: Mesh | None):
  """One jitted forward per (module, mesh); jit itself caches one program per input shape."""

  @jax.jit
  def forward(params, inputs):
    return module.apply({"params": params}, **inputs)

  return parallel.OnMesh(forward, mesh)


def boxed_abstract_params(family: Family, config: Any) -> tuple[Any, dict[str, Any]]:
  """(params of `family`'s model of `config` as ShapeDtypeStructs boxed with their logical
  axes, the example inputs that built them): no memory allocated."""
  module = family.module(config)
  example = family.prepare_inputs(config, family.example_batch(config))
  inputs = model_inputs(example)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))["params"], inputs


def _shardings(boxed: Any, mesh: Mesh | None) -> Any:
  if mesh is None:
    return None
  return parallel.param_shardings(boxed, mesh)


def checkpoint_config(folder: str) -> tuple[Family, Any]:
  """The family and balcap config of an HF folder, from its config.json alone."""
  import transformers  # pylint: disable=import-outside-toplevel
  folder = paths.download_folder(folder)
  with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
    model_type = json.load(f).get("model_type")
  family = family_of(model_type)
  return family, family.config_class.from_hf(transformers.AutoConfig.from_pretrained(folder))


def load_pretrained(folder: str, *, dtype: str | None = None, mesh: Mesh | None = None,
                    scan_layers: bool = True) -> Policy:
  """The policy in an HF folder (family from config.json), params placed on `mesh`.

  `dtype` ("bfloat16", "float32", "float16", or the numpy/JAX dtype) sets both the stored
  and the computation dtype; default float32. `scan_layers=False` unrolls the decoder's
  layers (faster CPU decoding). Tensors stream from disk one at a time (see hf_io).
  """
  folder = paths.download_folder(folder)  # gs://: each host reads its own local copy
  family, config = checkpoint_config(folder)
  config = config.with_runtime(dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
  boxed, _ = boxed_abstract_params(family, config)
  params = hf_io.load_params(folder, family.rules(config), nn.unbox(boxed),
                             _shardings(boxed, mesh))
  processor = family.processor_from_pretrained(folder) if has_tokenizer(folder) else None
  return Policy(family, config, params, processor, mesh, source=folder)


def init_random(config: Any, rng: jax.Array, *, mesh: Mesh | None = None,
                processor: Any = None) -> Policy:
  """A randomly initialised policy of `config`'s architecture (tests, CapWorld)."""
  family = next((f for f in _FAMILIES.values() if isinstance(config, f.config_class)), None)
  if family is None:
    raise TypeError(f"{type(config).__name__} is not the config of a registered model family")
  module = family.module(config)
  boxed, inputs = boxed_abstract_params(family, config)
  init = lambda key: module.init(key, **inputs)["params"]
  if mesh is None:
    params = jax.jit(lambda key: nn.unbox(init(key)))(rng)
  else:
    params = parallel.sharded_init(init, mesh, rng)
  return Policy(family, config, params, processor, mesh)


def architecture_from_config(model_config) -> Any:
  """The family config described by `config.model` (architecture + dtypes + remat)."""
  architecture = dict(model_config.architecture.to_dict())
  family = family_of(architecture.get("family"))
  return family.config_class.from_dict(architecture).with_runtime(
      dtype=model_config.dtype, param_dtype=model_config.param_dtype, remat=model_config.remat,
      scan_layers=model_config.scan_layers)


def policy_from_config(model_config, rng: jax.Array, mesh: Mesh | None = None) -> Policy:
  """The policy `config.model` asks for: its checkpoint if set (checked against the
  architecture, when one is given), else a random initialisation of the architecture."""
  if not model_config.checkpoint:
    policy = init_random(architecture_from_config(model_config), rng, mesh=mesh)
  else:
    policy = _load_checked(model_config, mesh)
  if model_config.tokenizer and not has_tokenizer(model_config.tokenizer):
    raise FileNotFoundError(f"config.model.tokenizer={model_config.tokenizer!r} has no "
                            "tokenizer.json or tokenizer.model")
  tokenizer = model_config.tokenizer or model_config.checkpoint
  if tokenizer and has_tokenizer(tokenizer):
    policy.processor = policy.family.processor_from_pretrained(tokenizer, model_config)
  return policy


def has_tokenizer(folder: str) -> bool:
  return any(paths.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model"))


def _load_checked(model_config, mesh: Mesh | None) -> Policy:
  if model_config.architecture:  # compare before reading gigabytes of weights
    expected = architecture_from_config(model_config).architecture()
    found = checkpoint_config(model_config.checkpoint)[1].architecture()
    differences = _differences(expected, found)
    if differences:
      raise ValueError(f"config.model.checkpoint {model_config.checkpoint} does not have the "
                       "architecture of config.model.architecture: " + "; ".join(differences))
  policy = load_pretrained(model_config.checkpoint, mesh=mesh, dtype=model_config.param_dtype,
                           scan_layers=model_config.scan_layers)
  policy.config = policy.config.with_runtime(dtype=model_config.dtype,
                                             remat=model_config.remat)
  return policy


def _differences(expected: dict, found: dict, prefix: str = "") -> list[str]:
  differences = []
  for key in sorted(set(expected) | set(found)):
    a, b = expected.get(key), found.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      differences += _differences(a, b, f"{prefix}{key}.")
    elif a != b:
      differences.append(f"{prefix}{key}: config says {a!r}, checkpoint has {b!r}")
  return differences
