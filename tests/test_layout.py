"""The package's shape, checked so it stays as docs/design.md describes it: imports only run down the
layers (no circles), trainers do not borrow from each other, the RL math imports only torch, every
engine is reachable through the registry alone, and no file grows past ~600 lines."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PKG = Path(__file__).resolve().parents[1] / "reftune"

# Lower numbers are lower layers; a module may import its own layer only inside its own package.
LAYERS = {
    "reftune.types": 0, "reftune.config": 0, "reftune.validate": 1, "reftune.model_files": 1, "reftune.trackers": 1, "reftune.batching": 0, "reftune.sandbox": 0,
    "reftune.rewards": 1, "reftune.options": 1.5,  # the config sections: above the checks, below models
    "reftune.tasks": 2, "reftune.models": 2, "reftune.runs": 2, "reftune.runtime": 2,
    "reftune.engines": 3, "reftune.tiny": 3, "reftune.plan": 1, "reftune.recipes": 6, "reftune.prompt_guard": 3,
    "reftune.inference": 4,
    "reftune.trainers": 5,
    "reftune.compare": 6,
    "reftune.demo": 7, "reftune.cli": 8, "reftune": 9,
}
# Lazy imports that knowingly reach up: the config checks ask the engine registry (only configs that
# have an `engine` field, all above the engines, call it).
ALLOWED_UP = {("reftune.validate", "reftune.engines")}
TRAINERS = {"sft", "reft", "online_st", "offline_st", "reward_model"}
COMPOSES = {("offline_st", "sft")}  # Offline-ST is SFT on a rebuilt dataset (see trainers/__init__)


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every reftune module a file imports, at the top or inside functions (lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("reftune"):
                while name not in known and "." in name:
                    name = name.rsplit(".", 1)[0]
                out.add(name)
    return out


def layer_of(mod: str) -> tuple[str, int]:
    key = max((k for k in LAYERS if mod == k or mod.startswith(k + ".")), key=len)
    return key, LAYERS[key]


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}


def test_imports_only_run_down_the_layers():
    bad = []
    for mod, deps in graph().items():
        if mod == "reftune":
            continue  # the lazy public API names everything
        pkg, rank = layer_of(mod)
        for dep in deps:
            if dep == "reftune" or (mod, dep) in ALLOWED_UP:
                continue
            dep_pkg, dep_rank = layer_of(dep)
            if dep_rank > rank or (dep_rank == rank and dep_pkg != pkg):
                bad.append(f"{mod} (layer {rank}) imports {dep} (layer {dep_rank})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circles():
    g = graph()
    g = {m: {d for d in deps if d != "reftune"} for m, deps in g.items() if m != "reftune"}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in g.get(m, ()):
            # a subpackage's __init__ re-exporting its own modules is not a circle
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_trainers_do_not_import_each_other():
    bad = []
    for mod, deps in graph().items():
        if not mod.startswith("reftune.trainers.") or mod.rsplit(".", 1)[1] not in TRAINERS:
            continue
        for dep in deps:
            name = dep.rsplit(".", 1)[1]
            if dep.startswith("reftune.trainers.") and name in TRAINERS and (mod.rsplit(".", 1)[1], name) not in COMPOSES:
                bad.append(f"{mod} imports {dep}")
    assert not bad, bad


def test_rl_math_imports_only_torch():
    tree = ast.parse((PKG / "trainers" / "algorithms.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"torch", "typing", "__future__", "math"}, roots


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_files_stay_small(path):
    assert len(path.read_text().splitlines()) <= 620, f"{path} has grown past ~600 lines: split it"


@pytest.mark.parametrize("path", sorted((PKG.parent / "bench").glob("*.py")), ids=lambda p: p.name)
def test_every_bench_script_starts(path):
    """Each benchmark imports what it uses and parses its arguments (`--help`), so a library module
    that moves breaks its benchmark here rather than on a user's machine."""
    run = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=300,
                         cwd=PKG.parent)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_studys_avx2_path_runs_torchs_avx2_kernels():
    """bench/demo_study.py's `fp32-avx2` path stands for a CPU without AVX-512 only if its
    environment really moves torch's kernel dispatch (and the demo's summary records it)."""
    if " avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2 kernels to run")
    sys.path.insert(0, str(PKG.parent / "bench"))
    try:
        from demo_study import PATHS
    finally:
        sys.path.pop(0)
    _, env = PATHS["fp32-avx2"]
    code = "from reftune.runtime import numerics; print(numerics()['cpu_capability'])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, cwd=PKG.parent)
    assert run.returncode == 0 and run.stdout.strip() == "AVX2", run.stderr[-2000:]


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in PKG.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Owns:" in doc and "May import:" in doc, init


def test_an_engine_is_one_file_plus_one_registry_line(monkeypatch, tiny_model, tmp_path):
    """A dummy engine written to a new file and named in ENGINES is validated, built and listed in
    the error message without touching anything else."""
    import sys

    from reftune import engines
    from reftune.models import load_causal_lm, load_tokenizer
    from reftune.trainers.reft import ReFTConfig

    (tmp_path / "echo_engine.py").write_text(
        "from reftune.engines.cached import CachedSampler\n\n\n"
        "class EchoEngine(CachedSampler):\n    synced = 0\n\n"
        "    def sync_weights(self):\n        self.synced += 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(engines.ENGINES, "echo", engines.EngineSpec("echo_engine:EchoEngine", "a test engine"))
    ReFTConfig(engine="echo").validate()
    with pytest.raises(ValueError, match="echo"):
        ReFTConfig(engine="nope").validate()
    model, tok = load_causal_lm(tiny_model, torch.device("cpu"), torch.float32), load_tokenizer(tiny_model)
    gen = engines.make_generator("echo", model, tok, batch_size=4, seed=0)
    assert type(gen).__name__ == "EchoEngine" and gen.generate(["Question:\n1+1\n"], max_new_tokens=3).response_ids.shape[0] == 1
    sys.modules.pop("echo_engine", None)
