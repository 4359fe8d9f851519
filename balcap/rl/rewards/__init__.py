"""Reward functions and judges (see types.py for the protocol)."""
