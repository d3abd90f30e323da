"""The P-CoT program executor: ``run_programs(programs) -> [ExecResult]``.

Owns: the parent-side pool (`executor.py`), the zygote worker that forks one child per program
(`worker.py`), the Python-level policy (`rules.py`: what a program may name, checked on its syntax
tree; `policy.py`: module views, builtins, the children's compile guard; `pure.py`: which programs
may share a child; `apis.py`: the per-module API allow-lists; `harden.py`: sympy's and mpmath's
evaluators closed; `errors.py`: the refusals), the OS layers (`oslayers.py`: seccomp, Landlock,
namespaces, the private tmpfs, limits) and the temp folders' clean-up (`folders.py`).
May import: the standard library only (the worker never imports reftune, torch or anything the
trainer loaded; the modules above import each other only downwards: errors, apis < rules, pure,
harden < pure < policy). What the sandbox covers and what it does not is in `executor.py`'s docstring and
docs/sandbox.md.
"""

from reftune.sandbox.executor import (DEFAULT_MODULES, ExecResult, ProgramExecutor, configure, run_program,
                                      run_programs, shutdown)

__all__ = ["DEFAULT_MODULES", "ExecResult", "ProgramExecutor", "configure", "run_program", "run_programs", "shutdown"]
