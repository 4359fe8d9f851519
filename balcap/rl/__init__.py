"""Reinforcement learning for captioners: rewards and judges, advantages, losses, the learner."""
