"""Sampling speed and memory against transformers' generate, on the same weights, in one run.

    python benchmarks/sampling.py [--new-tokens 128] [--skip-transformers]

Model: the ~60M-parameter Qwen2.5-VL shape of benchmarks/qwen_forward.py (text h512, 8 layers,
8/2 heads, vocab 32000; vision depth 4, h256), fp32 (bf16 matrix-vector work is many times
slower on CPUs), decoder layers unrolled (the CPU setting), 2 threads for both libraries.
Shapes:
  (a) batch 1: one 224 px image (64 image tokens) + 32 text tokens, 128 new tokens;
  (b) the RL shape: 8 prompts x G = 8, a 448 px image (256 image tokens) + 32 text tokens,
      128 new tokens; transformers expands the prompts with num_return_sequences.
Both sample at temperature 1 with no truncation and no early end (every row makes all its tokens).
Times are the best of 3 calls (2 for transformers in the RL shape). Printed: tokens/s and peak
resident memory above the pre-call level for each library and the ratio; the decode phase's matmul
FLOP/s (weights and attention over the real context, no embedding lookup) against this machine's
fp32 matmul peak measured here; and at batch 1 the weight bytes read per second against a streaming
matrix-vector bandwidth.
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
import torch  # pylint: disable=wrong-import-position
import transformers  # pylint: disable=wrong-import-position

import qwen_fixtures  # pylint: disable=wrong-import-position
from benchlib import machine_peaks, measured  # pylint: disable=wrong-import-position
import qwen_forward  # pylint: disable=wrong-import-position
from balcap import models, sampling  # pylint: disable=wrong-import-position

IMAGE, VIDEO, START, END = 31995, 31996, 31997, 31998


def prompts(batch: int, image_side: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  grid = (1, image_side // 14, image_side // 14)
  return qwen_fixtures.batch(rng, [(list(rng.integers(0, 31000, 32)), grid)] * batch)


def run_balcap(policy, inputs, group: int, new_tokens: int):
  def run(steps=new_tokens):
    out = sampling.generate(policy, policy.params, inputs, jax.random.key(0),
                            max_new_tokens=steps, num_samples=group, eos_token_ids=())
    jax.block_until_ready(out.tokens)
  return run


def run_transformers(model, inputs, group: int, new_tokens: int):
  ids = torch.tensor(inputs["input_ids"], dtype=torch.long)
  kwargs = dict(input_ids=ids, attention_mask=torch.tensor(inputs["attention_mask"]),
                pixel_values=torch.tensor(inputs["pixel_values"]),
                image_grid_thw=torch.tensor(inputs["image_grid_thw"]),
                mm_token_type_ids=(ids == IMAGE).int())

  def run():
    with torch.no_grad():
      model.generate(**kwargs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                     max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                     num_return_sequences=group, pad_token_id=0)
  return run


def decode_flops_per_step(config, rows: int, context: float) -> float:
  """Matmul FLOPs of one decode step: weights (layers + output projection) and attention
  scores and weighted values over `context` keys, no embedding lookup."""
  t = config.text
  per_layer = t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
  per_layer += t.num_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
  weights = t.num_layers * per_layer + t.vocab_size * t.hidden_size
  attention = t.num_layers * 2 * t.num_heads * t.head_dim * context
  return 2 * rows * (weights + attention), 4 * weights  # FLOPs, fp32 weight bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--skip-transformers", action="store_true")
  args = parser.parse_args()
  torch.set_num_threads(2)
  qwen_fixtures.IMAGE_ID, qwen_fixtures.VISION_START, qwen_fixtures.VISION_END = (IMAGE, START,
                                                                                    END)
  peak_flops, bandwidth = machine_peaks()
  print(f"machine: fp32 matmul peak {peak_flops / 1e9:.0f} GFLOP/s, streaming matvec "
        f"{bandwidth / 1e9:.1f} GB/s (jax {jax.__version__}, torch {torch.__version__})")
  n = args.new_tokens
  shapes = (("(a) batch 1", 1, 1, 224), ("(b) 8 prompts x G=8", 8, 8, 448))
  with tempfile.TemporaryDirectory() as folder:
    qwen_forward.write_model(folder)
    policy = models.load_pretrained(folder, scan_layers=False)
    ours = {}
    # balcap first: torch's OpenMP threads keep spinning after its calls and would slow XLA.
    for name, batch, group, side in shapes:
      run = run_balcap(policy, prompts(batch, side), group, n)
      seconds, memory = measured(run)
      prefill_seconds, _ = measured(lambda run=run: run(1))
      ours[name] = (seconds, memory, prefill_seconds)
    theirs = {}
    if not args.skip_transformers:
      reference = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
      for name, batch, group, side in shapes:
        theirs[name] = measured(run_transformers(reference, prompts(batch, side), group, n),
                                repeats=2 if batch * group > 1 else 3)
    for name, batch, group, side in shapes:
      rows, prompt_tokens = batch * group, prompts(batch, side)["input_ids"].shape[1]
      seconds, memory, prefill_seconds = ours[name]
      decode_seconds = seconds - prefill_seconds
      print(f"{name}: prompt {prompt_tokens} tokens, {rows} rows x {n} new tokens")
      print(f"  balcap       {rows * n / seconds:8.0f} tokens/s  {seconds:6.2f} s  peak "
            f"+{memory / 2**20:.0f} MB  (prefill {prefill_seconds:.2f} s)")
      if name in theirs:
        theirs_seconds, theirs_memory = theirs[name]
        print(f"  transformers {rows * n / theirs_seconds:8.0f} tokens/s  {theirs_seconds:6.2f} s"
              f"  peak +{theirs_memory / 2**20:.0f} MB")
        print(f"  ratio balcap / transformers: {theirs_seconds / seconds:.2f}x")
      flops, weight_bytes = decode_flops_per_step(policy.config, rows, prompt_tokens + n / 2)
      achieved = flops * (n - 1) / decode_seconds
      print(f"  decode: {decode_seconds / (n - 1) * 1e3:.1f} ms/step, {achieved / 1e9:.0f} "
            f"GFLOP/s = {achieved / peak_flops:.0%} of the fp32 matmul peak", end="")
      if rows == 1:
        moved = weight_bytes * (n - 1) / decode_seconds
        print(f"; weights read at {moved / 1e9:.1f} GB/s = {moved / bandwidth:.0%} of the "
              "streaming bandwidth")
      else:
        print()

if __name__ == "__main__":
  main()
