"""Agents that train a ``tlb_rl`` sequence policy: PPO (online RL); evaluation helpers."""

from agents.ppo import PPO, PPOConfig

__all__ = ["PPO", "PPOConfig"]
