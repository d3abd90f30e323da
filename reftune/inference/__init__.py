"""Inference on a trained policy: greedy top-1 evaluation, k graded samples per question
(resumable JSONL), majority voting@k and reward-model reranking@k.

Owns: `evaluate.py`, `sample.py`, `voting.py`, `rerank.py` (loading and scoring the reward model).
May import: engines, tasks, rewards, models, runs; never trainers.
"""
