"""A run's trained policy, read back from its stage checkpoints: what modes eval and export use.

A `train` / `sft` workdir holds `sft/checkpoints` and `rl/checkpoints` (orbax, see
`balcap.checkpoint`), each checkpoint with the run's config. The policy is rebuilt from that
config (the base HF folder's architecture and tokenizer, the stored dtype and layer layout),
and only the params are read, onto the current mesh: never the optimizer state, never the
base weights.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from balcap import checkpoint, configs, models, parallel, paths
from balcap.models import policy as policy_lib

STAGES = ("sft", "rl")


@dataclasses.dataclass(frozen=True)
class Source:
  """Which checkpoint a trained policy came from (for reports and export folder names)."""
  run: str
  stage: str
  step: int

  def describe(self) -> str:
    return f"{self.run} ({self.stage} step {self.step})"


def checkpoint_dir(run: str, stage: str) -> str:
  return os.path.join(run, stage, "checkpoints")


def _steps(directory: str) -> list[int]:
  # Read-only: opening a Checkpointer on a missing folder would create it.
  if not paths.exists(directory):
    return []
  return sorted(int(name) for name in paths.listdir(directory)
                if name.isdigit() and paths.exists(os.path.join(directory, name, "state")))


def find(run: str, stage: str = "latest", step: int = -1) -> Source:
  """The checkpoint `stage` ('latest' = rl when it has one, else sft) and `step` (-1 = the
  newest) of the run in `run`; a clear error when there is none."""
  if stage not in ("latest",) + STAGES:
    raise configs.BalcapError(f"stage {stage!r} is not one of {['latest', *STAGES]}")
  stages = [s for s in reversed(STAGES) if _steps(checkpoint_dir(run, s))]
  if not stages:
    raise configs.BalcapError(
        f"{run} holds no training checkpoints (looked for {checkpoint_dir(run, 'rl')} and "
        f"{checkpoint_dir(run, 'sft')}): give the --workdir of a `train` or `sft` run")
  chosen = stages[0] if stage == "latest" else stage
  steps = _steps(checkpoint_dir(run, chosen))
  if not steps:
    raise configs.BalcapError(f"{run} has no {chosen} checkpoints; it has {stages}")
  if step >= 0 and step not in steps:
    raise configs.BalcapError(f"{checkpoint_dir(run, chosen)} has no step {step}; its steps "
                              f"are {steps}")
  return Source(run, chosen, step if step >= 0 else steps[-1])


def model_config(source: Source, base: str = "") -> ml_collections.ConfigDict:
  """config.model of the run that wrote `source`, its base folder replaced by `base` when
  given (the run's HF folder may live elsewhere on this machine)."""
  with checkpoint.Checkpointer(checkpoint_dir(source.run, source.stage)) as store:
    saved = store.restore_config(source.step)
  model = configs.base_config().model
  known = set(_flatten(model.to_dict())) | {"architecture"}
  # Fields a newer or older balcap wrote that this one does not know are left out.
  model.update_from_flattened_dict({k: v for k, v in _flatten(saved["model"]).items()
                                    if k in known})
  if base:
    model.checkpoint, model.tokenizer = base, ""
  return model


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and key != "architecture":
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:  # the architecture is a free-form dict; lists back to the tuples configs hold
      flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return flat


def architecture(model: ml_collections.ConfigDict) -> tuple[models.Family, Any]:
  """The family and model config the run trained: from its base folder when it had one."""
  if model.checkpoint:
    if not paths.exists(model.checkpoint):
      raise configs.BalcapError(
          f"the run was trained from {model.checkpoint}, which is not on this machine; set "
          "--config.model.checkpoint to a copy of that HF folder (its config and tokenizer "
          "are read, not its weights)")
    family, config = policy_lib.checkpoint_config(model.checkpoint)
    config = config.with_runtime(dtype=model.param_dtype or None,
                                 param_dtype=model.param_dtype or None,
                                 scan_layers=model.scan_layers)
    config = config.with_runtime(dtype=model.dtype or None, remat=model.remat)
    return family, config
  config = models.architecture_from_config(model)
  return models.family_of(model.architecture.family), config


def load(source: Source, *, mesh=None, base: str = "") -> models.Policy:
  """The policy of `source` with its trained params on `mesh`, and its tokenizer."""
  model = model_config(source, base)
  family, config = architecture(model)
  boxed, _ = policy_lib.boxed_abstract_params(family, config)
  shapes = nn.unbox(boxed)
  shardings = (parallel.param_shardings(boxed, mesh) if mesh is not None
               else jax.tree.map(lambda _: None, shapes))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  with checkpoint.Checkpointer(checkpoint_dir(source.run, source.stage)) as store:
    try:
      params = store.restore_params(abstract, step=source.step)
    except ValueError as e:  # a different architecture or layer layout than the checkpoint's
      raise configs.BalcapError(
          f"the params of {source.describe()} do not fit the model its config describes "
          f"({family.model_type}, scan_layers={model.scan_layers}): {str(e)[:400]}") from e
  tokenizer = model.tokenizer or model.checkpoint
  processor = (family.processor_from_pretrained(tokenizer, model)
               if tokenizer and policy_lib.has_tokenizer(tokenizer) else None)
  return models.Policy(family, config, params, processor, mesh, source=tokenizer or None)
