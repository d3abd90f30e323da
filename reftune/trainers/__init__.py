"""Training: the RL math, the loop every trainer shares, and one file per trainer.

Owns: `algorithms.py` (PPO/GAE/KL math, torch only), `advantages.py` (the estimator registry),
`loop.py` (run folder, resume, evaluation, checkpoints, engine sync: written once),
`checkpoints.py`, `rollout.py` (a step's questions, sampled and scored), `policy.py` (forward
passes, value head), `supervised.py` (collation and cross-entropy, shared by the supervised
trainers), and the trainers: `sft.py`, `reft.py`, `online_st.py`, `offline_st.py` (composes `sft`:
Offline-ST is SFT on a rebuilt dataset), `reward_model.py`.
May import: inference, engines, tasks, rewards, models, runs, config. Trainers never import one
another for helpers: shared pieces live in the modules above.
"""
