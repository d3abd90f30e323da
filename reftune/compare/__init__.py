"""Comparing methods: greedy top-1, voting@k and reward-model reranking@k per checkpoint, the
paper's numbers beside them, and the Markdown/HTML report.

Owns: `compare.py` (`run_compare`), `methods.py` (method names, paper numbers), `report.py`
(compare.md / compare.html), `plots.py` (every figure, the demo's learning curves too).
May import: inference, trainers (the reward model is trained here), tasks, models, runs.
"""
