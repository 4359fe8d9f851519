"""Qwen2.5-VL forward speed against transformers, and host memory while loading a checkpoint.

    python benchmarks/qwen_forward.py [--steps 5] [--batch 8] [--image 224]

One ~60M-parameter Qwen2.5-VL-shaped model (text h512, 8 layers, 8/2 heads, vocab 32000;
vision depth 4, h256), random weights written by transformers as a multi-file checkpoint.
1. Loading, each in a fresh process: peak resident memory above the post-import baseline,
   against the checkpoint size and its largest tensor (on a CPU the "devices" are host
   memory too, so the loaded params themselves stay resident; the transient overhead is the
   peak minus the final resident size).
2. Forward passes on the same weights and inputs (fp32, 2 threads each): tokens/s of balcap's
   jitted forward and of transformers, and the ratio, for text + image batches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))


def write_model(folder: str) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  config = transformers.Qwen2_5_VLConfig(
      text_config=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                        "mrope_section": [8, 12, 12]}),
      vision_config=dict(depth=4, hidden_size=256, intermediate_size=768, num_heads=4,
                         out_hidden_size=512, window_size=112, fullatt_block_indexes=[3]),
      image_token_id=31995, video_token_id=31996, vision_start_token_id=31997,
      vision_end_token_id=31998)
  torch.manual_seed(0)
  model = transformers.Qwen2_5_VLForConditionalGeneration(config)
  model.save_pretrained(folder, max_shard_size="40MB")


_MEASURE = r"""
import json, sys, os
def status(field):
  for line in open("/proc/self/status"):
    if line.startswith(field):
      return int(line.split()[1]) * 1024
import jax, numpy as np, torch, transformers
from balcap import models
jax.numpy.zeros(1).block_until_ready()  # start the backend: its pools are not the loader's
baseline = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to now
if sys.argv[2] == "balcap":
  policy = models.load_pretrained(sys.argv[1])
  jax.block_until_ready(policy.params)
else:
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(sys.argv[1])
print(json.dumps({"baseline": baseline, "peak": status("VmHWM:"), "final": status("VmRSS:")}))
"""


def measure_loading(folder: str, loader: str) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", _MEASURE, folder, loader], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def checkpoint_sizes(folder: str) -> tuple[int, int, int]:
  from balcap.models import hf_io  # pylint: disable=import-outside-toplevel
  tensors = hf_io.checkpoint_tensors(folder)
  sizes = [t.end - t.start for t in tensors.values()]
  files = {t.path for t in tensors.values()}
  return sum(sizes), max(sizes), len(files)


def forward_speed(folder: str, steps: int, batch_size: int, image_side: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import qwen_fixtures  # pylint: disable=import-outside-toplevel
  from balcap import models  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  policy = models.load_pretrained(folder)
  reference = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
  grid = (1, image_side // 14, image_side // 14)
  rng = np.random.default_rng(0)
  qwen_fixtures.IMAGE_ID, qwen_fixtures.VISION_START, qwen_fixtures.VISION_END = (
      31995, 31997, 31998)
  inputs = qwen_fixtures.batch(rng, [(list(rng.integers(0, 31000, 64)), grid)] * batch_size)
  tokens = int(inputs["attention_mask"].sum())
  prepared = policy.prepare(inputs)

  def ours():
    jax.block_until_ready(policy.apply(policy.params, prepared))

  def theirs():
    qwen_fixtures.reference_logits(reference, inputs)

  results = {}
  for name, run in (("balcap", ours), ("transformers", theirs)):
    start = time.perf_counter()
    run()  # compile / warm up
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
      run()
    seconds = (time.perf_counter() - start) / steps
    results[name] = {"tokens_per_second": tokens / seconds, "seconds": seconds,
                     "first_call_seconds": first}
  results["tokens"] = tokens
  results["ratio"] = results["balcap"]["tokens_per_second"] / results[
      "transformers"]["tokens_per_second"]
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--image", type=int, default=224, help="image side in px (multiple of 28)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as folder:
    write_model(folder)
    total, largest, files = checkpoint_sizes(folder)
    mb = lambda n: f"{n / 2**20:.1f} MB"
    print(f"checkpoint: {mb(total)} in {files} files, largest tensor {mb(largest)}")
    for loader in ("balcap", "transformers"):
      m = measure_loading(folder, loader)
      print(f"load {loader:12s}: peak {mb(m['peak'] - m['baseline'])} above baseline, "
            f"resident after {mb(m['final'] - m['baseline'])}, transient "
            f"{mb(m['peak'] - m['final'])}")
    speed = forward_speed(folder, args.steps, args.batch, args.image)
    print(f"forward, batch {args.batch} x ({args.image}px image + 64 text tokens) = "
          f"{speed['tokens']} tokens, fp32, 2 threads:")
    for name in ("balcap", "transformers"):
      s = speed[name]
      print(f"  {name:12s}: {s['tokens_per_second']:8.0f} tokens/s ({s['seconds']:.3f} s/step;"
            f" first call {s['first_call_seconds']:.1f} s)")
    print(f"  ratio balcap / transformers: {speed['ratio']:.2f}x")


if __name__ == "__main__":
  main()
