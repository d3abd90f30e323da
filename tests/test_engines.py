"""Generation engines: the `static` engine against `model.generate` (greedy token for token,
sampled frequencies against the model's softmax, log-probs against a fresh forward, seeded
reproducibility), the Rollout layout every registered engine returns, and the registry."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from reftune.engines import ENGINES, EngineSpec, check_engine, make_generator
from reftune.engines.base import position_ids_from_mask
from reftune.engines.static import StaticSampler, fallback_reason
from reftune.models import encode_prompt, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def warm(warmup_model):
    return load_causal_lm(warmup_model, torch.device("cpu"), torch.float32).eval(), load_tokenizer(warmup_model)


@pytest.fixture(scope="module")
def early_eos(tiny_model, prompts):
    """A tiny model whose greedy answers differ per prompt, with a tokenizer whose EOS is a token
    those answers emit in some rows, at different steps, and never first: rows end early at
    different lengths, others run to the cap. (The `warmup_model` and `tiny_model` fixtures repeat
    one token greedily, so their EOS never comes; here the untrained weights are redrawn wider.)"""
    import copy

    model, tok = load_causal_lm(tiny_model, torch.device("cpu"), torch.float32).eval(), load_tokenizer(tiny_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5, generator=gen)
    rows = tokens_per_row(make_generator("hf", model, tok).generate(prompts, greedy=True, max_new_tokens=40))
    firsts = {row[0] for row in rows}
    in_rows: dict[int, int] = {}
    for row in rows:
        for token in set(row) - firsts:
            in_rows[token] = in_rows.get(token, 0) + 1
    candidates = [t for t, c in in_rows.items() if c < len(rows)]
    eos = max(candidates, key=lambda t: in_rows[t])
    early = copy.deepcopy(tok)
    early.eos_token = early.convert_ids_to_tokens(eos)
    assert early.eos_token_id == eos
    return model, early


@pytest.fixture(scope="module")
def untrained(tiny_model):
    return load_causal_lm(tiny_model, torch.device("cpu"), torch.float32).eval(), load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def prompts(small_task):
    return [small_task.prompt(ex, for_generation=True) for ex in small_task.test[:12]]


def tokens_per_row(rollout) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(rollout.response_ids, rollout.response_mask)]


# --------------------------------------------------------------------------- greedy == generate

def test_static_greedy_equals_generate_token_for_token(early_eos, prompts):
    model, tok = early_eos
    lengths = {len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) > 1, "the prompts should have different lengths (left padding)"
    # batch_size 8 over 12 prompts: two chunks; rows end with EOS at different steps, so the
    # static engine compacts its batch mid-way.
    static = StaticSampler(model, tok, batch_size=8).generate(prompts, greedy=True, max_new_tokens=60)
    hf = make_generator("hf", model, tok, batch_size=8).generate(prompts, greedy=True, max_new_tokens=60)
    assert tokens_per_row(static) == tokens_per_row(hf)
    assert static.texts == hf.texts
    assert torch.equal(static.ended_with_eos, hf.ended_with_eos)
    assert 0 < static.ended_with_eos.sum() < len(prompts), "some answers should end with EOS, some at the cap"
    assert len({len(r) for r in tokens_per_row(static)}) > 1, "answers should end at different lengths"


def test_static_greedy_untrained_runs_to_the_cap(untrained, prompts):
    model, tok = untrained
    static = StaticSampler(model, tok, batch_size=16).generate(prompts[:5], greedy=True, max_new_tokens=20)
    hf = make_generator("hf", model, tok, batch_size=16).generate(prompts[:5], greedy=True, max_new_tokens=20)
    assert tokens_per_row(static) == tokens_per_row(hf)


def test_greedy_samples_of_a_prompt_are_decoded_once_and_repeated(early_eos, prompts):
    model, tok = early_eos
    engine = StaticSampler(model, tok, batch_size=16)
    once = engine.generate(prompts[:3], greedy=True, max_new_tokens=30)
    three = engine.generate(prompts[:3], num_samples=3, greedy=True, max_new_tokens=30)
    assert tokens_per_row(three) == [r for r in tokens_per_row(once) for _ in range(3)]
    assert three.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]


# --------------------------------------------------------------------------- sampling

def first_token_probs(model, tok, prompt: str, temperature: float = 1.0) -> torch.Tensor:
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return torch.softmax(model(input_ids=ids).logits[0, -1].double() / temperature, -1)


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[bool, float, int]:
    """Pearson chi-square over tokens with expected count >= 5 (the rest pooled into one cell);
    accept below df + 6 sqrt(2 df) (about 4 standard deviations of the chi-square distribution)."""
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return stat < df + 6 * math.sqrt(2 * df), stat, df


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_first_tokens_follow_the_softmax(untrained, prompts, temperature):
    model, tok = untrained
    n = 6000
    engine = StaticSampler(model, tok, batch_size=n, seed=1)
    rollout = engine.generate(prompts[:1], num_samples=n, temperature=temperature, max_new_tokens=1)
    counts = torch.bincount(rollout.response_ids[:, 0], minlength=len(tok))
    probs = first_token_probs(model, tok, prompts[0], temperature)
    ok, stat, df = chi_square_ok(counts, probs, n)
    assert ok, f"chi-square {stat:.1f} with {df} degrees of freedom"


def test_top_p_samples_only_the_nucleus_in_proportion(warm, prompts):
    model, tok = warm
    n, top_p = 4000, 0.9
    probs = first_token_probs(model, tok, prompts[1])
    sorted_probs, order = probs.sort(descending=True)
    nucleus = order[: int(((sorted_probs.cumsum(0) - sorted_probs) <= top_p).sum())]
    rollout = StaticSampler(model, tok, batch_size=n, seed=2).generate(prompts[1:2], num_samples=n, top_p=top_p,
                                                                       max_new_tokens=1)
    counts = torch.bincount(rollout.response_ids[:, 0], minlength=len(tok))
    outside = torch.ones(len(tok), dtype=torch.bool)
    outside[nucleus] = False
    assert counts[outside].sum() == 0
    renormalised = torch.zeros_like(probs)
    renormalised[nucleus] = probs[nucleus] / probs[nucleus].sum()
    if len(nucleus) > 1:
        ok, stat, df = chi_square_ok(counts, renormalised, n)
        assert ok, f"chi-square {stat:.1f} with {df} degrees of freedom"


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_sampling_logprobs_equal_a_fresh_forward(warm, prompts, temperature):
    model, tok = warm
    rollout = StaticSampler(model, tok, batch_size=16, seed=3).generate(prompts[:4], num_samples=3,
                                                                        temperature=temperature, max_new_tokens=40)
    assert model.config._attn_implementation == "sdpa", "sampling switches to eager attention only while it runs"
    ids, mask = rollout.input_ids, rollout.attention_mask
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    P = rollout.prompt_ids.shape[1]
    logp = (logits[:, P - 1:-1].float() / temperature).log_softmax(-1)
    fresh = logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    m = rollout.response_mask.bool()
    assert rollout.sampling_logprobs.shape == rollout.response_ids.shape
    torch.testing.assert_close(rollout.sampling_logprobs[m], fresh[m], atol=1e-4, rtol=1e-4)
    assert (rollout.sampling_logprobs[~m] == 0).all()


def test_sampling_values_equal_the_value_head_on_a_fresh_forward(warm, prompts):
    """Given a value head, the static engine returns V(state before each sampled token) from its own
    decoding passes (eval mode: no dropout), as the trainer's forward over the whole sequence gives
    it, and sampling itself is unchanged (same seed, same tokens). Small batches compact mid-way."""
    from reftune.trainers.policy import ValueHead, forward_logits_values

    model, tok = warm
    head = ValueHead.for_model(model, dropout=0.5)
    torch.nn.init.normal_(head.linear.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    head.train()  # the engine switches it to eval while it decodes, and back
    plain = StaticSampler(model, tok, batch_size=16, seed=3).generate(prompts[:4], num_samples=3, max_new_tokens=40)
    engine = StaticSampler(model, tok, batch_size=16, seed=3)
    assert engine.supports_value_head
    engine.set_value_head(head)
    rollout = engine.generate(prompts[:4], num_samples=3, max_new_tokens=40)
    assert head.training and torch.equal(rollout.response_ids, plain.response_ids) and plain.sampling_values is None
    P, m = rollout.prompt_ids.shape[1], rollout.response_mask.bool()
    head.eval()
    with torch.no_grad():
        _, fresh = forward_logits_values(model, head, rollout.input_ids, rollout.attention_mask, P)
    assert rollout.sampling_values.shape == rollout.response_ids.shape
    torch.testing.assert_close(rollout.sampling_values[m], fresh[m], atol=1e-4, rtol=1e-4)
    assert (rollout.sampling_values[~m] == 0).all()


def test_seeded_sampling_is_reproducible_and_resumable(warm, prompts):
    model, tok = warm
    kwargs = dict(num_samples=2, max_new_tokens=30)
    a = StaticSampler(model, tok, seed=7).generate(prompts[:4], **kwargs)
    engine = StaticSampler(model, tok, seed=7)
    b = engine.generate(prompts[:4], **kwargs)
    assert tokens_per_row(a) == tokens_per_row(b)
    assert isinstance(engine.rng, torch.Generator)
    state = engine.rng.get_state()  # what trainers checkpoint
    c = engine.generate(prompts[:4], **kwargs)
    engine.rng.set_state(state)
    d = engine.generate(prompts[:4], **kwargs)
    assert tokens_per_row(c) == tokens_per_row(d)
    assert tokens_per_row(c) != tokens_per_row(b)


def test_models_with_sliding_window_layers_fall_back_to_the_cached_loop(small_task, tiny_model, prompts):
    from transformers import MistralConfig, MistralForCausalLM

    tok = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=8,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = MistralForCausalLM(cfg).eval()
    engine = StaticSampler(model, tok)
    assert engine.fallback and "Sliding" in engine.fallback
    greedy = engine.generate(prompts[:3], greedy=True, max_new_tokens=12)
    hf = make_generator("hf", model, tok).generate(prompts[:3], greedy=True, max_new_tokens=12)
    assert tokens_per_row(greedy) == tokens_per_row(hf)
    # The cached loop computes no values: the engine says so, and refuses a value head.
    from reftune.trainers.policy import ValueHead

    assert not engine.supports_value_head
    with pytest.raises(ValueError, match="cached loop"):
        engine.set_value_head(ValueHead.for_model(model))


def test_llama_needs_no_fallback(untrained):
    assert fallback_reason(untrained[0]) is None


# --------------------------------------------------------------------------- every engine

def engine_available(name: str) -> bool:
    # vLLM builds its own copy of the model and needs the package; skip it where it is absent.
    return name != "vllm" or importlib.util.find_spec("vllm") is not None


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_rollout_layout(name, early_eos, warmup_model, prompts):
    if not engine_available(name):
        pytest.skip(f"engine {name} needs a package that is not installed")
    model, tok = early_eos
    n, chosen = 3, prompts[:4]
    engine = make_generator(name, model, tok, batch_size=6, seed=0, model_path=warmup_model)
    r = engine.generate(chosen, num_samples=n, max_new_tokens=30)
    B = len(chosen) * n
    assert r.prompt_index == [i for i in range(len(chosen)) for _ in range(n)]
    assert len(r.texts) == B and r.ended_with_eos.shape == (B,)
    assert r.prompt_ids.shape == r.prompt_mask.shape and r.prompt_ids.shape[0] == B
    assert r.response_ids.shape == r.response_mask.shape and r.response_ids.shape[0] == B
    pad, eos = tok.pad_token_id, tok.eos_token_id
    # prompts: LEFT-padded, the real tokens are each row's prompt
    pm = r.prompt_mask.long()
    assert (pm[:, 1:] >= pm[:, :-1]).all(), "prompt mask must be 0...0 1...1"
    assert (r.prompt_ids[pm == 0] == pad).all()
    for row in range(B):
        expected = encode_prompt(tok, chosen[r.prompt_index[row]])
        assert r.prompt_ids[row][pm[row].bool()].tolist() == expected
    # responses: RIGHT-padded, mask 1 up to and including EOS
    rm = r.response_mask.long()
    assert (rm[:, 1:] <= rm[:, :-1]).all(), "response mask must be 1...1 0...0"
    assert (r.response_ids[rm == 0] == pad).all()
    assert r.response_mask.shape[1] == int(rm.sum(-1).max())  # no all-padding columns
    # A row ends at any of the engine's stop tokens: the tokenizer's EOS and the model config's own.
    stops = set(getattr(getattr(engine, "limits", None), "stop_ids", None) or [eos])
    for row, toks in enumerate(tokens_per_row(r)):
        assert bool(stops & set(toks)) == bool(r.ended_with_eos[row])
        if stops & set(toks):
            assert toks[-1] in stops and not stops & set(toks[:-1])
        else:
            assert len(toks) == 30
    if r.sampling_logprobs is not None:
        assert r.sampling_logprobs.shape == r.response_ids.shape


def test_value_head_capability_is_declared_by_each_engine(untrained):
    """`Generator.supports_value_head` says which engines apply a trainer's value head: the static
    engine does; the others say not, and refuse one; an engine from outside reftune that does not
    declare it is taken as not supporting one."""
    from reftune.trainers.policy import ValueHead

    model, tok = untrained
    head = ValueHead.for_model(model)
    for name in ("static", "graphed"):
        static = make_generator(name, model, tok)
        assert static.supports_value_head
        static.set_value_head(head)
        assert static.value_head is head
        static.set_value_head(None)  # a critic-free estimator: engine log-probs without values
        assert static.value_head is None
    for name in ("cached", "hf"):
        engine = make_generator(name, model, tok)
        assert not engine.supports_value_head
        with pytest.raises(NotImplementedError, match="supports_value_head is False"):
            engine.set_value_head(head)


def test_new_token_budget_worked_numbers():
    from reftune.engines.base import new_token_budget

    assert new_token_budget(64, 50, 40) == 14  # the last sampled token at position 63
    assert new_token_budget(64, 10, 40) == 40
    assert new_token_budget(None, 10_000, 40) == 40  # a model that states no context
    assert new_token_budget(64, 63, 40) == 1
    with pytest.raises(ValueError, match="a prompt of 64 tokens fills the model's context of 64 tokens"):
        new_token_budget(64, 64, 40)


def test_a_response_ends_at_its_first_stop_token_of_any_kind(untrained):
    """finish_rollout with two stop ids (EOS and an end-of-turn id): each row is cut after the first
    of either, which stays in the mask; a row with neither runs to the cap."""
    from reftune.engines.base import finish_rollout, rollout_from_token_lists

    _, tok = untrained
    eos, eot, pad = tok.eos_token_id, 7, tok.pad_token_id
    sampled = torch.tensor([[5, eot, 9, eos], [5, 6, eos, eot], [5, 6, 8, 9]])
    prompt = torch.ones(3, 2, dtype=torch.long)
    r = finish_rollout(tok, prompt, prompt, sampled, [0, 1, 2], stop_ids=[eos, eot])
    assert r.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert r.response_ids[0].tolist() == [5, eot, pad, pad] and r.ended_with_eos.tolist() == [True, True, False]
    lists = rollout_from_token_lists(tok, [[1, 1]] * 3, sampled.tolist(), [0, 1, 2], "cpu", stop_ids=[eos, eot])
    assert torch.equal(lists.response_mask, r.response_mask) and lists.texts == r.texts
    assert torch.equal(lists.ended_with_eos, r.ended_with_eos)


# --------------------------------------------------------------------------- registry

class DummyEngine:
    def __init__(self, model, tokenizer, batch_size=64, seed=None, model_path=None):
        self.args = dict(model=model, tokenizer=tokenizer, batch_size=batch_size, seed=seed, model_path=model_path)

    def generate(self, prompts, **kwargs):
        raise AssertionError("the registry test never asks the dummy engine to generate")

    def sync_weights(self):
        pass


def test_one_registry_entry_adds_an_engine(monkeypatch):
    monkeypatch.setitem(ENGINES, "dummy", EngineSpec(f"{__name__}:DummyEngine", "a test engine"))
    check_engine("dummy")
    engine = make_generator("dummy", "M", "T", batch_size=3, seed=5, model_path="p")
    assert isinstance(engine, DummyEngine)
    assert engine.args == dict(model="M", tokenizer="T", batch_size=3, seed=5, model_path="p")
    assert engine.supports_value_head is False  # not declared by the engine: none
    with pytest.raises(ValueError) as err:
        check_engine("nope")
    assert "dummy (a test engine)" in str(err.value) and "static" in str(err.value)


@pytest.mark.parametrize("name", ["cached", "graphed", "hf", "static"])
def test_each_registered_engine_builds_its_class_and_samples(name, early_eos, prompts):
    """A registry entry is all it takes: `make_generator(name)` builds the class the entry names
    (imported on its own here), passes the arguments through, and the engine samples with the
    model: its greedy tokens are the model's argmax at every step."""
    from reftune.engines.cached import CachedSampler
    from reftune.engines.graphed import GraphedSampler
    from reftune.engines.hf import HFGenerator

    model, tok = early_eos
    expected = {"cached": CachedSampler, "graphed": GraphedSampler, "hf": HFGenerator, "static": StaticSampler}[name]
    module, cls = ENGINES[name].target.split(":")
    assert getattr(importlib.import_module(module), cls) is expected
    engine = make_generator(name, model, tok, batch_size=2, seed=0)
    assert type(engine) is expected and engine.batch_size == 2 and engine.model is model
    r = engine.generate(prompts[:3], greedy=True, max_new_tokens=6)
    assert len(r.texts) == 3
    with torch.no_grad():
        for row in range(3):
            prompt = r.prompt_ids[row][r.prompt_mask[row].bool()]
            response = r.response_ids[row][r.response_mask[row].bool()]
            ids = torch.cat([prompt, response]).unsqueeze(0)
            argmax = model(ids).logits[0, len(prompt) - 1:-1].argmax(-1)
            assert response.tolist() == argmax.tolist(), (name, row)


def test_auto_engine_is_static_on_a_cpu(untrained):
    """The default engine, `auto`, builds the static engine for a model on the CPU (the cached one
    for a model on a GPU); other names are kept."""
    from reftune.engines import resolve_engine

    model, tok = untrained
    assert resolve_engine("auto", model) == "static" and resolve_engine("hf", model) == "hf"
    assert isinstance(make_generator("auto", model, tok), StaticSampler)
    from reftune.trainers.reft import ReFTConfig
    from reftune.trainers.sft import SFTConfig

    assert ReFTConfig().engine == SFTConfig().engine == "auto"


# --------------------------------------------------------------------------- graphed

def test_graphed_samples_what_static_samples_with_fixed_shapes(early_eos, prompts):
    """`graphed` is static's sampler with fixed shapes (attention over the whole cache, no
    compaction). With static's compaction off and sdpa kept while sampling, both draw the same
    uniforms per step against the same distributions to float rounding: the same tokens, log-probs
    and values. Greedy equals `generate` token for token (left-padded prompts of different
    lengths: the prefill mask). On a CPU no graph is captured."""
    from reftune.engines.graphed import GraphedSampler, graphs_possible
    from reftune.trainers.policy import ValueHead

    model, tok = early_eos
    assert not graphs_possible(model)
    head = ValueHead.for_model(model).eval()
    torch.nn.init.normal_(head.linear.weight, std=0.1)  # zero-initialised: values would all be 0
    graphed = GraphedSampler(model, tok, batch_size=8, seed=3)
    static = StaticSampler(model, tok, batch_size=8, seed=3, compact_below=0.0, eager_sampling_attention=False)
    for engine in (graphed, static):
        engine.set_value_head(head)
    for _ in range(2):  # the second call replays the kept shapes
        g = graphed.generate(prompts, num_samples=2, max_new_tokens=40)
        s = static.generate(prompts, num_samples=2, max_new_tokens=40)
        assert tokens_per_row(g) == tokens_per_row(s) and g.texts == s.texts
        assert torch.allclose(g.sampling_logprobs, s.sampling_logprobs, atol=1e-4)
        assert torch.allclose(g.sampling_values, s.sampling_values, atol=1e-4)
    assert 0 < int(g.ended_with_eos.sum()) < len(g.texts), "rows should end at different steps"
    assert len(graphed._steps) <= 2 and all(not step.use_graph for step in graphed._steps.values())
    hf = make_generator("hf", model, tok, batch_size=8).generate(prompts, greedy=True, max_new_tokens=60)
    greedy = graphed.generate(prompts, greedy=True, max_new_tokens=60)
    assert tokens_per_row(greedy) == tokens_per_row(hf)


def test_graphed_decodes_without_graphs_where_capture_fails(early_eos, prompts):
    """Asked for graphs where none can be captured (here: a CPU), the engine warns once per shape and
    decodes the same step eagerly: the same samples as without asking."""
    from reftune.engines.graphed import GraphedSampler

    model, tok = early_eos
    plain = GraphedSampler(model, tok, batch_size=8, seed=1).generate(prompts[:4], num_samples=2, max_new_tokens=12)
    forced = GraphedSampler(model, tok, batch_size=8, seed=1, use_graphs=True)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        got = forced.generate(prompts[:4], num_samples=2, max_new_tokens=12)
    assert tokens_per_row(got) == tokens_per_row(plain)
    assert torch.equal(got.sampling_logprobs, plain.sampling_logprobs)


def test_graphed_keeps_two_shapes_and_recaptures_after_a_parameter_moves(untrained, prompts):
    """Shapes are kept by (rows, capacity rounded up to 64, ...): nearby lengths share one, at most
    two are kept; a parameter that became another tensor gets a fresh step (a graph would read the
    old address)."""
    from reftune.engines.graphed import GraphedSampler

    model, tok = untrained
    engine = GraphedSampler(model, tok, batch_size=4, seed=0)
    longest = max(len(encode_prompt(tok, p)) for p in prompts[:4])
    bucket = -(-(longest + 1) // 64) * 64
    engine.generate(prompts[:4], greedy=True, max_new_tokens=1)
    engine.generate(prompts[:4], greedy=True, max_new_tokens=bucket - longest)  # the same capacity
    assert len(engine._steps) == 1
    first = next(iter(engine._steps.values()))
    engine.generate(prompts[:4], greedy=True, max_new_tokens=bucket - longest + 1)  # the next capacity
    engine.generate(prompts[:2], greedy=True, max_new_tokens=5)  # fewer rows
    assert len(engine._steps) == 2 and first not in engine._steps.values()
    kept = set(map(id, engine._steps.values()))
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight.data = weight.data.clone()  # same values, another address
    engine.generate(prompts[:2], greedy=True, max_new_tokens=5)
    assert id(list(engine._steps.values())[-1]) not in kept
