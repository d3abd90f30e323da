"""Recipe files (configs/recipes/*.yaml): their header lines (command, launch, hardware, variants,
reported figures), loading one into its config class, planning it with `reftune.plan`, and the
command line that prints plans and the docs' table:

    python -m reftune.recipes -c configs/recipes/paper_reft.yaml --world-size 8 --gpu-memory 80
    python -m reftune.recipes --table configs/recipes/*.yaml
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

from reftune.plan import (GPUS, PlanError, RunPlan, STRATEGIES, plan_run)

# --- recipe files ------------------------------------------------------------------------------------

COMMANDS = {  # reftune command -> its config class (imported when a recipe is loaded)
    "sft": "reftune.trainers.sft:SFTConfig", "train": "reftune.trainers.reft:ReFTConfig",
    "online-st": "reftune.trainers.online_st:OnlineSTConfig", "offline-st": "reftune.trainers.offline_st:OfflineSTConfig",
    "reward-model": "reftune.trainers.reward_model:RewardModelRunConfig",
    "compare": "reftune.compare.compare:CompareConfig",
}
_HEADER = re.compile(r"^#\s*(recipe|command|launch|hardware|arch|strategy|reported|peer|variant|pending):\s*(.*)$")
_LISTS = ("variant", "pending", "reported", "peer")


def parse_hardware(text: str) -> dict:
    """world_size, gpu_memory_gib and gpu from text such as `(world_size=8 gpu_memory_gib=80 gpu=A100-80GB)`."""
    ws, mem, gpu = (re.search(p, text) for p in (r"world_size=(\d+)", r"gpu_memory_gib=([\d.]+)", r"gpu=([\w.-]+)"))
    return {"world_size": int(ws.group(1)) if ws else None, "gpu_memory_gib": float(mem.group(1)) if mem else None,
            "gpu": gpu.group(1) if gpu else None}


def read_header(path: str | Path) -> dict:
    """The `# key: value` lines a recipe starts with, up to its first non-comment line: recipe,
    command, launch, hardware (parsed into world_size / gpu_memory_gib / gpu), arch, strategy, and
    the lists variant, pending, reported, peer."""
    out: dict = {k: [] for k in _LISTS}
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        m = _HEADER.match(line)
        if m and m.group(1) in _LISTS:
            out[m.group(1)].append(m.group(2).strip())
        elif m:
            out.setdefault(m.group(1), m.group(2).strip())
    out.update(parse_hardware(out.get("hardware", "")))
    cmd = re.search(r"reftune (\S+)", out.get("command", ""))
    out["reftune_command"] = cmd.group(1) if cmd else None
    return out


def parse_variant(line: str) -> dict:
    """`label | overrides | arch=NAME | hardware: (...) | reported: ...` (parts after the overrides
    optional, any order): what a variant changes relative to its recipe."""
    parts = [p.strip() for p in line.split(" | ")]
    out = {"label": parts[0], "overrides": parts[1].split() if len(parts) > 1 else [], "reported": ""}
    for part in parts[2:]:
        if part.startswith("arch="):
            out["arch"] = part[len("arch="):]
        elif part.startswith("hardware:"):
            out.update({k: v for k, v in parse_hardware(part).items() if v is not None})
        elif part.startswith("reported:"):
            out["reported"] = part[len("reported:"):].strip()
    return out


def _literal(raw: str):
    """A `pending:` value: true/false, a number, [a,b] (a list of names) or a string."""
    if raw in ("true", "false"):
        return raw == "true"
    if raw.startswith("[") and raw.endswith("]"):
        return [x.strip() for x in raw[1:-1].split(",") if x.strip()]
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def load_recipe(path: str | Path, command: str | None = None, overrides: list[str] | None = None):
    """(config, header) of a recipe; `command` defaults to its header's.

    `# pending: key=value ...` lines set fields the config classes do not have yet (the scale-out
    fields being added): the plan reads them as if set, the trainers never see them, and
    header["pending_fields"] lists those the class already has (the recipe should then set them)."""
    import dataclasses
    import importlib

    from reftune.config import load_config

    header = read_header(path)
    command = command or header["reftune_command"]
    if command not in COMMANDS:
        raise PlanError(f"{path}: command {command!r}: expected one of {', '.join(COMMANDS)}")
    module, name = COMMANDS[command].split(":")
    cfg = load_config(getattr(importlib.import_module(module), name), path, overrides)
    header["pending_fields"] = []
    for item in " ".join(header["pending"]).split():
        key, _, raw = item.partition("=")
        *section, field_name = key.split(".")  # `rm.gradient_checkpointing`: a field of a nested section
        target = cfg
        for part in section:
            target = getattr(target, part)
        if field_name in {f.name for f in dataclasses.fields(target)}:
            header["pending_fields"].append(key)
        elif not any(o.split("=", 1)[0] == key for o in overrides or []):
            object.__setattr__(target, field_name, _literal(raw))
    return cfg, header


def plan_recipe(path: str | Path, overrides: list[str] | None = None, variant: dict | None = None, **kw) -> RunPlan:
    """The plan of a recipe, or of one of its variants (`parse_variant`), on the hardware its header
    (or the variant) states; keywords override that."""
    if variant is not None:
        overrides = list(overrides or []) + variant["overrides"]
        kw = {**{k: variant[k] for k in ("world_size", "gpu_memory_gib", "gpu") if k in variant},
              **({"model_spec": variant["arch"]} if "arch" in variant else {}), **kw}
    cfg, header = load_recipe(path, overrides=overrides)
    kw.setdefault("world_size", header["world_size"] or 1)
    kw.setdefault("gpu_memory_gib", header["gpu_memory_gib"])
    kw.setdefault("model_spec", header.get("arch") or None)
    kw.setdefault("strategy", header.get("strategy") or None)
    kw.setdefault("gpu", header["gpu"])
    return plan_run(cfg, **kw)


def markdown_table(paths: list[str | Path]) -> str:
    """One row per recipe on its stated hardware: what docs/scaling.md shows (regenerate it with
    `python -m reftune.plan --table configs/recipes/*.yaml`)."""
    rows = ["| recipe | command | devices | per device | global batch | GiB per device (peak) | est. hours (GPU-h) |",
            "|---|---|---|---|---|---|---|"]
    for path in sorted(paths, key=lambda p: Path(p).name):  # the same order whatever the shell's glob gives
        header, plan = read_header(path), plan_recipe(path)
        dev = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in plan.per_device.items())
        hours = f"{plan.hours:,.1f} ({plan.gpu_hours:,.0f})" if plan.hours is not None else "n/a"
        rows.append(f"| `{Path(path).name}` | {header['reftune_command']} | {plan.world_size} x {header['gpu']} "
                    f"({plan.strategy}) | {dev} | {plan.global_batch} | {plan.total_gib:.1f} of "
                    f"{plan.gpu_memory_gib:g} ({plan.peak_phase}) | {hours} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reftune.plan", description="Plan a reftune run without loading weights.")
    p.add_argument("-c", "--config", help="recipe or config YAML")
    p.add_argument("--command", choices=sorted(COMMANDS), help="reftune command (default: the recipe header's)")
    p.add_argument("--world-size", type=int, help="devices in all, every node (default: the header's, else 1)")
    p.add_argument("--gpu-memory", type=float, help="GiB per device (default: the header's)")
    p.add_argument("--gpu", choices=sorted(GPUS), help="GPU of the time estimate")
    p.add_argument("--arch", help="base architecture when the model is neither a known id nor a local folder")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), help="default: the config's parallel")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.add_argument("--table", nargs="+", metavar="RECIPE", help="print the Markdown table of these recipes")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for reftune")
    args = p.parse_args(argv)
    try:
        if args.table:
            print(markdown_table(args.table))
            return 0
        if not args.config:
            p.error("-c/--config is required (or --table)")
        cfg, header = load_recipe(args.config, args.command, args.overrides)
        plan = plan_run(cfg, args.world_size or header["world_size"] or 1,
                        args.gpu_memory if args.gpu_memory is not None else header["gpu_memory_gib"],
                        args.arch or header.get("arch"), strategy=args.strategy or header.get("strategy"),
                        gpu=args.gpu or header["gpu"])
    except (PlanError, ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        print(f"reftune.plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**asdict(plan), "fits": plan.fits}, indent=2) if args.json else plan.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
