"""Sample-efficiency studies: ``tlb-rl compare`` runs a grid of training runs, ``tlb-rl report`` renders it.

Modules: :mod:`~commands.study.config` (the YAML study config and its grid), :mod:`~commands.study.runner`
(parallel, resumable runs: local processes or Ray), :mod:`~commands.study.stats` (IQM, bootstrap intervals,
frames to threshold, AUC: pure numpy/rliable), :mod:`~commands.study.report` (Markdown, JSON, PNG),
:mod:`~commands.study.sb3_baseline` (sb3-contrib RecurrentPPO as a row) and :mod:`~commands.study.compare`
(what the CLI calls). Algorithms are looked up in ``agents.ALGORITHMS``.
"""
