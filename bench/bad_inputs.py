"""A catalogue of bad inputs (`bench/bad_input_cases.py`), run through the `reftune` CLI in-process,
with counts of what went wrong.

    python bench/bad_inputs.py                                   # this checkout
    /tmp/before/.venv/bin/python bench/bad_inputs.py --tree /tmp/before   # another tree
    python bench/bad_inputs.py --only resume --verbose           # one category, every case

Categories: `lost` (earlier output lost or corrupted), `resume` (runs that cannot be
resumed), `traceback` (ordinary mistakes), `silent` (invalid values accepted), `unclear` (messages
that do not say what is wrong), `prompt` (prompt length), and `sweep`: every numeric or choice field
of the nine commands given an out-of-range value. Each case says what should happen: an error
(exit 2, one line naming what is wrong: `needles`) or a run that succeeds (exit 0, and a check).

Counted per case (a case can count in several):
- traceback: an exception escaped `main`, or it reported an internal error (exit 1);
- silent: an invalid input exited 0;
- lost: a file of an earlier run (the protected sibling runs, or the case's own) changed;
- unclear: exit 2 but the message lacks what it should name, or the command took > 20 s to refuse;
- failed: a valid input (a resume, a rerun) did not succeed or its check failed.

Everything runs on a tiny model built at the start (about a minute), one thread. Memory-hungry
inputs are scaled down so an older tree (`--tree`) cannot exhaust the machine: the prompt-length
cases use a 4 KB question (over the tiny model's 512-token context) instead of 54 KB.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_cases import Case, fast, special_cases, sweep_cases  # noqa: E402


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
    return {str(p): (p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest()) for p in files
            if p.name != ".reftune.lock"}


def call(main, argv: list[str], hide_datasets: bool = False) -> tuple[int | None, str, str | None, float]:
    """(exit code or None, stderr, traceback summary or None, seconds) of one in-process CLI call."""
    err, out = io.StringIO(), io.StringIO()
    saved = sys.modules.get("datasets", "absent")
    if hide_datasets:
        sys.modules["datasets"] = None  # `import datasets` raises ImportError, as when it is not installed
    start = time.time()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code, trace = main(argv), None
    except SystemExit as e:
        code, trace = (e.code if isinstance(e.code, int) else 2), None
    except BaseException as e:  # what a user would see as a traceback
        code, trace = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        if hide_datasets:
            if saved == "absent":
                sys.modules.pop("datasets", None)
            else:
                sys.modules["datasets"] = saved
    return code, err.getvalue(), trace, time.time() - start


def build_fixtures(main, W: Path) -> None:
    """The sibling runs every case must leave alone: a tiny model, a warm-up SFT run and its
    checkpoint, finished ReFT / Online-ST / eval / sample / offline-st / compare runs."""
    P = W / "protected"
    steps = [
        ["build-tiny", *fast("build-tiny", W), "--out", str(P / "tiny")],
        ["sft", *fast("sft", W), f"model={P / 'tiny'}", "epochs=2", "lr=3e-3", f"out_dir={P / 'sft'}"],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    shutil.copytree(P / "sft" / "checkpoints" / "epoch-2", P / "warm")
    for cmd, name in (("train", "reft"), ("online-st", "online"), ("eval", "eval"), ("sample", "sample"),
                      ("compare", "compare")):
        argv = [cmd, *fast(cmd, W), f"out_dir={P / name}"] + (["save_every=1", "eval_every=1"] if name in
                                                              ("reft", "online") else [])
        assert main(argv) == 0, argv
    assert main(["offline-st", *fast("offline-st", W), f"out_dir={P / 'offline'}"]) == 0


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder nobody can write into: a read-only tmpfs when root (root ignores permissions)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    else:
        path.chmod(0o555)
    try:
        yield mounted or os.geteuid() != 0
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], capture_output=True)
        else:
            path.chmod(0o755)


def judge(case: Case, code, stderr: str, trace, seconds: float, changed: list[str]) -> dict:
    error_lines = [ln for ln in stderr.splitlines() if ": error:" in ln or "internal error" in ln]
    message = error_lines[-1] if error_lines else ""
    r = {"id": case.id, "category": case.category, "exit": code, "seconds": round(seconds, 1),
         "message": (trace or message)[:300], "traceback": trace is not None or code == 1 or "Traceback" in stderr,
         "silent": False, "lost": bool(changed), "unclear": False, "failed": False}
    if case.expect == "error":
        r["silent"] = code == 0
        if code == 2:
            missing = [n for n in case.needles if n.lower() not in message.lower()]
            r["unclear"] = bool(missing) or seconds > 20 or len(error_lines) != 1
            if missing:
                r["why"] = f"message lacks {missing}"
    else:
        r["failed"] = code != 0
    if changed:
        r["changed"] = changed[:3]
    return r


def run(tree: str | None, only: str | None, verbose: bool, keep: str | None) -> dict:
    if tree:
        sys.path.insert(0, str(Path(tree).resolve()))
    import torch

    torch.set_num_threads(1)
    from reftune.cli import main

    W = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bad_inputs-"))
    W.mkdir(parents=True, exist_ok=True)
    (W / "runs").mkdir(exist_ok=True)  # so `model=runs/nope` looks like the mistyped relative path it is
    os.chdir(W)
    t0 = time.time()
    if not (W / "protected" / "offline").exists():
        build_fixtures(main, W)
    print(f"fixtures ready in {time.time() - t0:.0f}s under {W}", file=sys.stderr)
    cases = special_cases(W) + sweep_cases(W)
    if only:
        cases = [c for c in cases if c.category == only or only in c.id]
    protected = snapshot(W / "protected")
    results = []
    with read_only_folder(W / "ro") as ro_ok:
        for i, case in enumerate(cases):
            case_dir = W / "cases" / f"{i:03d}"
            if case_dir.exists():
                shutil.rmtree(case_dir)
            case_dir.mkdir(parents=True)
            if case.setup:
                case.setup(case_dir)
            own = {p: snapshot(case_dir / p) for p in case.protect}
            argv = [a.replace("{case}", str(case_dir)) for a in case.argv]
            if "out_dir" not in " ".join(argv) and "--resume" not in argv and "--out" not in argv and \
                    case.argv[0] not in ("demo", "build-tiny"):
                argv.append(f"out_dir={case_dir / 'run'}")
            if case.argv[0] in ("demo", "build-tiny") and "--out" not in argv:
                argv += ["--out", str(case_dir / "run")]
            code, stderr, trace, seconds = call(main, argv, case.env.get("hide_datasets", False))
            changed = [k for k, v in snapshot(W / "protected").items() if protected.get(k) != v]
            if (case_dir / "background.pid").exists():  # the concurrent run: wait, then look for duplicates
                os.waitpid(int((case_dir / "background.pid").read_text()), 0)
                samples = case_dir / "run" / "test_samples.jsonl"
                ids = [json.loads(x)["id"] for x in samples.read_text().splitlines() if x.strip()]
                if len(ids) != len(set(ids)):
                    changed.append(f"{samples}: {len(ids) - len(set(ids))} duplicate records")
            for p, before in own.items():
                after = snapshot(case_dir / p)
                changed += [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
            r = judge(case, code, stderr, trace, seconds, changed)
            if "read-only" in case.id and not ro_ok:
                r["skipped"] = "no read-only folder could be made"
            if case.expect == "ok" and code == 0 and case.check:
                problem = case.check(case_dir)
                if problem:
                    r["failed"], r["why"] = True, problem
            results.append(r)
            bad = [k for k in ("traceback", "silent", "lost", "unclear", "failed") if r[k]]
            if verbose or bad:
                print(f"[{case.category:9s}] {case.id:60s} exit={code} {','.join(bad) or 'ok'} "
                      f"{r.get('why', '')} {r['message'][:150]}", file=sys.stderr, flush=True)
            if changed:  # a case that damaged the fixtures: restore them for the next cases
                shutil.rmtree(W / "protected")
                build_fixtures(main, W)
                protected = snapshot(W / "protected")
            shutil.rmtree(case_dir, ignore_errors=True)
    counts = {k: sum(bool(r[k]) for r in results) for k in ("traceback", "silent", "lost", "unclear", "failed")}
    by_category = {}
    for r in results:
        entry = by_category.setdefault(r["category"], {"cases": 0, "traceback": 0, "silent": 0, "lost": 0,
                                                       "unclear": 0, "failed": 0})
        entry["cases"] += 1
        for k in ("traceback", "silent", "lost", "unclear", "failed"):
            entry[k] += bool(r[k])
    if not keep:
        shutil.rmtree(W, ignore_errors=True)
    return {"tree": tree or str(Path(__file__).resolve().parents[1]), "cases": len(results), **counts,
            "by_category": by_category, "seconds": round(time.time() - t0), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", help="a reftune source tree to import instead of the installed one")
    parser.add_argument("--only", help="a category (lost, resume, traceback, silent, unclear, prompt, sweep) or id part")
    parser.add_argument("--json", help="write every case's outcome here")
    parser.add_argument("--keep", help="work in this folder and keep it (fixtures are reused)")
    parser.add_argument("--verbose", action="store_true", help="print every case, not only the bad ones")
    args = parser.parse_args()
    report = run(args.tree, args.only, args.verbose, args.keep)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))


if __name__ == "__main__":
    main()
