"""Process-wide CPU runtime settings: torch's thread pool, chosen to degrade gracefully under load.

    from reftune.runtime import configure_threads
    configure_threads()          # before `import torch` wherever possible (see below)
"""

from __future__ import annotations

import os
import sys


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_cores() -> int:
    """CPUs this process may use minus the runnable load already on them (1-minute load average),
    at least 1. Read at start-up, before this process adds its own load."""
    cpus = _cpus()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:  # no load average on this platform
        busy = 0
    return max(1, min(cpus, cpus - busy))


def configure_threads(threads: int = 0) -> dict:
    """Pin torch's intra-op thread count and make its OpenMP workers sleep instead of spin.

    threads: the intra-op thread count. 0 chooses automatically: every CPU of the process when the
    passive wait policy is in effect (the robust choice, measured below), else `free_cores()`
    (fewer threads than busy cores, because spinning workers are what collapses under load).

    Why (bench/bench_threads.py at commit 7accd29, a 2-core AMD EPYC with AVX2 that also ran a demo
    and other jobs, load average 5-9; medians of 3 rounds, seconds for 32 rows x 32 decode tokens / one ReFT-like train step of
    the demo's tiny model; "busy": beside one more process spinning on a core):

        setting                     decode alone  decode busy  train alone  train busy
        torch default (2, active)    7.7 (>90)      14.5 (>90)     4.8          6.6
        OMP_WAIT_POLICY=PASSIVE, 2   0.59           0.55           0.64         0.81
        1 thread (active)            0.41           1.43           0.82         1.72

    torch's default is one thread per core with OpenMP's ACTIVE wait policy: idle workers spin at
    every barrier, and when the OS has descheduled one in favour of another process, every small
    op waits for it: 7-26x slower than passive here, some runs past 90 s (over 100x). PASSIVE lets
    waiting workers yield the core; with it, 2 threads were never more than 1.4x off the best
    setting, while 1 thread lost 2-2.6x whenever another process competed for its core.

    The wait policy is read when torch loads its OpenMP runtime, so it only takes effect when this
    runs before the first `import torch` of the process (the CLI should call it first thing);
    otherwise the thread count is still pinned and the result says `wait_policy_applied: False`.
    An OMP_WAIT_POLICY already set in the environment is kept. Returns what was set.
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: automatic), got {threads}")
    torch_loaded = "torch" in sys.modules
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    passive = os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE" and not torch_loaded
    # An OMP_NUM_THREADS the user (or a test harness) already set is a choice too: keep it.
    n = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or (_cpus() if passive else free_cores())
    # For the OpenMP runtime (and MKL) if torch is not loaded yet, and for any subprocess.
    os.environ["OMP_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    return {"threads": n, "automatic": threads == 0, "wait_policy": os.environ["OMP_WAIT_POLICY"],
            "wait_policy_applied": not torch_loaded}


def numerics() -> dict:
    """What decides this process's float rounding on a CPU, for run summaries: torch's version, the
    vector instruction set its own kernels were dispatched to (`ATEN_CPU_CAPABILITY` can lower it:
    AVX2 vs AVX512 kernels round differently), and the thread count."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}
