"""The command layer: the ``tlb-rl`` CLI and the sample-efficiency studies, above ``agents/`` and ``envs/``."""
