"""The local judge on several hosts, run by tests/rl/test_local_judge.py in subprocesses.

    python tests/local_judge_program.py JUDGE_FOLDER [distributed]

Each host judges a different number of samples (so different requests, rounds and chunks)
through `JudgeReward(LocalJudge(...))`, then judges again with a deadline that has already
passed on host 0 only. Prints `JUDGED <json>` per call: a host that ran its device programs
out of step with the other would hang here instead.
"""

import json
import math
import sys

import jax
import numpy as np
from PIL import Image

from balcap import configs, models, parallel
from balcap.rl.rewards import functions, llm_judge
from balcap.rl.rewards.types import Sample


def image(seed):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), np.uint8))


def samples_of(host: int) -> list[Sample]:
  captions = [["a red circle", "", "two squares. a mood"], ["a blue square on the left"]][host]
  return [Sample(f"h{host}-{k}/0", caption, ("a red circle on the left",), image=image(k))
          for k, caption in enumerate(captions)]


def summary(batch) -> list:
  return [[j.id, {c: None if math.isnan(getattr(j, c)) else getattr(j, c)
                  for c in ("precision", "recall", "linguistic")}, j.failures]
          for j in batch.judgements]


def main(folder: str):
  mesh = parallel.make_mesh(configs.mesh_preset("cpu"))
  policy = models.load_pretrained(folder, mesh=mesh, scan_layers=False)
  host = jax.process_index()
  samples = samples_of(host)
  for deadline in (600.0, 0.0 if host == 0 else 600.0):
    judge = llm_judge.LocalJudge(policy, max_new_tokens=4, batch_size=2,
                                     deadline_s=deadline)
    reward = functions.JudgeReward(judge)
    batch = reward.result(reward.submit(samples), samples, deadline_s=600.0)
    print("JUDGED", json.dumps(summary(batch)), flush=True)


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[2] == "distributed":
    assert parallel.initialize_distributed()
  main(sys.argv[1])
