"""The P-CoT program executor: ``run_programs(programs) -> [ExecResult]``.

Owns: the parent-side pool (`executor.py`) and the locked-down worker process (`worker.py`).
May import: the standard library only (the worker never imports reftune, torch or anything the
trainer loaded). What the sandbox covers and what it does not is in `executor.py`'s docstring.
"""

from reftune.sandbox.executor import (DEFAULT_MODULES, ExecResult, ProgramExecutor, configure, run_program,
                                      run_programs, shutdown)

__all__ = ["DEFAULT_MODULES", "ExecResult", "ProgramExecutor", "configure", "run_program", "run_programs", "shutdown"]
