"""tlb-rl: reinforcement learning with swappable sequence-memory cores.

The memory of a policy is a *core* (``tlb_rl.cores``); the Temporal Latent Bottleneck is the flagship.
"""

__version__ = "0.1.0"
