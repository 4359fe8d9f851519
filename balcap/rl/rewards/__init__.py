"""Rewards and judges: precision with pointability, recall, linguistic quality, length ratio.

    reward = factory.reward_from_config(config, workdir)  # JudgeReward over the configured judge
    batch = reward.result(reward.submit(samples), samples, config.rewards.deadline_s)

Judges (one protocol, `types.Judge`): `capworld_judge.CapWorldJudge` (exact, CapWorld only),
`llm_judge.OpenAIChatJudge` (any OpenAI-compatible server), `llm_judge.LocalJudge` (a balcap
policy through the sampler). Their chat backends live in `balcap.chat`, shared with `evals/`.
"""

from balcap.rl.rewards.functions import (COMPONENTS, JudgeReward, RewardBatch, b_capscore,
                                         length_ratio, make_samples)
from balcap.rl.rewards.types import FAILURE_CAUSES, Judge, Judgement, Sample

__all__ = ["COMPONENTS", "FAILURE_CAUSES", "Judge", "JudgeReward", "Judgement", "RewardBatch",
           "Sample", "b_capscore", "length_ratio", "make_samples"]
