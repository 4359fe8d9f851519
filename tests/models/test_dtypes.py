"""Dtypes at the policy API: any spelling in, a name transformers reads out."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from balcap import models
from qwen_fixtures import tiny_config, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen_dtypes"))
  write_checkpoint(folder, tiny_config(), seed=1)
  return folder


SPELLINGS = [("float32", "float32"), (jnp.float32, "float32"), (np.float32, "float32"),
             (np.dtype("float32"), "float32"), (jnp.dtype("float32"), "float32"),
             ("bfloat16", "bfloat16"), (jnp.bfloat16, "bfloat16"), (np.float16, "float16")]


@pytest.mark.parametrize("spelling,name", SPELLINGS, ids=lambda x: repr(x))
def test_load_in_any_spelling_then_export_loads_in_transformers(checkpoint, tmp_path, spelling,
                                                                name):
  policy = models.load_pretrained(checkpoint, dtype=spelling)
  assert policy.config.text.dtype == name and policy.config.vision.param_dtype == name
  out = str(tmp_path / "export")
  policy.save_pretrained(out)
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    written = json.load(f)
  assert written.get("dtype", written.get("torch_dtype")) == name
  # Before: dtype=jnp.float32 wrote a config.json transformers fails on ("module 'torch' has
  # no attribute 'numpy'").
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
  assert next(model.parameters()).dtype == getattr(torch, name)


@pytest.mark.parametrize("spelling", [jnp.bfloat16, np.dtype("float16"), "bfloat16"],
                         ids=repr)
def test_save_pretrained_dtype_in_any_spelling(checkpoint, tmp_path, spelling):
  policy = models.load_pretrained(checkpoint)
  out = str(tmp_path / "export")
  policy.save_pretrained(out, dtype=spelling)
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
  assert next(model.parameters()).dtype == getattr(torch, np.dtype(jnp.dtype(spelling)).name)


@pytest.mark.parametrize("bad", ["fp32", "int8", jnp.int32, 3])
def test_unusable_dtypes_are_refused_by_name(checkpoint, tmp_path, bad):
  with pytest.raises(ValueError, match=r"dtype=.* is not a dtype a policy can use"):
    models.load_pretrained(checkpoint, dtype=bad)
  policy = models.load_pretrained(checkpoint)
  with pytest.raises(ValueError, match=r"save_pretrained\(dtype=\.\.\.\)"):
    policy.save_pretrained(str(tmp_path / "x"), dtype=bad)
