"""Every balcap option with its default and meaning, `file.py:key=val` argument parsing, validate().

A config file (`configs/*.py`) defines `get_config(arg=None)`: it parses its own short arguments
with `parse_arg`, starts from `base_config()` and changes what it needs. `validate` then checks
the result against `base_config()` (unknown keys, wrong types) and against the machine (mesh
shape, batch divisibility) before anything is compiled, and reports every problem in one error
that names the field and the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import os
from typing import Any

import ml_collections

from balcap import paths

# Modes of `python -m balcap.main`; `balcap.main.MODE_RUNNERS` says which are in this version.
MODES = ("sft", "train", "eval", "caption", "export", "data", "compile")
DATA_SETS = ("capworld", "caption_folder")


class BalcapError(Exception):
  """A problem with the user's config or data whose message says everything (no traceback)."""


class ConfigError(BalcapError, ValueError):
  """A config that cannot run; the message lists each bad field and how to fix it."""

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    lines = "\n".join(f"  - {p}" for p in self.problems)
    super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


def base_config() -> ml_collections.ConfigDict:
  """All options, with defaults. A config file may change values, never add keys."""
  c = ml_collections.ConfigDict()
  # What `python -m balcap.main` does: sft (supervised warm start), train (RL), eval,
  # caption (batch inference), export (write an HF checkpoint), data (prepare data sets).
  c.mode = "train"
  # Seeds parameter init, data order and sampling. Same seed + same mesh = same run.
  c.seed = 0
  # Steps of the shared loop; each stage sets it from sft.num_steps / rl.num_steps.
  c.num_steps = 1000
  # GLOBAL number of examples (prompts) per step, over all hosts and devices. Must divide
  # over the data shards (mesh.data * mesh.fsdp) and over the hosts.
  c.batch_size = 64

  # The policy. With `checkpoint` set, that HF folder (config.json, *.safetensors, tokenizer)
  # is loaded, and must agree with `architecture` where one is given; with "" the policy is
  # initialised at random from `architecture` (tests, the CapWorld demo).
  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = ""
  # A folder with the tokenizer files (tokenizer.json, ...); "" = the checkpoint's own.
  c.model.tokenizer = ""
  c.model.dtype = "bfloat16"       # computation dtype of activations and matmuls
  c.model.param_dtype = "float32"  # stored parameters (float32 master weights for training)
  # Per-layer activation checkpointing: none|full|dots|dots_no_batch.
  c.model.remat = "none"
  # Decoder layers under nn.scan (fast compiles, the TPU/GPU choice) or unrolled (faster
  # decoding on CPUs, where a scan copies each layer's weights out of the stack every step).
  c.model.scan_layers = True
  c.model.min_pixels = 56 * 56     # Qwen2.5-VL processor: each image is resized to between
  c.model.max_pixels = 28 * 28 * 1280  # min and max pixels (multiples of 28 px per side)
  # LLaVA-1.5 processor: pad each image to a square with the mean colour before the resize and
  # centre crop (as LLaVA-1.5 was trained), instead of cropping the sides away.
  c.model.pad_to_square = False
  # The architecture in its family's spelling ({"family": "qwen2_5_vl", "text": {...},
  # "vision": {...}, ...}); free-form here, checked by the family's config class.
  c.model.architecture = ml_collections.ConfigDict()

  # How captions are drawn (the RL rollouts and the `caption` mode).
  c.sampling = ml_collections.ConfigDict()
  c.sampling.prompt = "Describe this image in detail."
  c.sampling.max_new_tokens = 256
  c.sampling.temperature = 1.0  # 0 = greedy
  c.sampling.top_p = 1.0        # nucleus sampling; 1 = off
  c.sampling.top_k = 0          # 0 = off
  # Prompt lengths are padded to a multiple of this: fewer distinct programs to compile.
  c.sampling.prompt_bucket = 64
  # The decoder's weights gathered over data/fsdp once per sampler call (kept split over
  # tensor), so a decode step reads them locally instead of all-gathering every weight per
  # token; costs the decoder's bf16 params / mesh.tensor per device while sampling. False
  # keeps the training layout (less memory, one all-gather of every weight per token).
  c.sampling.gather_weights = True

  # Supervised warm start (mode sft, and the first stage of mode train when num_steps > 0).
  c.sft = ml_collections.ConfigDict()
  c.sft.num_steps = 0
  c.sft.batch_size = 32           # global examples per step
  c.sft.target = "sft_caption"    # the caption to learn: sft_caption (CapWorld) | reference
  c.sft.max_length = 320          # tokens per chat (prompt + caption); longer ones are cut
  c.sft.optimizer = _optimizer_section(learning_rate=1e-5, warmup_steps=0)
  # CapWorld only: an auxiliary loss that makes the image tokens' hidden states tell the shape,
  # colour, row and column under them (`balcap.grounding`); 0 = off.
  c.sft.grounding_weight = 0.0
  c.sft.grounding_layer = -1      # the language-model layer it reads; -1 = the middle one
  # Every N steps, the caption loss on a validation batch with true and with shuffled images:
  # sft/image_gain says whether the policy reads the image (`sft.ImageGain`); 0 = off.
  c.sft.image_gain_every = 0

  # CapWorld only: the SFT stage opens by training the vision tower to name each object's
  # shape, colour and size from the scene graphs (`balcap.vision_pretrain`); 0 = off.
  c.vision_pretrain = ml_collections.ConfigDict()
  c.vision_pretrain.num_steps = 0
  c.vision_pretrain.batch_size = 16  # global images per step
  c.vision_pretrain.optimizer = _optimizer_section(
      learning_rate=5e-3, warmup_steps=30, schedule="cosine", min_learning_rate_ratio=0.1)

  # RL (mode train): c-GDPO by default, see config.rewards and config.advantage.
  c.rl = ml_collections.ConfigDict()
  c.rl.num_steps = 0               # 0: no RL stage (mode train then only runs SFT and eval)
  c.rl.batch_size = 16             # global prompts per step
  c.rl.group_size = 8              # G rollouts per prompt
  c.rl.num_inner_updates = 1       # mu: optimizer updates per batch of rollouts
  c.rl.micro_batch_size = 0        # rollouts per gradient micro-batch; 0 = all at once
  # Judge step t's captions while step t+1's rollouts are sampled, and update on step t when
  # its rewards are in: one step off-policy, the importance ratio taken against the sampler's
  # logprobs. Pays when the judge is slow (an LLM); off until measured on your judge.
  c.rl.async_rewards = False
  c.rl.loss = ml_collections.ConfigDict()
  c.rl.loss.eps_low = 0.2          # clip ratio below at 1 - eps_low
  c.rl.loss.eps_high = 0.2         # and above at 1 + eps_high (DAPO: 0.28)
  c.rl.loss.dual_clip = 0.0        # > 1: cap the loss of negative-advantage tokens (0 = off)
  c.rl.loss.kl_coef = 0.0          # beta of the KL to the frozen reference (0 = no reference)
  c.rl.loss.kl_estimator = "k3"    # k1 | k2 | k3
  c.rl.loss.aggregation = "token-mean"  # | seq-mean-token-mean | seq-mean-token-sum-norm
  c.rl.loss.norm_length = 0
  c.rl.optimizer = _optimizer_section(learning_rate=1e-6, warmup_steps=0)
  c.rl.sample_table_every = 20     # write a table of sample captions every N steps
  c.rl.eval_every = 0              # evaluate on config.data.eval_split every N steps (0 = off)
  c.rl.eval_examples = 64          # examples per periodic evaluation
  c.rl.final_eval_examples = -1    # test-split examples of the before/after table (-1 = all)

  # Rewards (METHOD.md): who judges the captions.
  c.rewards = ml_collections.ConfigDict()
  c.rewards.judge = "capworld"  # capworld (exact, CapWorld only) | openai | local
  c.rewards.length_unit = "words"  # the length ratio's unit: words | tokens
  # A batch's rewards are due this long after it is submitted; late ones are NaN ("timeout").
  c.rewards.deadline_s = 600.0
  # judge = capworld: whether precision counts commentary (meta spans: nothing in the image
  # to point at) as failed assertions, as the paper's pointability does. False is the
  # "precision without pointability" ablation (experiments/rewards.py); clarity still counts.
  c.rewards.capworld = ml_collections.ConfigDict()
  c.rewards.capworld.pointability = True
  # judge = openai: any OpenAI-compatible /v1/chat/completions server (vLLM, SGLang, an API).
  c.rewards.openai = ml_collections.ConfigDict()
  c.rewards.openai.base_url = ""        # e.g. http://judge-host:8000
  c.rewards.openai.model = ""           # the served model's name
  c.rewards.openai.api_key_env = ""     # NAME of the environment variable holding the key
  c.rewards.openai.timeout_s = 60.0     # per request
  c.rewards.openai.max_concurrency = 64
  c.rewards.openai.max_retries = 3      # on time-outs, 5xx and 429 (never other 4xx)
  c.rewards.openai.cache_path = ""      # sqlite response cache; "" = <workdir>/judge_cache.db
  # judge = local: a balcap policy (an HF folder) judging through the sampler.
  c.rewards.local = ml_collections.ConfigDict()
  c.rewards.local.checkpoint = ""
  c.rewards.local.max_new_tokens = 512

  # Advantages (balcap/rl/advantages.py): estimator, weights, length control.
  c.advantage = ml_collections.ConfigDict()
  c.advantage.estimator = "c_gdpo"      # c_gdpo | gdpo | grpo | grpo_no_std
  c.advantage.components = ("precision", "recall", "linguistic")
  c.advantage.weights = (1.0, 1.0, 1.0)  # alpha, beta, gamma, applied after normalising
  c.advantage.eps = 1e-6
  c.advantage.ddof = 0                  # 0: population std; 1: sample std
  c.advantage.length_mask = True        # linguistic reward only when the length ratio is in
  c.advantage.length_masked_component = "linguistic"
  c.advantage.tau_low = 0.5             # [tau_low, tau_high] (inclusive)
  c.advantage.tau_high = 2.0
  c.advantage.linear_length_penalty = 0.0  # baseline: -lambda |ratio - 1| as a 4th reward
  c.advantage.conditioned = ""          # GDPO conditioning: pay `conditioned` only when
  c.advantage.condition_on = ""         # `condition_on` >= condition_threshold
  c.advantage.condition_threshold = 0.0

  # Mode `caption`: caption images given with --images=a.jpg,b.jpg, else a data split.
  c.caption = ml_collections.ConfigDict()
  c.caption.split = ""        # "" = config.data.test_split
  c.caption.num_examples = -1  # -1 = the whole split
  c.caption.output = ""       # "" = <workdir>/captions.jsonl

  # Mode `eval` (balcap/evals/run.py): the paper's measures of one captioner. Captions come
  # from `captions` (a JSONL of {"id", "caption"[, "benchmark"]}: any model's), else from the
  # trained params of the run in `run` (a train/sft workdir), else from config.model.
  c.eval = ml_collections.ConfigDict()
  c.eval.benchmarks = ("dcscore", "captionqa", "caparena", "capscore", "classic")
  c.eval.captions = ""
  c.eval.run = ""
  c.eval.stage = "latest"     # the run's checkpoint: latest (rl, else sft) | sft | rl
  c.eval.step = -1            # -1 = the stage's newest checkpoint
  c.eval.num_examples = -1    # the first N items of each benchmark (-1 = all)
  # Each benchmark's folder, in its published layout (balcap/evals/benchmark_data.py).
  c.eval.decapbench = ""
  c.eval.captionqa = ""
  c.eval.caparena = ""
  # The benchmarks' judge: an OpenAI-compatible server (vLLM, SGLang, an API). DCScore and
  # CapArena-Auto need a vision model; CaptionQA reads captions only.
  c.eval.judge = ml_collections.ConfigDict()
  c.eval.judge.base_url = ""
  c.eval.judge.model = ""
  c.eval.judge.api_key_env = ""
  c.eval.judge.timeout_s = 120.0
  c.eval.judge.max_concurrency = 32
  c.eval.judge.max_retries = 3     # transport retries (time-outs, 5xx, 429)
  c.eval.judge.tries = 5           # asks per item before it is reported invalid
  c.eval.judge.image_detail = "auto"  # the `detail` of images sent: auto | low | high
  c.eval.judge.seed = 0            # option shuffles, arena positions, sampling seeds
  c.eval.judge.cache_path = ""     # sqlite reply cache; "" = <workdir>/eval/judge_cache.sqlite

  # Mode `export`: a run's trained params as an HF folder (weights, config, tokenizer files)
  # that transformers loads (the layout vLLM reads; not tested with vLLM here).
  c.export = ml_collections.ConfigDict()
  c.export.run = ""           # the train/sft workdir to read; "" = --workdir
  c.export.stage = "latest"   # latest (rl, else sft) | sft | rl
  c.export.step = -1          # -1 = the stage's newest checkpoint
  c.export.output = ""        # "" = <run>/export/<stage>_<step>
  c.export.dtype = "bfloat16"  # the stored weights: bfloat16 | float32 | float16

  # Mode `compile`: ahead-of-time compilation of every program of a step (balcap/aot).
  c.compile = ml_collections.ConfigDict()
  c.compile.topology = ""       # "" = this process's devices; a TPU slice: v5e-64, v5p-32,
  #                               v4-32, v6e-64, or libtpu's v5e:8x8 (needs the `tpu` extra)
  c.compile.accelerator = ""    # the chip for capacity and roofline: h100, h200, v4, v5e, v5p,
  #                               v6e; "" = the TPU slice's chip (none for CPU devices)
  c.compile.capacity_gib = 0.0  # memory per device to fit in; 0 = the chip's HBM
  c.compile.programs = ("sample", "sample_prefill", "sample_decode_step", "score", "update",
                        "sft")
  c.compile.image_size = (448, 448)   # (height, width) of every prompt's image, px
  c.compile.prompt_text_tokens = 32   # text tokens per prompt besides the image's

  # Device mesh: one axis per kind of parallelism. -1 on one axis = all remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1    # pure data parallelism: params replicated, batch split
  c.mesh.fsdp = 1     # batch split AND params/optimizer state sharded (ZeRO-3 style)
  c.mesh.tensor = 1   # params split along heads / mlp / vocab (Megatron style)

  c.data = ml_collections.ConfigDict()
  c.data.name = "capworld"  # one of DATA_SETS: capworld (embedded) or caption_folder (yours)
  # Where TFDS keeps prepared data sets; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets. On a
  # pod, a bucket every host can read (gs://...), prepared once with mode=data.
  c.data.data_dir = ""
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.test_split = "test"
  # Threads that read and decode examples ahead of the training loop, per host.
  c.data.read_threads = 4
  # Batches each host prepares ahead of the training loop.
  c.data.prefetch_batches = 2

  # CapWorld, the embedded procedural caption world (balcap/data/capworld).
  c.data.capworld = ml_collections.ConfigDict()
  c.data.capworld.num_train = 20_000
  c.data.capworld.num_validation = 500
  c.data.capworld.num_test = 500
  # (width, height) pairs in pixels, multiples of 28; each example picks one.
  c.data.capworld.image_sizes = ((224, 224),)
  c.data.capworld.min_objects = 1
  c.data.capworld.max_objects = 6
  c.data.capworld.num_references = 2  # reference captions per image (>= 2)
  c.data.capworld.seed = 0            # the world's own seed: changes every image
  # Share of SFT captions written too short on purpose (a bare listing, "A red circle."):
  # the habit of a captioner fine-tuned on short human captions (flaws.write_sft_caption).
  c.data.capworld.terse_share = 0.0

  # Your own images: a JSONL manifest of {"id", "image", "reference"} rows
  # (balcap/data/caption_folder). Bad rows are skipped and reported, never fatal.
  c.data.caption_folder = ml_collections.ConfigDict()
  c.data.caption_folder.manifest = ""  # path to manifest.jsonl (required for caption_folder)
  # Fraction of rows (by a stable hash of the id) held out as validation / test splits.
  c.data.caption_folder.validation_fraction = 0.02
  c.data.caption_folder.test_fraction = 0.02

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100  # save every N steps (and at the end, and on SIGTERM)
  c.checkpoint.keep = 3           # keep the N most recent checkpoints
  c.checkpoint.async_save = True  # write in a background thread while training goes on

  c.metrics = ml_collections.ConfigDict()
  c.metrics.log_every_steps = 1
  c.metrics.tensorboard = True  # event files in workdir/tensorboard
  c.metrics.jsonl = True        # one JSON object per line in workdir/metrics.jsonl
  c.metrics.progress_bar = True
  return c


def _optimizer_section(**overrides) -> ml_collections.ConfigDict:
  """AdamW with warmup and a constant or cosine schedule (balcap/optim.py)."""
  section = ml_collections.ConfigDict(dict(
      learning_rate=1e-6, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
      warmup_steps=0,                # linear warmup from 0
      schedule="constant",           # after warmup: constant | cosine
      decay_steps=0,                 # cosine length; 0 = the stage's num_steps
      min_learning_rate_ratio=0.0,
      max_grad_norm=1.0,             # global-norm clipping before Adam (0 = off)
      freeze=(),                     # regexes over param paths, e.g. ("^visual/",)
      learning_rate_multipliers=(),  # ((regex, multiplier), ...), e.g. (("^visual/", 10.0),)
      moment_dtype="float32"))       # Adam moments, float32 even for bfloat16 params
  section.update(overrides)
  return section


def known_options(cls: type, section: Any, what: str) -> dict[str, Any]:
  """A config section (ConfigDict or dict) as keyword arguments of dataclass `cls`; a key
  that is not one of its fields is a ValueError naming it and the known ones."""
  values = dict(section)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"invalid {what} config: unknown option(s) {unknown}; known: "
                     f"{sorted(known)}")
  return values


def full_architecture(architecture: dict[str, Any]) -> dict[str, Any]:
  """`architecture` (a family's spelling, as config files write it) with every field of the
  family's config present: the given values, and the defaults for the rest. ml_collections
  overrides only the fields a config already has, so config files pass their architecture
  through this to make any field settable on the command line
  (`--config.model.architecture.text.rope_theta=100`); the model is the same."""
  from balcap.models import policy  # pylint: disable=import-outside-toplevel  (jax, flax)
  family = policy.family_of(architecture.get("family"))
  return family.config_class.from_dict(dict(architecture)).architecture()


def paper_rl_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The RL settings of a real run (configs/qwen3b.py, qwen7b.py, llava7b.py), in one place.

  From the method (METHOD.md) where it says, else recent GRPO practice (EasyR1/verl defaults
  for 3-7B VLMs): an Instruct model goes straight to RL (no SFT), G = 8 rollouts per prompt,
  128 prompts a step (~700 steps an epoch of 90K images), AdamW at 1e-6 with a short warmup,
  DAPO's asymmetric clip (0.2 / 0.28), no KL term, token-mean loss, one inner update; captions
  up to 512 new tokens (the paper's 3B captions average 175 words, ~230 tokens); the judge an
  OpenAI-compatible server (vLLM/SGLang) whose base_url and model the run must set.
  """
  c.sft.num_steps = 0
  c.rl.num_steps = 700
  c.rl.batch_size = 128
  c.rl.group_size = 8
  c.rl.micro_batch_size = 64
  c.rl.num_inner_updates = 1
  c.rl.loss.eps_low, c.rl.loss.eps_high = 0.2, 0.28
  c.rl.loss.kl_coef, c.rl.loss.kl_estimator = 0.0, "k3"
  c.rl.loss.aggregation = "token-mean"
  c.rl.optimizer.update(learning_rate=1e-6, warmup_steps=10, schedule="constant",
                        weight_decay=0.01, max_grad_norm=1.0)
  c.rl.sample_table_every = 10
  c.rl.eval_every, c.rl.eval_examples = 50, 256
  c.sampling.max_new_tokens = 512
  c.sampling.temperature = 1.0
  c.rewards.judge = "openai"
  c.rewards.openai.api_key_env = "JUDGE_API_KEY"
  c.rewards.deadline_s = 600.0
  c.checkpoint.every_steps = 25
  return c


# Mesh shapes for common machines (config files' `hardware=` argument).
MESH_PRESETS = {
    # Every device a data-parallel replica: small models, CPU smoke tests.
    "cpu": {"data": -1, "fsdp": 1, "tensor": 1},
    # A TPU v5e / v4 pod slice: params and optimizer state sharded over every chip (ZeRO-3),
    # the batch too; the fast ICI makes the all-gathers cheap.
    "tpu": {"data": 1, "fsdp": -1, "tensor": 1},
    # One host with 8 GPUs (80 GB): FSDP over the 8 NVLink-connected devices.
    "gpu8": {"data": 1, "fsdp": 8, "tensor": 1},
}


def mesh_preset(name: str) -> ml_collections.ConfigDict:
  if name not in MESH_PRESETS:
    raise ConfigError([f"hardware={name!r} is not one of {sorted(MESH_PRESETS)}"])
  return ml_collections.ConfigDict(MESH_PRESETS[name])


# ---------------------------------------------------------------------------------------------
# `file.py:key=val,key2=val2` arguments.


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config file's argument string into a ConfigDict typed by `defaults`.

  `parse_arg("mode=eval,steps=10", mode="train", steps=100)` -> {mode: "eval", steps: 10}.
  Values are Python literals where they parse as one, else strings; each must match the
  default's type. Unknown keys are an error naming the known ones.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, raw = item.partition("=")
    if not sep:
      raise ConfigError([f"config argument {item!r} is not key=value (use file.py:key=val,...)"])
    if key not in defaults:
      raise ConfigError([f"unknown config argument {key!r}; known: {sorted(defaults)}"])
    value = _literal(raw)
    default = defaults[key]
    if default is not None and not _type_ok(value, default):
      raise ConfigError(
          [f"config argument {key}={raw!r} is {type(value).__name__}, expected "
           f"{type(default).__name__} like the default {default!r}"])
    result[key] = float(value) if isinstance(default, float) else value
  return result


def _literal(raw: str) -> Any:
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw  # a bare word such as eval or gs://bucket/x is a string


# ---------------------------------------------------------------------------------------------
# validate()


def validate(config: ml_collections.ConfigDict, *, num_devices: int,
             process_count: int = 1) -> None:
  """Raises ConfigError listing every problem of `config` on this machine; returns None if fine."""
  problems = _schema_problems(config.to_dict(), base_config().to_dict(), "config")
  if problems:  # values of the wrong type make the checks below meaningless
    raise ConfigError(problems)
  problems += _mode_problems(config)
  problems += _mesh_and_batch_problems(config, *target_devices(config, num_devices,
                                                               process_count))
  problems += _data_problems(config.data)
  problems += _loop_problems(config)
  problems += _model_problems(config.model, needs_model=_needs_model(config))
  problems += _sampling_problems(config.sampling)
  if config.mode == "train" or (config.mode == "eval" and "capscore" in config.eval.benchmarks):
    problems += _reward_problems(config)  # the rewards' judge scores the captions
  if config.mode == "eval":
    problems += _eval_problems(config.eval, config.model.checkpoint)
  if config.mode == "export":
    problems += _export_problems(config.export)
  problems += _compile_problems(config)
  problems += _training_problems(config)
  if problems:
    raise ConfigError(problems)


def _schema_problems(values: dict, schema: dict, path: str) -> list[str]:
  problems = []
  for key, value in values.items():
    where = f"{path}.{key}"
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema), n=1)
      hint = f"; did you mean {path}.{close[0]}?" if close else f"; known: {sorted(schema)}"
      problems.append(f"{where} is not an option{hint}")
    elif isinstance(schema[key], dict):
      if not schema[key]:  # an empty section is free-form; its owner checks it
        continue
      if isinstance(value, dict):
        problems += _schema_problems(value, schema[key], where)
      else:
        problems.append(f"{where} must be a section (ConfigDict), got {value!r}")
    elif not _type_ok(value, schema[key]):
      problems.append(
          f"{where}={value!r} has type {type(value).__name__}; expected "
          f"{type(schema[key]).__name__} (default {schema[key]!r})")
  return problems


def _type_ok(value: Any, default: Any) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def _needs_model(config) -> bool:
  """Whether config.model must name a model: not for data, nor where a run's checkpoints (which
  carry their model config) or finished captions are what is read."""
  if config.mode in ("data", "export"):
    return False
  return not (config.mode == "eval" and (config.eval.run or config.eval.captions))


def _mode_problems(config) -> list[str]:
  if config.mode not in MODES:
    return [f"config.mode={config.mode!r} is not a mode; use one of {list(MODES)}"]
  return []


def _mesh_and_batch_problems(config, num_devices: int, process_count: int) -> list[str]:
  # Imported here: parallel imports jax, and configs must stay importable without a backend.
  from balcap import parallel  # pylint: disable=import-outside-toplevel

  try:
    shape = parallel.resolve_mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    return [str(e)]
  problems = []
  batch_shards = shape["data"] * shape["fsdp"]
  sizes = {"config.batch_size": config.batch_size}
  if config.sft.num_steps > 0:
    sizes["config.sft.batch_size"] = config.sft.batch_size
  if config.rl.num_steps > 0:
    sizes["config.rl.batch_size"] = config.rl.batch_size
  for field, size in sizes.items():
    if size <= 0:
      problems.append(f"{field}={size} must be positive")
      continue
    if size % batch_shards:
      problems.append(
          f"{field}={size} does not divide over the {batch_shards} data shards "
          f"(mesh.data={shape['data']} x mesh.fsdp={shape['fsdp']}); use a multiple of "
          f"{batch_shards}, e.g. {_round_up(size, batch_shards)}")
    if size % process_count:
      problems.append(f"{field}={size} does not divide over the {process_count} hosts; use "
                      f"a multiple of {process_count}")
  return problems


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _data_problems(data) -> list[str]:
  problems = []
  if data.name not in DATA_SETS:
    problems.append(f"config.data.name={data.name!r} is not a data set; use one of "
                    f"{list(DATA_SETS)}")
  if data.read_threads < 0 or data.prefetch_batches < 0:
    problems.append("config.data.read_threads and config.data.prefetch_batches must be >= 0")
  world = data.capworld
  for split in ("num_train", "num_validation", "num_test"):
    if world[split] < 0:
      problems.append(f"config.data.capworld.{split}={world[split]} must be >= 0")
  # The world's own parameters are checked where they are defined, by CapWorldSpec.
  from balcap.data.capworld.generate import spec_from_config  # pylint: disable=import-outside-toplevel
  try:
    spec_from_config(world)
  except (ValueError, TypeError) as e:
    problems.append(f"config.data.capworld: {e}")
  folder = data.caption_folder
  if data.name == "caption_folder" and not folder.manifest:
    problems.append("config.data.caption_folder.manifest is empty but config.data.name is "
                    "'caption_folder'; set it to your manifest.jsonl")
  elif data.name == "caption_folder" and not paths.exists(folder.manifest):
    problems.append(f"config.data.caption_folder.manifest={folder.manifest!r}: no such file")
  held_out = folder.validation_fraction + folder.test_fraction
  if folder.validation_fraction < 0 or folder.test_fraction < 0 or held_out >= 1:
    problems.append(
        "config.data.caption_folder.validation_fraction and test_fraction must be >= 0 with "
        f"a sum < 1 (got {folder.validation_fraction} + {folder.test_fraction})")
  return problems


def _loop_problems(config) -> list[str]:
  problems = []
  if config.num_steps < 0:
    problems.append(f"config.num_steps={config.num_steps} must be >= 0")
  if config.checkpoint.every_steps < 1:
    problems.append(f"config.checkpoint.every_steps={config.checkpoint.every_steps} must be >= 1")
  if config.checkpoint.keep < 1:
    problems.append(f"config.checkpoint.keep={config.checkpoint.keep} must be >= 1 (the latest "
                    "checkpoint is what a resumed run starts from)")
  if config.metrics.log_every_steps < 1:
    problems.append(
        f"config.metrics.log_every_steps={config.metrics.log_every_steps} must be >= 1")
  return problems


def _model_problems(model, needs_model: bool) -> list[str]:
  problems = []
  for field in ("dtype", "param_dtype"):
    if model[field] not in ("float32", "bfloat16", "float16"):
      problems.append(f"config.model.{field}={model[field]!r}: use float32, bfloat16 or float16")
  if model.min_pixels > model.max_pixels:
    problems.append(f"config.model.min_pixels={model.min_pixels} exceeds max_pixels="
                    f"{model.max_pixels}")
  if model.architecture:
    from balcap import models  # pylint: disable=import-outside-toplevel
    try:
      models.architecture_from_config(model)
    except (ValueError, TypeError, KeyError) as e:
      problems.append(f"config.model.architecture: {e}")
  elif needs_model and not model.checkpoint:
    problems.append("config.model: neither checkpoint nor architecture is set; give an HF "
                    "folder in config.model.checkpoint or an architecture to initialise")
  if needs_model and model.checkpoint:
    problems += checkpoint_folder_problems(model.checkpoint, "config.model.checkpoint")
  return problems


def checkpoint_folder_problems(folder: str, field: str) -> list[str]:
  """What keeps `folder` from being an HF checkpoint (config.json + safetensors weights):
  found here, before a data set is prepared or a program compiled, not after."""
  if "://" in folder:  # a remote path (gs://...): the loader reports what it cannot read
    return []
  if not os.path.isdir(folder):
    return [f"{field}={folder!r} is not a folder; give an HF checkpoint folder (config.json "
            "and *.safetensors), e.g. a download of Qwen/Qwen2.5-VL-7B-Instruct"]
  names = os.listdir(folder)
  missing = []
  if "config.json" not in names:
    missing.append("config.json")
  if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
             for n in names):
    missing.append("weights (*.safetensors or model.safetensors.index.json)")
  if missing:
    return [f"{field}={folder!r} has no {' and no '.join(missing)}; it must be an HF "
            "checkpoint folder"]
  return []


def _sampling_problems(sampling) -> list[str]:
  problems = []
  if sampling.max_new_tokens < 1:
    problems.append(f"config.sampling.max_new_tokens={sampling.max_new_tokens} must be >= 1")
  if sampling.temperature < 0:
    problems.append(f"config.sampling.temperature={sampling.temperature} must be >= 0 "
                    "(0 = greedy)")
  if not 0 < sampling.top_p <= 1:
    problems.append(f"config.sampling.top_p={sampling.top_p} must be in (0, 1]")
  if sampling.top_k < 0:
    problems.append(f"config.sampling.top_k={sampling.top_k} must be >= 0 (0 = off)")
  if sampling.prompt_bucket < 1:
    problems.append(f"config.sampling.prompt_bucket={sampling.prompt_bucket} must be >= 1")
  return problems


def _compile_problems(config) -> list[str]:
  if config.mode != "compile":
    return []
  from balcap.aot import hardware, programs  # pylint: disable=import-outside-toplevel
  c, problems = config.compile, []
  unknown = sorted(set(c.programs) - set(programs.PROGRAMS))
  if unknown:
    problems.append(f"config.compile.programs: {unknown} are not programs; use some of "
                    f"{list(programs.PROGRAMS)}")
  if c.accelerator and c.accelerator not in hardware.ACCELERATORS:
    problems.append(f"config.compile.accelerator={c.accelerator!r} is not one of "
                    f"{sorted(hardware.ACCELERATORS)}")
  if c.topology:
    try:
      hardware.tpu_topology(c.topology)
    except ValueError as e:
      problems.append(f"config.compile.topology: {e}")
  if len(c.image_size) != 2 or min(c.image_size) <= 0:
    problems.append(f"config.compile.image_size={tuple(c.image_size)} must be (height, width)")
  return problems


def target_devices(config, num_devices: int, process_count: int) -> tuple[int, int]:
  """(devices, hosts) the config's mesh must cover: the TPU slice `mode=compile` targets
  (4 chips per host), else this machine's."""
  if config.get("mode") == "compile" and config.compile.topology:
    from balcap.aot import hardware  # pylint: disable=import-outside-toplevel
    try:
      chips = hardware.tpu_topology(config.compile.topology)[2]
    except ValueError:
      return num_devices, process_count  # reported by _compile_problems
    return chips, max(1, chips // 4)
  return num_devices, process_count


JUDGES = ("capworld", "openai", "local")


def _reward_problems(config) -> list[str]:
  problems = []
  rewards = config.rewards
  if rewards.judge not in JUDGES:
    problems.append(f"config.rewards.judge={rewards.judge!r} is not one of {list(JUDGES)}")
  if rewards.judge == "capworld" and config.data.name != "capworld" and config.mode == "train":
    problems.append("config.rewards.judge='capworld' can only judge CapWorld captions; with "
                    f"config.data.name={config.data.name!r} use judge='openai' or 'local'")
  if rewards.judge == "openai" and not (rewards.openai.base_url and rewards.openai.model):
    problems.append("config.rewards.judge='openai' needs config.rewards.openai.base_url and "
                    "config.rewards.openai.model")
  key_env = rewards.openai.api_key_env
  if rewards.judge == "openai" and key_env and not os.environ.get(key_env):
    # Found now, not when the judge is built after the SFT stage.
    problems.append(f"config.rewards.openai.api_key_env={key_env!r}: the environment variable "
                    f"{key_env} (the judge's API key) is not set; set it, or set api_key_env='' "
                    "for a server that takes no key")
  if rewards.judge == "local" and not rewards.local.checkpoint:
    problems.append("config.rewards.judge='local' needs config.rewards.local.checkpoint")
  elif rewards.judge == "local":
    problems += checkpoint_folder_problems(rewards.local.checkpoint,
                                           "config.rewards.local.checkpoint")
  if rewards.length_unit not in ("words", "tokens"):
    problems.append(f"config.rewards.length_unit={rewards.length_unit!r}: use words or tokens")
  from balcap.rl import advantages  # pylint: disable=import-outside-toplevel
  try:
    advantages.from_config(config.advantage)
  except (ValueError, TypeError) as e:
    problems.append(f"config.advantage: {e}")
  return problems


EVAL_BENCHMARKS = ("dcscore", "captionqa", "caparena", "capscore", "classic")
_JUDGED = {"dcscore": "decapbench", "captionqa": "captionqa", "caparena": "caparena"}


def _eval_problems(e, config_model_checkpoint: str) -> list[str]:
  problems = []
  unknown = [b for b in e.benchmarks if b not in EVAL_BENCHMARKS]
  if unknown or not e.benchmarks:
    problems.append(f"config.eval.benchmarks={tuple(e.benchmarks)!r}: choose from "
                    f"{list(EVAL_BENCHMARKS)}")
  if e.stage not in ("latest", "sft", "rl"):
    problems.append(f"config.eval.stage={e.stage!r}: use latest, sft or rl")
  if e.captions and e.run:
    problems.append("config.eval.captions and config.eval.run are both set; captions are "
                    "either read from a file or made by the run's params, not both")
  if not (e.captions or e.run or config_model_checkpoint):
    problems.append("mode eval needs captions to score: config.eval.run (a train/sft workdir), "
                    "config.model.checkpoint (an HF folder) or config.eval.captions (a JSONL "
                    "file); a randomly initialised policy is not evaluated")
  if e.captions and not paths.exists(e.captions):
    problems.append(f"config.eval.captions={e.captions!r}: no such file")
  for benchmark, field in _JUDGED.items():
    if benchmark in e.benchmarks and not e[field]:
      problems.append(f"config.eval.benchmarks has {benchmark} but config.eval.{field} is "
                      "empty; give the benchmark's folder (README, Evaluating)")
    elif benchmark in e.benchmarks and not paths.isdir(e[field]):
      problems.append(f"config.eval.{field}={e[field]!r} is not a folder")
  if any(b in e.benchmarks for b in _JUDGED) and not (e.judge.base_url and e.judge.model):
    problems.append("config.eval.judge.base_url and .model name the benchmarks' judge (an "
                    "OpenAI-compatible server, e.g. vLLM serving Qwen2.5-VL-72B-Instruct)")
  if e.judge.api_key_env and not os.environ.get(e.judge.api_key_env):
    problems.append(f"config.eval.judge.api_key_env={e.judge.api_key_env!r}: that environment "
                    "variable is not set")
  if e.judge.image_detail not in ("auto", "low", "high"):
    problems.append(f"config.eval.judge.image_detail={e.judge.image_detail!r}: use auto, low "
                    "or high")
  if e.judge.tries < 1:
    problems.append(f"config.eval.judge.tries={e.judge.tries}: must be >= 1")
  return problems


def _export_problems(export) -> list[str]:
  problems = []
  if export.stage not in ("latest", "sft", "rl"):
    problems.append(f"config.export.stage={export.stage!r}: use latest, sft or rl")
  if export.dtype not in ("float32", "bfloat16", "float16"):
    problems.append(f"config.export.dtype={export.dtype!r}: use bfloat16, float32 or float16")
  return problems


def _training_problems(config) -> list[str]:
  # pylint: disable=import-outside-toplevel
  from balcap import optim
  from balcap.rl import losses
  problems = []
  for stage in ("vision_pretrain", "sft", "rl"):
    try:
      settings = optim.from_config(config[stage].optimizer)
      if config[stage].num_steps > 0:  # the schedule over this stage's steps
        optim.learning_rate_schedule(settings, config[stage].num_steps)
    except (ValueError, TypeError) as e:
      problems.append(f"config.{stage}.optimizer: {e} (config.{stage}.num_steps="
                      f"{config[stage].num_steps})")
  try:
    losses.from_config(config.rl.loss)
  except (ValueError, TypeError) as e:
    problems.append(f"config.rl.loss: {e}")
  if config.sft.target not in ("sft_caption", "reference"):
    problems.append(f"config.sft.target={config.sft.target!r}: use sft_caption or reference")
  if config.sft.target == "sft_caption" and config.data.name != "capworld" and (
      config.sft.num_steps > 0) and config.mode in ("sft", "train"):
    problems.append("config.sft.target='sft_caption' exists only in CapWorld; use 'reference'")
  if config.sft.num_steps > 0 and config.mode in ("sft", "train"):
    from balcap import grounding, vision_pretrain
    problems.extend(grounding.check_config(config))
    problems.extend(vision_pretrain.check_config(config))
    every = config.sft.image_gain_every
    if every < 0 or every % config.metrics.log_every_steps:
      problems.append(f"config.sft.image_gain_every={every}: use 0 (off) or a multiple of "
                      f"config.metrics.log_every_steps={config.metrics.log_every_steps} (the "
                      "steps whose metrics are written)")
  rl = config.rl
  if rl.num_steps > 0:
    rows = rl.batch_size * rl.group_size
    if rl.micro_batch_size and rows % rl.micro_batch_size:
      problems.append(f"config.rl.micro_batch_size={rl.micro_batch_size} does not divide the "
                      f"{rows} rollouts of a step (batch_size x group_size)")
    if rl.group_size < 2:
      problems.append(f"config.rl.group_size={rl.group_size}: group normalisation needs >= 2")
  return problems
