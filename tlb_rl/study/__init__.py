"""Sample-efficiency studies: ``tlb-rl compare`` runs a grid of training runs, ``tlb-rl report`` renders it.

Modules: :mod:`~tlb_rl.study.config` (the YAML study config and its grid), :mod:`~tlb_rl.study.runner`
(parallel, resumable runs: local processes or Ray), :mod:`~tlb_rl.study.stats` (IQM, bootstrap intervals,
frames to threshold, AUC: pure numpy/rliable), :mod:`~tlb_rl.study.report` (Markdown, JSON, PNG),
:mod:`~tlb_rl.study.sb3_baseline` (sb3-contrib RecurrentPPO as a row), :mod:`~tlb_rl.study.commands`
(what the CLI calls) and :mod:`~tlb_rl.study.tmaze_sweep` (the longest T-maze corridor each core learns).
Like ``tlb_rl/cli.py``, this package is the command layer: it may import agents/ and envs/, which the rest
of ``tlb_rl`` never does.
"""
