"""Process-wide CPU runtime settings: torch's thread pool, chosen to degrade gracefully under load.

    from reftune.runtime import configure_threads
    configure_threads()          # before `import torch` wherever possible (see below)
"""

from __future__ import annotations

import os
import sys


def free_cores() -> int:
    """CPUs this process may use minus the runnable load already on them (1-minute load average),
    at least 1. Read at start-up, before this process adds its own load."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:  # no load average on this platform
        busy = 0
    return max(1, min(cpus, cpus - busy))


def configure_threads(threads: int = 0) -> dict:
    """Pin torch's intra-op thread count and make its OpenMP workers sleep instead of spin.

    threads: the intra-op thread count; 0 chooses `free_cores()` (all CPUs on an idle machine,
    fewer beside other busy processes).

    Why (bench/bench_threads.py, 2-core machine shared with other jobs): torch's default is one
    thread per core with OpenMP's ACTIVE wait policy, whose idle workers spin for a while at every
    barrier. Beside a busy process, each parallel region then waits for a worker that the OS has
    descheduled in favour of the competitor, and small ops (the tiny model's decode steps, its
    training steps) run 4-60x slower; alone, 2 threads buy little for a 0.9 M-parameter model.
    `OMP_WAIT_POLICY=PASSIVE` makes waiting workers yield the core; fewer threads than busy cores
    removes the waiting itself. The measurement (medians, ratios to running alone with the
    default) is in bench_threads.py's docstring.

    The wait policy is read when torch loads its OpenMP runtime, so it only takes effect when this
    runs before the first `import torch` of the process (the CLI calls it first thing); otherwise
    the thread count is still pinned, and the returned dict says `wait_policy_applied: False`.
    An OMP_WAIT_POLICY already set in the environment is kept. Returns what was set.
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: automatic), got {threads}")
    torch_loaded = "torch" in sys.modules
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    n = threads or free_cores()
    # For the OpenMP runtime (and MKL) if torch is not loaded yet, and for any subprocess.
    os.environ["OMP_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    return {"threads": n, "automatic": threads == 0, "wait_policy": os.environ["OMP_WAIT_POLICY"],
            "wait_policy_applied": not torch_loaded}
