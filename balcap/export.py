"""Mode `export`: a run's trained params as an HF folder that transformers loads (vLLM's layout).

    python -m balcap.main --config=configs/qwen7b.py:mode=export --workdir=runs/qwen7b
    python -m balcap.main --config=configs/qwen7b.py:mode=export --config.export.run=runs/x \
        --config.export.stage=sft --config.export.output=/ckpt/balcap-sft

Reads the params of the run's latest checkpoint (config.export.stage / step pick another) onto
this machine's mesh, and writes config.json, the safetensors weights (config.export.dtype) and
the base folder's tokenizer and processor files, so the export is a drop-in replacement of the
model the run started from.
"""

from __future__ import annotations

import os

import jax

from balcap import parallel, trained


def run(config, workdir: str) -> str:
  """Writes the export; returns its folder."""
  e = config.export
  source = trained.find(e.run or workdir, e.stage, e.step)
  policy = trained.load(source, mesh=parallel.make_mesh(config.mesh), base=config.model.checkpoint)
  output = e.output or os.path.join(source.run, "export", f"{source.stage}_{source.step}")
  policy.save_pretrained(output, dtype=e.dtype)
  if jax.process_index() == 0:
    count = sum(x.size for x in jax.tree.leaves(policy.params))
    tokenizer = "with" if policy.source else "WITHOUT"
    print(f"export: {source.describe()}, {policy.family.model_type}, {count / 1e6:.2f}M "
          f"parameters in {e.dtype}, {tokenizer} tokenizer files -> {output}", flush=True)
  return output
