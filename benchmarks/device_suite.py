"""One accelerator, one run, ~8 minutes: is a 3B-shaped policy as fast as it should be here?

    python benchmarks/device_suite.py                       # configs/qwen3b.py, random bf16
    python benchmarks/device_suite.py --accelerator h200 --prompts 16 --new-tokens 512
    python benchmarks/device_suite.py --tiny                # CPU smoke run (the test suite's)

The model: the config's architecture (default Qwen2.5-VL-3B), initialised at random, params
and compute in bfloat16, layers scanned, full remat (the config's), on ONE device. The shapes
are one device's share of the paper's RL step on an 8-GPU host (`hardware=gpu8`: 128 prompts
x G 8 over 8 devices): `--prompts` 16 prompts x G `--group` 8 = 128 rollouts of
`--new-tokens` 512, one 448 px image each, micro-batches of `--micro-rows` 8 rollouts.
Printed, each beside what it should be:
  1. decode: rollout tokens/s of the sampler's decode loop (every row makes all its tokens:
     no end token), against the HBM-bandwidth bound (the decoder's weights read once per step
     + the KV cache read + the new keys/values written, over the chip's bandwidth:
     `balcap/aot/hardware.py`), and against transformers' `generate` on the same weights on
     the same device (`num_return_sequences=G`, the same length; Qwen, when torch sees a GPU
     or with --tiny);
  2. one RL update's model-FLOP utilisation: the model FLOPs of `balcap/aot/ideal.py` (the
     compile report's formula, remat's extra forward included) over the time, against the
     chip's peak bf16 FLOP/s;
  3. peak device memory during the update (`memory_stats`, where the backend keeps it)
     against what the compiled update said it needs (`memory_analysis`, as `mode=compile`).
Times are the best of `--repeats` calls after a compiling one.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

# pylint: disable=wrong-import-position
from balcap import models, optim, parallel, sampling, scoring, train_state
from balcap.aot import hardware, programs  # pylint: disable=wrong-import-position
from balcap.models import policy as policy_lib  # pylint: disable=wrong-import-position
from balcap.rl import losses, update  # pylint: disable=wrong-import-position


def load_config(path: str, args):
  spec = importlib.util.spec_from_file_location("suite_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("mode=train")
  c.model.dtype = c.model.param_dtype = "bfloat16"
  c.model.scan_layers = True
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  c.rl.batch_size, c.rl.group_size = args.prompts, args.group
  c.rl.micro_batch_size = args.micro_rows
  c.sampling.max_new_tokens = args.new_tokens
  c.compile.image_size = tuple(args.image_size)
  return c


def best_of(run, repeats: int) -> float:
  run()  # compiles
  best = float("inf")
  for _ in range(repeats):
    started = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - started)
  return best


def decode(builder, policy, raw, prepared, repeats: int) -> dict[str, float]:
  """Seconds of the whole sampler and of its prefill alone; their difference is decoding."""
  spec = dataclasses.replace(builder.spec(), eos_token_ids=(), temperature=1.0)
  inputs = parallel.global_inputs(policy_lib.model_inputs(prepared), policy.mesh)
  start = policy.family.decode_start(policy.config, prepared).astype(np.int32)
  rng = jax.random.key(0)

  def sample():
    rollouts = sampling.generate_prepared(policy, policy.params, inputs, start, rng, spec)
    jax.block_until_ready(rollouts.tokens)
    assert int(np.min(np.asarray(rollouts.lengths))) == spec.max_new_tokens

  module = sampling.decode_module(policy.module)
  cast = sampling.decode_params(policy.params, spec.weights_dtype)
  prefill = jax.jit(lambda p, x: module.apply({"params": p}, **x, method=module.prefill))
  whole = best_of(sample, repeats)
  first = best_of(lambda: jax.block_until_ready(prefill(cast, inputs)), repeats)
  return {"whole": whole, "prefill": first, "decode": max(whole - first, 1e-9)}


def transformers_decode(policy, raw, group: int, new_tokens: int, repeats: int) -> float | None:
  """Seconds of transformers' generate at the same shape on the same weights, or None."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if policy.family.model_type != "qwen2_5_vl":
    return None
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu" and jax.devices()[0].platform != "cpu":
    return None  # a CPU torch beside a GPU jax compares nothing
  with tempfile.TemporaryDirectory() as folder:
    policy.save_pretrained(folder, dtype="bfloat16")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folder, torch_dtype=torch.bfloat16).to(device).eval()
  tensors = {"input_ids": torch.tensor(raw["input_ids"], dtype=torch.long),
             "attention_mask": torch.tensor(raw["attention_mask"]),
             "pixel_values": torch.tensor(raw["pixel_values"], dtype=torch.bfloat16),
             "image_grid_thw": torch.tensor(raw["image_grid_thw"])}
  tensors = {k: v.to(device) for k, v in tensors.items()}

  def generate():
    with torch.no_grad():
      out = model.generate(**tensors, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           num_return_sequences=group, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens)
    if device == "cuda":
      torch.cuda.synchronize()
    assert out.shape[1] - tensors["input_ids"].shape[1] == new_tokens
  return best_of(generate, repeats)


def rl_update(builder, policy, raw, args) -> dict[str, float]:
  """Seconds of one update at the RL shape, its compiled memory, the device's peak."""
  config = builder.config
  rows = args.prompts * args.group
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, min(1000, policy.config.text.vocab_size),
                        (rows, args.new_tokens)).astype(np.int32)
  lengths = np.full((rows,), args.new_tokens, np.int32)
  continuations = scoring.continuation_batch(policy, raw, tokens, lengths, args.group)
  placed = parallel.global_inputs({"old": np.full(tokens.shape, -3.0, np.float32),
                                   "advantages": rng.normal(size=rows).astype(np.float32)},
                                  policy.mesh)
  batch = update.RolloutBatch(continuations, placed["old"], placed["advantages"])
  optimizer = optim.make_optimizer(optim.from_config(config.rl.optimizer), total_steps=100)
  holder = {"state": train_state.initial_state(policy, optimizer, 0)}
  step = update.make_update(policy.module, optimizer, losses.from_config(config.rl.loss),
                            num_micro_batches=rows // args.micro_rows, num_passes=1,
                            temperature=1.0, mesh=policy.mesh)
  compiled = step.lower(holder["state"], batch).compile().memory_analysis()
  predicted = (compiled.argument_size_in_bytes + compiled.output_size_in_bytes
               - compiled.alias_size_in_bytes + compiled.temp_size_in_bytes
               + compiled.generated_code_size_in_bytes)

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics)
  seconds = best_of(run, args.repeats)
  stats = jax.devices()[0].memory_stats() or {}
  return {"seconds": seconds, "predicted": predicted,
          "peak": stats.get("peak_bytes_in_use"), "prompt": continuations.prompt_length}


def main(argv=None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "qwen3b.py"))
  parser.add_argument("--accelerator", default="h100", choices=sorted(hardware.ACCELERATORS))
  parser.add_argument("--prompts", type=int, default=16)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--new-tokens", type=int, default=512)
  parser.add_argument("--micro-rows", type=int, default=8)
  parser.add_argument("--image-size", type=int, nargs=2, default=(448, 448))
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--skip-transformers", action="store_true")
  parser.add_argument("--tiny", action="store_true",
                      help="configs/tiny.py's model at toy shapes: a smoke run on any machine")
  args = parser.parse_args(argv)
  if args.tiny:
    args.config = os.path.join(REPO, "configs", "tiny.py")
    args.prompts, args.group, args.new_tokens, args.micro_rows = 2, 2, 8, 2
    args.image_size, args.repeats = (56, 56), 1
  chip = hardware.ACCELERATORS[args.accelerator]
  on_cpu = jax.devices()[0].platform == "cpu"

  config = load_config(args.config, args)
  mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:1])
  builder = programs.Builder(config, mesh)
  policy = models.policy_from_config(config.model, jax.random.key(0), mesh=mesh)
  raw, prepared = builder.prompts(args.prompts)
  rows = args.prompts * args.group
  prompt = prepared["input_ids"].shape[1]
  count = builder.text_params + builder.vision_params
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); bounds for "
        f"{chip.name}{' (not this machine: a CPU smoke run)' if on_cpu else ''}")
  print(f"model: {config.model.architecture['family']}, {count / 1e6:,.1f}M params bf16; "
        f"{args.prompts} prompts x G {args.group}, prompt {prompt} tokens, "
        f"{args.new_tokens} new")

  # 1. Decode.
  timed = decode(builder, policy, raw, prepared, args.repeats)
  tokens_per_s = rows * args.new_tokens / timed["decode"]
  dims = builder.dims
  kv_bytes = 2 * dims.text_layers * dims.kv_heads * dims.head_dim * 2  # bf16 keys + values
  mean_cache = args.prompts * prompt + rows * args.new_tokens / 2  # prefix + the mean suffix
  step_bytes = builder.weight_bytes(vision=False) + (mean_cache + rows) * kv_bytes
  bound = rows * chip.hbm_bandwidth / step_bytes
  result = {"decode_tokens_per_s": tokens_per_s, "decode_bound_tokens_per_s": bound}
  step_ms = timed["decode"] / args.new_tokens * 1e3
  print(f"decode: {tokens_per_s:,.0f} rollout tokens/s ({step_ms:.2f} ms a step; prefill "
        f"{timed['prefill'] * 1e3:.0f} ms); HBM bound {bound:,.0f} tokens/s "
        f"({step_bytes / 1e9:.2f} GB a step): {tokens_per_s / bound:.0%} of it")
  reference = (None if args.skip_transformers else
               transformers_decode(policy, raw, args.group, args.new_tokens, args.repeats))
  if reference is None:
    print("transformers generate: skipped (--skip-transformers, not Qwen, or no GPU for torch)")
  else:
    theirs = rows * args.new_tokens / reference
    result["transformers_tokens_per_s"] = theirs
    print(f"transformers generate: {theirs:,.0f} tokens/s (prefill included); balcap / "
          f"transformers = {rows * args.new_tokens / timed['whole'] / theirs:.2f} (both with "
          f"prefill)")

  # 2-3. One RL update.
  measured = rl_update(builder, policy, raw, args)
  flops = builder.training_factor() * builder.forward_flops(
      rows, prompt + args.new_tokens, prompt + args.new_tokens, args.new_tokens, args.prompts,
      builder.patches_per_image(raw))
  mfu = flops / measured["seconds"] / chip.peak_flops
  result.update(update_seconds=measured["seconds"], mfu=mfu,
                predicted_bytes=measured["predicted"], peak_bytes=measured["peak"])
  print(f"RL update: {rows} rollouts in {rows // args.micro_rows} micro-batches, "
        f"{measured['seconds']:.2f} s, {flops / 1e12:.1f} model TFLOP: MFU {mfu:.1%} of "
        f"{chip.peak_flops / 1e12:.0f} TFLOP/s")
  peak = measured["peak"]
  print(f"memory: the compiled update needs {measured['predicted'] / 2**30:.2f} GiB; device peak "
        + (f"{peak / 2**30:.2f} GiB" if peak else "not kept by this backend"))
  return result


if __name__ == "__main__":
  main()
