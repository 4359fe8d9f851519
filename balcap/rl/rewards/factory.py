"""The judge and reward function a config asks for (`config.rewards`)."""

from __future__ import annotations

import os
from typing import Callable

from balcap import paths
from balcap.rl.rewards.functions import JudgeReward, word_count
from balcap.rl.rewards.types import Judge


def judge_from_config(config, workdir: str, *, mesh=None) -> Judge:
  """capworld (exact), openai (any OpenAI-compatible endpoint) or local (a balcap policy)."""
  rewards = config.rewards
  if rewards.judge == "capworld":
    # pylint: disable-next=import-outside-toplevel
    from balcap.rl.rewards.capworld_judge import CapWorldJudge
    return CapWorldJudge(pointability=rewards.capworld.pointability)
  if rewards.judge == "openai":
    # pylint: disable-next=import-outside-toplevel
    from balcap.rl.rewards.llm_judge import OpenAIChatJudge
    o = rewards.openai
    return OpenAIChatJudge(
        o.base_url, o.model, api_key_env=o.api_key_env or None, timeout_s=o.timeout_s,
        max_concurrency=o.max_concurrency, max_retries=o.max_retries,
        deadline_s=rewards.deadline_s,
        # sqlite needs a local file: a gs:// workdir keeps its cache on each host's disk.
        cache_path=paths.local_mirror(o.cache_path or os.path.join(workdir, "judge_cache.db")))
  if rewards.judge == "local":
    # pylint: disable=import-outside-toplevel
    from balcap import models
    from balcap.rl.rewards.llm_judge import LocalJudge
    policy = models.load_pretrained(rewards.local.checkpoint, dtype=config.model.dtype,
                                    mesh=mesh, scan_layers=config.model.scan_layers)
    return LocalJudge(policy, max_new_tokens=rewards.local.max_new_tokens,
                      deadline_s=rewards.deadline_s)
  raise ValueError(f"config.rewards.judge={rewards.judge!r}: no such judge")


def reward_from_config(config, workdir: str, *, processor=None, mesh=None) -> JudgeReward:
  """The run's reward function; lengths in words, or in the policy's tokens."""
  count: Callable[[str], int] = word_count
  if config.rewards.length_unit == "tokens":
    if processor is None:
      raise ValueError("config.rewards.length_unit='tokens' needs the policy's processor")
    count = lambda text: len(processor.tokenizer.encode(text, add_special_tokens=False).ids)
  return JudgeReward(judge_from_config(config, workdir, mesh=mesh), count=count)
