"""Gold reproduction: grade every gold CoT of each training file with reftune's own grader.

A gold CoT that does not give back its gold answer is either broken data (listed, with the reason,
in `reftune.tasks.datasets.KNOWN_BAD_GOLD` and dropped from training) or a grading bug (fix it).

    .venv/bin/python bench/check_gold.py [--data-dir ../shared/data] [--timeout 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from reftune.tasks.datasets import (
    GSM8K_FILES, KNOWN_BAD_GOLD, RELEASE, RELEASE_TRAIN_FILE, Fields, gold_failures,
)


def files_to_check(data_dir: Path) -> list[tuple[Path, str, str, Fields]]:
    """(path, style, answer type, fields) of every known training file present under data_dir."""
    out = []
    for split in ("train", "test"):  # GSM8K's test file has gold CoTs too
        out.append((data_dir / GSM8K_FILES[split], "nl", "number", Fields("question", "answer", "answer", "id")))
    for rel in RELEASE.values():
        for style, pattern in RELEASE_TRAIN_FILE.items():
            name = pattern.format(prefix=rel.prefix)
            path = next((p for p in (data_dir / "reft" / name, data_dir / name) if p.is_file()), None)
            if path is not None:
                out.append((path, style, rel.answer_type, Fields()))
    return [f for f in out if f[0].is_file()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--data-dir", type=Path, default=root / ".." / "shared" / "data")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per gold program")
    args = parser.parse_args()
    unexplained = 0
    for path, style, answer_type, fields in files_to_check(args.data_dir.resolve()):
        start = time.perf_counter()
        n, failures = gold_failures(path, style, answer_type, fields, timeout=args.timeout)
        known = KNOWN_BAD_GOLD.get(path.name, {})
        rate = 100.0 * (n - len(failures)) / n
        new = [f for f in failures if f[0] not in known]
        unexplained += len(new)
        print(f"{path.parent.name}/{path.name} ({style}): {n - len(failures)}/{n} = {rate:.2f}% reproduced; "
              f"{len(failures)} failing ({len(failures) - len(new)} known bad gold, {len(new)} unexplained); "
              f"{time.perf_counter() - start:.1f}s")
        for row_id, gold, got, reason in failures:
            note = known.get(row_id, "NOT IN KNOWN_BAD_GOLD: inspect (grading bug or new bad data)")
            print(f"  {row_id}: gold {gold}, extracted {got} ({reason}) -- {note}")
    if unexplained:
        print(f"{unexplained} unexplained failing rows")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
