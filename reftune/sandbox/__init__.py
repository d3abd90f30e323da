"""The P-CoT program executor: ``run_programs(programs) -> [ExecResult]``.

Owns: the parent-side pool (`executor.py`), the zygote worker that forks one child per program
(`worker.py`), the Python-level policy (`policy.py`, with the per-module API allow-lists and sympy's
hardening in `apis.py`) and the OS layers (`oslayers.py`: seccomp, Landlock, namespaces, limits).
May import: the standard library only (the worker never imports reftune, torch or anything the
trainer loaded). What the sandbox covers and what it does not is in `executor.py`'s docstring.
"""

from reftune.sandbox.executor import (DEFAULT_MODULES, ExecResult, ProgramExecutor, configure, run_program,
                                      run_programs, shutdown)

__all__ = ["DEFAULT_MODULES", "ExecResult", "ProgramExecutor", "configure", "run_program", "run_programs", "shutdown"]
