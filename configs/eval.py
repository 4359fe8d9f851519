"""Mode `eval`: score a captioner on DCScore, CaptionQA, CapArena-Auto, b-CapScore and the
classic metrics (README, Evaluating).

    # a balcap run's trained params (its latest checkpoint), model settings from `model`:
    python -m balcap.main --config=configs/eval.py:model=qwen7b,hardware=gpu8 \
        --config.eval.run=runs/qwen7b --workdir=runs/qwen7b \
        --config.eval.decapbench=/data/DeCapBench --config.eval.captionqa=/data/CaptionQA \
        --config.eval.caparena=/data/CapArena --config.eval.judge.base_url=http://judge:8000 \
        --config.eval.judge.model=Qwen/Qwen2.5-VL-72B-Instruct \
        --config.rewards.openai.base_url=http://judge:8000 --config.rewards.openai.model=...
    # an HF checkpoint as it is (a baseline): --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct
    # another model's captions ({"id", "caption"} per line): --config.eval.captions=theirs.jsonl

`model` (qwen3b, qwen7b, llava7b, tiny) takes the architecture, mesh and rewards' judge of that
config; captions are greedy, up to 512 new tokens (the paper's 3B captions average 175 words).
Benchmarks: DCScore, CaptionQA, CapArena-Auto and the classic metrics; add `capscore`
(b-CapScore on config.data's test split, by the rewards' judge) with your data and judge set.
Results go to <workdir>/eval/: <benchmark>.json, <benchmark>.jsonl, report.md.
"""

import importlib.util
import os


def _shipped(name, arg):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  if not os.path.exists(path):
    raise ValueError(f"configs/eval.py:model={name}: no configs/{name}.py")
  spec = importlib.util.spec_from_file_location(f"balcap_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  from balcap import configs  # pylint: disable=import-outside-toplevel
  arg = configs.parse_arg(arg, model="qwen7b", hardware="")
  extra = f"mode=eval,hardware={arg.hardware}" if arg.hardware else "mode=eval"
  c = _shipped(arg.model, extra)
  c.mode = "eval"
  c.sampling.temperature = 0.0       # greedy captions, as the paper's tables
  if arg.model != "tiny":
    c.sampling.max_new_tokens = 512
    # b-CapScore needs your held-out data (config.data) and the rewards' judge: add
    # "capscore" to the list with --config.data.* and --config.rewards.openai.* set.
    c.eval.benchmarks = ("dcscore", "captionqa", "caparena", "classic")
  return c
