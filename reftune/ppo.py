"""ReFT: PPO from the warm-up checkpoint with answer-correctness rewards (the paper's stage 2).

The whole algorithm is `run_reft`, a plain loop with numbered steps. The math lives in
`reftune.algorithms` (pure functions); sampling and scoring in `reftune.rollout`.
Defaults reproduce the authors' release; the options beyond it (several samples per prompt,
k3 KL, KL as a loss, critic-free GRPO/RLOO advantages) are off by default.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reftune import algorithms as A
from reftune.tasks import DataConfig

KL_COEF_BY_STYLE = {"nl": 0.05, "program": 0.01}  # the release's defaults (0.01 for MathQA-numeric N-CoT)


@dataclass
class ReFTConfig:
    """`reftune train`: PPO from a warm-up SFT checkpoint (ReFT)."""

    model: str = ""
    """Warm-up SFT checkpoint (policy init and, unless ref_model is set, the frozen reference)."""
    ref_model: str = ""
    """Frozen reference for the KL penalty (empty: the same checkpoint as `model`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task: the same training questions as the warm-up SFT."""
    out_dir: str = "runs/reft"
    """Run folder: config, metrics, checkpoints."""
    steps: int = 100
    """PPO iterations (each: one rollout batch, then ppo_epochs of updates)."""
    questions_per_step: int = 32
    """Training questions sampled per iteration (the release: 32)."""
    samples_per_prompt: int = 1
    """CoTs sampled per question (the paper: 1; GRPO/RLOO need >= 2)."""
    mini_batch_size: int = 8
    """Sequences per optimizer step inside a PPO epoch."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    lr: float = 3e-7
    """AdamW learning rate, constant (the release: 3e-7 for 7B, 3e-6 for 125M)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    advantage: str = "gae"
    """gae (the paper: value head + GAE) | grpo | rloo (critic-free, no value head)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten GAE advantages over all response tokens of the rollout batch."""
    clip: float = 0.2
    """Policy ratio clip."""
    vf_clip: float = 0.2
    """Value clip around the rollout-time values."""
    vf_coef: float = 5.0
    """Weight of the value loss (the release: 5)."""
    value_dropout: float = 0.1
    """Dropout before the value head's linear layer."""
    kl_coef: float | None = None
    """KL weight; None: 0.05 for nl, 0.01 for program CoTs (the release)."""
    kl_estimator: str = "k1"
    """k1 (log-ratio, the paper) | k3 (non-negative, low variance)."""
    kl_in_reward: bool = True
    """True: -kl_coef*KL in every token's reward (the paper). False: kl_coef*KL as a loss term."""
    score_correct: float = 1.0
    """Reward of a correct answer."""
    score_wrong: float = 0.1
    """Reward of an extracted but wrong answer."""
    score_none: float = 0.0
    """Reward when no answer could be extracted."""
    temperature: float = 1.0
    """Sampling temperature for rollouts."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts (1: off)."""
    max_new_tokens: int = 400
    """Longest sampled CoT (the release: 700 total incl. a prompt of up to 300)."""
    eval_every: int = 10
    """Iterations between greedy evaluations (0: only at the end)."""
    eval_split: str = "validation"
    """Split for periodic evaluation and best-checkpoint selection: validation | test."""
    eval_max_new_tokens: int = 400
    """Longest CoT in evaluation."""
    save_every: int = 10
    """Iterations between resumable checkpoints (0: only at the end)."""
    engine: str = "cached"
    """Generation engine: cached (built-in KV-cache sampler) | hf (model.generate)."""
    gen_batch_size: int = 64
    """Sequences decoded at once."""
    seed: int = 0
    """Seed for question order, sampling and dropout."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16"""
    mixed_precision: str = "no"
    """Forward passes under bf16 autocast, weights and optimizer in fp32: no | bf16 | auto (where bf16 is native)."""
    tensorboard: bool = True
    """Also write TensorBoard events."""
    progress: bool = True
    """Show a progress bar."""


def policy_forward(model, value_head, input_ids, attention_mask, response_ids, response_start, temperature=1.0):
    """Log-probs (B, R) of the response tokens, values (B, R) or None, and the logits (B, R, V).

    Logits are divided by the sampling temperature, so the log-probs are those of the
    distribution the rollouts were drawn from (the PPO ratio is then on-policy at any temperature).
    """
    from reftune.modeling import forward_logits_values

    logits, values = forward_logits_values(model, value_head, input_ids, attention_mask, response_start)
    if torch.is_autocast_enabled(logits.device.type):
        # bf16 autocast over fp32 weights: take the logits back to fp32, as without autocast. (With
        # bf16 weights, logprobs_from_logits upcasts row by row instead, to spare GPU memory.)
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return A.logprobs_from_logits(logits, response_ids), values, logits


def compute_advantages(cfg: ReFTConfig, scores, old_logprobs, ref_logprobs, old_values, response_mask, kl_coef):
    """Rewards -> (advantages, returns) for the configured estimator. All (B, R) but scores (B,)."""
    kl = A.kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator)
    if cfg.advantage == "gae":
        rewards = A.token_rewards(scores, kl if cfg.kl_in_reward else torch.zeros_like(kl), response_mask, kl_coef)
        advantages, returns = A.gae(rewards, old_values, response_mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = A.masked_whiten(advantages, response_mask)
        return advantages, returns
    # Critic-free: a sequence-level advantage from the group of samples of each question. The KL
    # then acts through the loss (kl_in_reward is ignored: there is no per-token credit to shape).
    seq_adv = A.group_advantages(scores, cfg.samples_per_prompt, cfg.advantage)
    return A.broadcast_sequence_advantages(seq_adv, response_mask), None


def validate(cfg: ReFTConfig) -> None:
    """Refuse a bad config before any model is loaded or any folder written."""
    if cfg.steps < 1:
        raise ValueError(f"steps must be at least 1, got {cfg.steps}")
    if cfg.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"kl_estimator must be k1 or k3, got {cfg.kl_estimator!r}")
    if cfg.engine not in ("cached", "hf"):
        raise ValueError(f"engine must be cached or hf, got {cfg.engine!r}")
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be positive, got {cfg.temperature}")
    if cfg.advantage not in ("gae", "grpo", "rloo"):
        raise ValueError(f"advantage must be gae, grpo or rloo, got {cfg.advantage!r}")
    if cfg.advantage != "gae" and cfg.samples_per_prompt < 2:
        raise ValueError(f"advantage={cfg.advantage} compares samples of one question: set samples_per_prompt >= 2")
    if cfg.eval_split not in ("validation", "test"):
        raise ValueError(f"eval_split must be validation or test, got {cfg.eval_split!r}")
    if cfg.questions_per_step * cfg.samples_per_prompt < cfg.mini_batch_size:
        raise ValueError("mini_batch_size is larger than the rollout batch (questions_per_step * samples_per_prompt)")


def run_reft(cfg: ReFTConfig, resume: bool = False, task=None) -> dict:
    """Train with PPO; returns {"best_checkpoint", "best_accuracy", "last_checkpoint", "history"}."""
    from reftune.evaluate import evaluate
    from reftune.generation import make_generator
    from reftune.modeling import (ValueHead, autocast, load_causal_lm, load_tokenizer, resolve_device, resolve_dtype,
                                   resolve_mixed_precision)
    from reftune.rollout import load_latest, rng_state, sample_and_score, save_best, save_rl_checkpoint, set_rng_state, step_questions
    from reftune.tasks import load_task
    from reftune.tracking import RunLogger, progress, start_run, write_json

    # 1. Run folder, task, seeds.
    validate(cfg)
    device = resolve_device(cfg.device)
    amp = resolve_mixed_precision(cfg.mixed_precision, device)  # a bad mode fails here, before any folder
    run_dir = start_run(cfg.out_dir, cfg, resume=resume)
    task = task or load_task(cfg.data)
    kl_coef = cfg.kl_coef if cfg.kl_coef is not None else KL_COEF_BY_STYLE[task.style]
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dtype = resolve_dtype(cfg.dtype, device)

    # 2. Policy (warm-up model + value head), frozen reference, optimizer, generator.
    latest = load_latest(run_dir) if resume else None
    if resume and latest is None:
        raise FileNotFoundError(f"--resume {run_dir}: no checkpoint there (latest.json missing)")
    policy_path = str(latest[0] / "policy") if latest else cfg.model
    tokenizer = load_tokenizer(policy_path)
    model = load_causal_lm(policy_path, device, dtype)
    ref_model = load_causal_lm(cfg.ref_model or cfg.model, device, dtype).eval().requires_grad_(False)
    value_head = None
    if cfg.advantage == "gae":
        value_head = ValueHead(model.config.hidden_size, cfg.value_dropout).to(device, dtype)  # dtype: bf16 hidden states
    params = list(model.parameters()) + (list(value_head.parameters()) if value_head is not None else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = make_generator(cfg.engine, model, tokenizer, cfg.gen_batch_size, seed=cfg.seed)
    start_step, best_acc, history = 0, -1.0, []
    if latest:
        path, state = latest
        if value_head is not None:
            value_head.load_state_dict(torch.load(path / "value_head.pt"))
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generator)
        start_step, best_acc, history = state["step"], state["best_accuracy"], state["history"]
    logger = RunLogger(run_dir, cfg.tensorboard)
    logger.truncate_after(start_step)
    eval_examples = task.validation if cfg.eval_split == "validation" else task.test

    def checkpoint(step: int) -> None:
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(generator),
                 "best_accuracy": best_acc, "history": history}
        save_rl_checkpoint(run_dir, step, model, tokenizer, value_head, state)

    bar = progress(cfg.steps, "reft", disable=not cfg.progress)
    bar.update(start_step)
    for step in range(start_step, cfg.steps):
        t0 = time.time()
        # 3. Rollout: sample CoTs for this step's questions and score the answers.
        questions = step_questions(task.train, step, cfg.questions_per_step, cfg.seed)
        scored = sample_and_score(generator, task, questions, cfg.samples_per_prompt, cfg.temperature, cfg.top_p,
                                  cfg.max_new_tokens, dict(correct=cfg.score_correct, wrong=cfg.score_wrong,
                                                           none=cfg.score_none))
        ro = scored.rollout
        input_ids, attention_mask = ro.input_ids, ro.attention_mask
        response_mask, P = ro.response_mask.float(), ro.prompt_ids.shape[1]
        t_gen = time.time() - t0

        # 4. Log-probs and values of the sampled tokens under the policy (old) and the reference.
        with torch.no_grad(), autocast(amp, device):
            model.eval()
            if value_head is not None:
                value_head.eval()
            old_logprobs, old_values, _ = policy_forward(model, value_head, input_ids, attention_mask, ro.response_ids, P,
                                                         cfg.temperature)
            ref_logprobs, _, _ = policy_forward(ref_model, None, input_ids, attention_mask, ro.response_ids, P, cfg.temperature)
            kl = A.kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator)
            mean_kl = float(A.masked_sum(kl, response_mask) / max(len(questions) * cfg.samples_per_prompt, 1))
            if not math.isfinite(mean_kl):
                raise FloatingPointError(f"reft: KL to the reference is {mean_kl} at step {step}; "
                                         f"last good checkpoint: {run_dir / 'latest.json'}")
            # 5. Rewards and advantages (GAE with the value head, or group-relative without).
            scores = scored.scores.to(device)
            advantages, returns = compute_advantages(cfg, scores, old_logprobs, ref_logprobs, old_values,
                                                     response_mask, kl_coef)

        # 6. PPO epochs over shuffled mini-batches.
        model.train()
        if value_head is not None:
            value_head.train()
        stats: dict[str, list[float]] = {}
        B = input_ids.shape[0]
        for _ in range(cfg.ppo_epochs):
            for idx in torch.randperm(B).split(cfg.mini_batch_size):
                mb_mask = response_mask[idx]
                with autocast(amp, device):
                    logprobs, values, logits = policy_forward(model, value_head, input_ids[idx], attention_mask[idx],
                                                              ro.response_ids[idx], P, cfg.temperature)
                pg_loss, pg_stats = A.ppo_policy_loss(logprobs, old_logprobs[idx], advantages[idx], mb_mask, cfg.clip)
                loss = pg_loss
                if value_head is not None:
                    vf_loss, vf_stats = A.ppo_value_loss(values, old_values[idx], returns[idx], mb_mask, cfg.vf_clip)
                    loss = loss + cfg.vf_coef * vf_loss
                    pg_stats = {**pg_stats, **vf_stats, "vf_loss": vf_loss.detach()}
                if not cfg.kl_in_reward or cfg.advantage != "gae":
                    kl_loss = A.sequence_mean(A.kl_penalty(logprobs, ref_logprobs[idx], cfg.kl_estimator), mb_mask)
                    loss = loss + kl_coef * kl_loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"reft: loss is {loss.item()} at step {step}; "
                                             f"last good checkpoint: {run_dir / 'latest.json'}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                with torch.no_grad():
                    entropy = A.masked_mean(A.entropy_from_logits(logits.detach()), mb_mask)
                optimizer.step()
                for k, v in {**pg_stats, "pg_loss": pg_loss.detach(), "entropy": entropy, "grad_norm": grad_norm}.items():
                    stats.setdefault(k, []).append(float(v))

        # 7. Metrics of this iteration.
        n_rows = len(scored.graded)
        metrics = {
            "reft/score": float(scored.scores.mean()),
            "reft/accuracy": sum(g.correct for g in scored.graded) / n_rows,
            "reft/answered": sum(g.answer is not None for g in scored.graded) / n_rows,
            "reft/kl": mean_kl,
            "reft/response_length": float(response_mask.sum(-1).mean()),
            "reft/lr": optimizer.param_groups[0]["lr"],
            "reft/seconds": time.time() - t0,
            "reft/seconds_generate": t_gen,
            **{f"reft/{k}": sum(v) / len(v) for k, v in stats.items()},
        }
        if value_head is not None:
            metrics["reft/value_explained_var"] = float(A.explained_variance(old_values, returns, response_mask))
        done = step + 1
        # 8. Periodic greedy evaluation; keep the best policy by validation accuracy.
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            summary, _ = evaluate(generator, task, eval_examples, cfg.eval_max_new_tokens)
            metrics[f"eval/{cfg.eval_split}_accuracy"] = summary["accuracy"]
            if summary["accuracy"] > best_acc:
                best_acc = summary["accuracy"]
                save_best(run_dir, model, tokenizer, value_head, {"step": done, f"{cfg.eval_split}_accuracy": best_acc})
        # History travels inside checkpoints for resume; timings differ run to run, so they stay out.
        history.append({"step": done, **{k: v for k, v in metrics.items() if "seconds" not in k}})
        logger.log(done, metrics)
        bar.update(1)
        bar.set_postfix(score=f"{metrics['reft/score']:.3f}", kl=f"{mean_kl:.3f}")
        # 9. Resumable checkpoint (atomic; latest.json always names a complete one).
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            checkpoint(done)
    bar.close()
    logger.close()
    result = {
        "best_checkpoint": str(run_dir / "checkpoints" / "best" / "policy"),
        "best_accuracy": best_acc,
        "last_checkpoint": str(run_dir / (load_latest(run_dir)[0].relative_to(run_dir)) / "policy"),
        "kl_coef": kl_coef,
        "history": history,
    }
    write_json(Path(run_dir) / "result.json", result)
    return result
