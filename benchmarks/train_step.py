"""The RL update's speed, model FLOP utilisation and peak memory, and the SFT step's, on one
model in one run.

    python benchmarks/train_step.py [--prompts 2] [--group 4] [--new-tokens 128] [--micro 2]

Model: the ~60M-parameter Qwen2.5-VL shape of benchmarks/qwen_forward.py (text h512,
8 layers, 8/2 heads, vocab 32000; vision depth 4, h256), fp32, layers unrolled (the CPU
settings). RL update: prompts x G rollouts of a 224 px image (64 image tokens) + 32 text
tokens and `--new-tokens` generated tokens (all real: the worst case), split into `--micro`
micro-batches, one pass, AdamW. Printed, best of 3 calls:
  - rollout tokens/s (generated tokens trained on per second) and all tokens/s (prompt +
    continuation positions run forward and backward);
  - model FLOP/s: 3 x the forward matmul FLOPs (decoder weights, output layer over the
    continuation window, attention over each row's context, the vision tower once per
    update: the images are encoded once, whatever the micro-batches) against this
    machine's fp32 matmul peak measured in the same run (MFU);
  - peak resident memory above the level before the calls (on a CPU, device memory).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks"), os.path.join(REPO, "tests")]

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import qwen_fixtures  # pylint: disable=wrong-import-position
import qwen_forward  # pylint: disable=wrong-import-position
from balcap import models, optim, scoring, sft, train_state  # pylint: disable=wrong-import-position
from balcap.rl import losses, update  # pylint: disable=wrong-import-position
from benchlib import machine_peaks, measured  # pylint: disable=wrong-import-position

IMAGE_SIDE, TEXT_TOKENS = 224, 32


def forward_flops(config, rows: int, prompt: int, new: int, images: int, patches: int,
                  micro: int) -> float:
  """Matmul FLOPs of one forward over the update batch (see the module docstring)."""
  t, v = config.text, config.vision
  layer = t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
  layer += t.num_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
  positions = rows * (prompt + new)
  flops = 2 * positions * t.num_layers * layer
  flops += 2 * rows * new * t.vocab_size * t.hidden_size  # output layer, continuation only
  # Causal attention: position i reads i + 1 keys; scores and weighted values, 2 FLOPs each.
  length = prompt + new
  flops += rows * t.num_layers * 4 * t.num_heads * t.head_dim * length * (length + 1) / 2
  vision_layer = 4 * v.hidden_size ** 2 + 3 * v.hidden_size * v.intermediate_size
  vision = 2 * patches * images * v.depth * vision_layer
  merged = patches * images // 4
  vision += 2 * merged * (4 * v.hidden_size) * (4 * v.hidden_size + v.out_hidden_size)
  return flops + micro * vision


def rl_batch(policy, prompts: int, group: int, new: int):
  rng = np.random.default_rng(0)
  grid = (1, IMAGE_SIDE // 14, IMAGE_SIDE // 14)
  chats = qwen_fixtures.batch(rng, [(list(rng.integers(0, 31000, TEXT_TOKENS)), grid)] * prompts)
  tokens = rng.integers(0, 31000, (prompts * group, new)).astype(np.int32)
  lengths = np.full((prompts * group,), new, np.int32)
  continuations = scoring.continuation_batch(policy, chats, tokens, lengths, group)
  batch = update.RolloutBatch(
      continuations, jax.device_put(np.full(tokens.shape, -10.0, np.float32)),
      jax.device_put(rng.normal(size=len(tokens)).astype(np.float32)))
  return batch, continuations.prompt_length, int(grid[1] * grid[2])


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--prompts", type=int, default=2)
  parser.add_argument("--group", type=int, default=4)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--micro", type=int, default=2)
  args = parser.parse_args()
  # The 60M model's image and vision ids (qwen_fixtures defaults to its tiny models').
  qwen_fixtures.IMAGE_ID, qwen_fixtures.VISION_START, qwen_fixtures.VISION_END = (
      31995, 31997, 31998)
  peak_flops, _ = machine_peaks()
  print(f"machine: fp32 matmul peak {peak_flops / 1e9:.1f} GFLOP/s (2048^3, best of 10), "
        f"{jax.device_count()} device(s), {os.cpu_count()} cpus")
  with tempfile.TemporaryDirectory() as folder:
    qwen_forward.write_model(folder)
    policy = models.load_pretrained(folder, scan_layers=False)
  count = sum(x.size for x in jax.tree.leaves(policy.params))
  optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-6), total_steps=100)
  initial = jax.tree.map(np.asarray, policy.params)  # each step donates the params it gets
  state = train_state.initial_state(policy, optimizer, 0)

  batch, prompt_length, patches = rl_batch(policy, args.prompts, args.group, args.new_tokens)
  rows = args.prompts * args.group
  step = update.make_update(policy.module, optimizer, losses.LossConfig(),
                            num_micro_batches=args.micro,
                            num_passes=1, temperature=1.0)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics)

  seconds, memory = measured(run)
  # (The images are encoded once per update, not once per micro-batch.)
  flops = 3 * forward_flops(policy.config, rows, prompt_length, args.new_tokens,
                            args.prompts, patches, 1)
  all_tokens = rows * (prompt_length + args.new_tokens)
  print(f"model: {count / 1e6:.1f}M parameters, fp32")
  print(f"RL update: {args.prompts} prompts x G={args.group}, prompt {prompt_length} tokens "
        f"({patches // 4} image), {args.new_tokens} new, {args.micro} micro-batches")
  print(f"  {seconds:.2f} s/update, {rows * args.new_tokens / seconds:,.0f} rollout tokens/s, "
        f"{all_tokens / seconds:,.0f} tokens/s")
  print(f"  model FLOP/s {flops / seconds / 1e9:.1f} G = MFU {flops / seconds / peak_flops:.1%} "
        f"of the measured matmul peak")
  print(f"  peak memory above baseline {memory / 2**20:,.0f} MiB "
        f"(params + AdamW state {count * 12 / 2**20:,.0f} MiB)")

  chats = qwen_fixtures.batch(np.random.default_rng(1), [
      (list(np.random.default_rng(i).integers(0, 31000, TEXT_TOKENS + args.new_tokens)),
       (1, IMAGE_SIDE // 14, IMAGE_SIDE // 14)) for i in range(rows)])
  inputs = models.policy.model_inputs(policy.family.prepare_batch(policy.config, chats))
  inputs["loss_mask"] = np.asarray(chats["attention_mask"])
  sft_step = sft.make_step(policy.module, optimizer, None)
  inputs = jax.device_put(inputs)
  policy.params = jax.device_put(initial)
  holder["state"] = train_state.initial_state(policy, optimizer, 0)

  def run_sft():
    holder["state"], metrics = sft_step(holder["state"], inputs)
    jax.block_until_ready(metrics)

  seconds, memory = measured(run_sft)
  length = inputs["input_ids"].shape[1]
  sft_flops = 3 * (forward_flops(policy.config, rows, length, 0, rows, patches, 1)
                   + 2 * rows * length * policy.config.text.vocab_size
                   * policy.config.text.hidden_size)
  print(f"SFT step: {rows} chats x {length} tokens: {seconds:.2f} s/step, "
        f"{rows * length / seconds:,.0f} tokens/s, MFU {sft_flops / seconds / peak_flops:.1%}, "
        f"peak memory above baseline {memory / 2**20:,.0f} MiB")


if __name__ == "__main__":
  main()
