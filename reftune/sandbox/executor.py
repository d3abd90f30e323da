"""Run model-written Python programs (P-CoT) safely and fast: ``run_programs(programs) -> [ExecResult]``.

Each program is defined in a fresh namespace (one globals dict, so top-level helpers work) and its
``solution()`` is called; the returned value becomes the reward input. Programs run in a pool of
persistent worker processes (``worker.py``, started with ``subprocess``: fork+exec of a clean
``python -s -B``, never a fork of the trainer, never torch), up to ``max_batch`` per round trip with
results streamed back one by one, so a worker that dies or hangs costs exactly one program: the
parent kills it, reports that program ("timeout"/"crashed"), starts a fresh worker and resubmits the
rest of its batch.

What is covered (``ProgramExecutor.protections`` lists the OS-level layers that took effect here;
they are best effort and left out silently where the kernel refuses them):

* Python level (always): the program is parsed and refused ("forbidden: ...") if it names an
  attribute that starts with ``_`` (``__class__``, ``__subclasses__``, ``__globals__``, ``__dict__``,
  ``random._os``...) other than harmless protocol dunders (``__init__``, ``__add__``, ``__len__``...)
  and namedtuple's ``_asdict``/``_replace``/..., or a frame/code attribute (``gi_frame``, ``f_globals``,
  ``tb_frame``...). Builtins are an allowlist: no ``open``, ``compile``, ``input``, ``breakpoint``,
  ``help``, ``globals``/``locals``/``vars``, ``exit``/``quit``; ``getattr``/``setattr``/``delattr``
  apply the attribute rule; ``eval``/``exec`` of strings are allowed but the strings get the same
  check and the restricted builtins. ``import`` reaches only ``DEFAULT_MODULES`` (math, cmath,
  fractions, decimal, numbers, statistics, random, itertools, functools, operator, collections,
  heapq, bisect, string, re, datetime, sympy, ...) -- never os/sys/subprocess/socket/ctypes/shutil/
  pathlib/io -- as read-only proxies with public names only, known gadgets removed
  (``string.Formatter``, ``typing.get_type_hints``, ``sympy.lambdify``/``preview``/``plot``,
  ``sympy.utilities``/``parsing``...), and the strings sympify()/parse_expr() evaluate are checked
  like program code. print() output is discarded (fds 0-2 are /dev/null too): a flood cannot fill a pipe.
* Process: the environment holds only thread-count caps, PYTHONHASHSEED=0 (same set order, hence
  same str() results, in every worker) and PYTHONSAFEPATH -- no tokens, HOME or PATH; cwd is a fresh
  temp dir created by the parent and removed by it even after a SIGKILL; ``os.fork/system/exec*/
  spawn*/kill/...`` are deleted from ``os``. Limits: wall timeout (SIGALRM in the worker, SIGKILL from
  the parent ``grace`` s later), RLIMIT_CPU backstop, RLIMIT_AS = ``memory_mb`` for the whole worker
  (the interpreter and sympy use ~60-100 MB of it; MemoryError -> "memory"), RLIMIT_FSIZE 1 MiB,
  RLIMIT_CORE 0, RLIMIT_NOFILE 64, RLIMIT_NPROC 0 (which root ignores).
* OS (Linux): a private network namespace (no usable interface; needs root or unprivileged user
  namespaces). Landlock (kernel >= 5.13): read-only access to the Python install (prefixes and
  sys.path folders) and system library folders, read-write access to the temp dir, nothing else --
  no user files, no /proc/<trainer>/environ -- and no execve anywhere; no TCP (ABI >= 4); no signals
  to, or abstract sockets of, processes outside (ABI >= 6). seccomp (x86_64/aarch64): fork, vfork,
  clone of processes, execve, socket, socketpair, ptrace, pidfd_open and process_vm_* fail with
  EPERM; kill/tkill/tgkill work only on the worker itself.

What is NOT covered:

* This is not a security boundary against a determined attacker. The Python-level layer blocks
  known escape routes over a huge surface (sympy alone has hundreds of modules and its own eval/exec
  sites); a new gadget, a CPython/sympy bug or memory corruption yields the real ``os``. The OS layers
  then limit the damage, but only where they took effect: without Landlock an escaped program can
  read (and write up to 1 MiB to) whatever the trainer's user can, including /proc/<trainer>/environ;
  without seccomp it can open pathname Unix sockets (e.g. /var/run/docker.sock), and as root fork and
  exec. UDP is blocked only by the network namespace. Run the trainer as a non-root user.
* Programs that share a worker share an interpreter: one may monkeypatch a library *class*
  (``sympy.Symbol.x = ...``, ``numbers.Number.register``) and change a later program's result on that
  worker until it is recycled (every ``max_tasks_per_worker`` programs). Module objects are read-only,
  ``random`` is reseeded (0) and the decimal context reset before every program.
* ``'{0.__class__}'.format(x)`` walks attributes the static check cannot see; it only yields text.
* Only ``solution()``'s return value is collected; printed answers are discarded. A program that
  catches the timeout exception and keeps looping is killed at ``timeout + grace``; so is CPU work
  inside one C call (``10**10**8``, regex backtracking), which the alarm cannot interrupt.
* numpy is not importable by default (file I/O, ctypes helpers); ``allowed_modules=DEFAULT_MODULES +
  ("numpy",)`` removes the known gadgets but weakens the sandbox.

The parent never unpickles anything from a worker: results are length-prefixed JSON, size-capped.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

from reftune.sandbox.worker import DEFAULT_MODULES, KEEP_ENV

__all__ = ["DEFAULT_MODULES", "ExecResult", "ProgramExecutor", "configure", "run_program", "run_programs", "shutdown"]

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
_HEADER = struct.Struct(">I")
_MAX_FRAME = 1 << 20  # a worker's results are small (strings are capped at 10k chars); more = misbehaving
_STARTUP_S = 30.0  # allowance for a fresh worker to say hello (cold disk, loaded machine)
_IMPORT_S = 60.0  # allowance for a program's first `import sympy` (not counted in its timeout)


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program.

    value: what solution() returned: int/float/str kept (bool -> int); Fraction, Decimal, sympy
        numbers and numpy scalars -> float; anything else -> str(obj) (capped); None on failure (or if
        solution() returned None).
    reason: "" on success; otherwise one of "timeout", "memory", "crashed", "no solution()",
        "output too large", "error: <ExcType>: <msg>", "forbidden: <what>".
    """

    value: int | float | str | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.reason == ""


class _Worker:
    """Parent-side handle of one worker process: pipes, framing buffer, jobs in flight, deadline."""

    def __init__(self, config: str, memory_mb: int):
        self.memory_mb = memory_mb
        self.tmpdir = tempfile.mkdtemp(prefix="reftune-sandbox-")
        self.proc = subprocess.Popen(
            [sys.executable, "-s", "-B", _WORKER, config],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=self.tmpdir, env=dict(KEEP_ENV), close_fds=True,
        )  # fmt: skip
        self.fd_out, self.fd_in = self.proc.stdout.fileno(), self.proc.stdin.fileno()
        os.set_blocking(self.fd_in, False)  # never block the event loop on a worker that stopped reading
        self.inbuf, self.outbuf = bytearray(), b""
        self.jobs: deque[int] = deque()  # indices sent and not yet answered, in execution order
        self.ready = False  # hello received
        self.deadline = time.monotonic() + _STARTUP_S
        self.tasks = 0
        self.stderr = ""

    def send(self, obj) -> None:
        data = json.dumps(obj).encode()
        self.outbuf += _HEADER.pack(len(data)) + data
        self.flush()

    def flush(self) -> None:
        try:
            while self.outbuf:
                self.outbuf = self.outbuf[os.write(self.fd_in, self.outbuf) :]
        except BlockingIOError:
            pass  # the rest goes out when poll() says the pipe has room
        except OSError:
            self.outbuf = b""  # dead worker: its stdout reports EOF next

    def frames(self) -> list | None:
        """Read what is available; the complete messages, or None on EOF / protocol violation."""
        chunk = os.read(self.fd_out, 1 << 16)
        if not chunk:
            return None
        self.inbuf += chunk
        out = []
        while len(self.inbuf) >= 4:
            size = _HEADER.unpack_from(self.inbuf)[0]
            if size > _MAX_FRAME:
                return None
            if len(self.inbuf) < 4 + size:
                break
            try:
                out.append(json.loads(self.inbuf[4 : 4 + size]))
            except ValueError:
                return None
            del self.inbuf[: 4 + size]
        return out

    def close(self, kill: bool = False) -> int | None:
        """Stop the process (EOF on stdin asks it to leave; SIGKILL if asked or needed), remove its dir."""
        if kill:
            self.proc.kill()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not self.ready:  # keep the start-up error for the exception message
            self.stderr = self.proc.stderr.read().decode(errors="replace")
        self.proc.stdout.close()
        self.proc.stderr.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        return self.proc.returncode


def _close_all(workers: list) -> None:
    for i, w in enumerate(workers):
        if w is not None:
            w.close()
            workers[i] = None


class ProgramExecutor:
    """A pool of sandbox workers, started lazily and reused across calls. Thread-safe (calls serialize).

    workers: pool size (default min(cpu_count, 4)). grace: seconds past `timeout` before a worker that
    ignores its alarm is killed. max_batch: most programs per round trip. max_tasks_per_worker:
    recycle a worker after that many programs (bounds state leaking between programs and sympy's cache
    growth). allowed_modules: importable top-level modules. _os_layers_only: for tests of the OS
    layers only -- programs get the real builtins and imports (never use it for model output).
    """

    def __init__(self, workers: int | None = None, *, grace: float = 0.5, max_batch: int = 16,
                 max_tasks_per_worker: int = 2000, allowed_modules: tuple[str, ...] = DEFAULT_MODULES,
                 _os_layers_only: bool = False):  # fmt: skip
        self.size = workers or min(os.cpu_count() or 1, 4)
        self.grace, self.max_tasks, self.max_batch = grace, max_tasks_per_worker, max_batch
        self._allowed, self._os_only = tuple(allowed_modules), _os_layers_only
        self._workers: list[_Worker | None] = [None] * self.size
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.protections: list[str] = []  # OS layers reported by the latest worker (see module doc)
        self._finalizer = weakref.finalize(self, _close_all, self._workers)

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w is not None and w.proc.poll() is None]

    def close(self) -> None:
        with self._lock:
            _close_all(self._workers)

    def __enter__(self) -> ProgramExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(self, memory_mb: int) -> _Worker:
        config = json.dumps({"memory_mb": memory_mb, "modules": self._allowed, "os_layers_only": self._os_only})
        return _Worker(config, memory_mb)

    def run(self, programs: list[str], timeout: float = 2.0, memory_mb: int = 512,
            entry: str = "solution") -> list[ExecResult]:  # fmt: skip
        """Execute each program (define it, call `entry`()); results in input order."""
        programs = list(programs)
        if not all(isinstance(p, str) for p in programs):
            raise TypeError("programs must be strings")
        if timeout <= 0 or memory_mb <= 0:
            raise ValueError("timeout and memory_mb must be positive")
        if not programs:
            return []
        with self._lock:
            if os.getpid() != self._pid:  # we are a fork of the process that started the pool:
                self._workers[:] = [None] * self.size  # those workers belong to it, leave them alone
                self._pid = os.getpid()
            try:
                return self._run(programs, float(timeout), int(memory_mb), entry)
            except BaseException:  # e.g. KeyboardInterrupt: workers still busy would answer a later call
                for slot, w in enumerate(self._workers):
                    if w is not None and (w.jobs or w.outbuf):
                        self._workers[slot] = None
                        w.close(kill=True)
                raise

    def _run(self, programs: list[str], timeout: float, memory_mb: int, entry: str) -> list[ExecResult]:
        results: list = [None] * len(programs)
        pending = deque(range(len(programs)))
        budget = timeout + self.grace
        poller, watched = select.poll(), {}  # watched: fd -> slot
        startup_failures = 0

        def retire(slot: int, kill: bool) -> tuple[_Worker, int | None]:
            w, self._workers[slot] = self._workers[slot], None
            for fd in (w.fd_out, w.fd_in):
                if watched.pop(fd, None) is not None:
                    poller.unregister(fd)
            return w, w.close(kill=kill)

        def fail(slot: int, reason: str) -> None:
            """The worker died or hung: blame the program it was running, resubmit the others."""
            nonlocal startup_failures
            w, code = retire(slot, kill=True)
            if code == -signal.SIGXCPU:
                reason = "timeout"  # the RLIMIT_CPU backstop fired
            if not w.ready:  # it never got going: nobody to blame, but do not loop forever
                startup_failures += 1
                if startup_failures > 3:
                    raise RuntimeError(f"sandbox worker does not start (exit {code}): {w.stderr[-2000:]}")
            elif w.jobs:
                results[w.jobs.popleft()] = ExecResult(None, reason)
            pending.extendleft(reversed(w.jobs))

        def feed(slot: int) -> None:
            w = self._workers[slot]
            if w is not None and (w.proc.poll() is not None or w.memory_mb != memory_mb or w.tasks >= self.max_tasks):
                retire(slot, kill=False)  # died while idle, other limits, or due for recycling
                w = None
            if w is None:
                w = self._workers[slot] = self._spawn(memory_mb)
            # Guided self-scheduling: batches amortise round trips but shrink as the queue drains, so
            # that a few slow programs at the end do not queue up behind each other on one worker.
            batch = max(1, min(self.max_batch, len(pending) // (2 * self.size)))
            jobs = [pending.popleft() for _ in range(batch)]
            w.jobs.extend(jobs)
            w.send({"jobs": [[i, programs[i]] for i in jobs], "timeout": timeout, "entry": entry})
            if w.ready:
                w.deadline = time.monotonic() + budget
            for fd, mask, needed in ((w.fd_out, select.POLLIN, True), (w.fd_in, select.POLLOUT, bool(w.outbuf))):
                if needed and fd not in watched:
                    poller.register(fd, mask)
                    watched[fd] = slot

        while True:
            for slot, w in enumerate(self._workers):
                if pending and (w is None or not w.jobs):
                    feed(slot)
            busy = [w for w in self._workers if w is not None and w.jobs]
            if not busy:
                return results
            wait = min(w.deadline for w in busy) - time.monotonic()
            for fd, _ in poller.poll(max(0.0, wait) * 1000 + 1):
                slot = watched.get(fd)
                if slot is None:  # its worker was retired earlier in this round
                    continue
                w = self._workers[slot]
                if fd == w.fd_in:  # room in the stdin pipe for the rest of a large batch
                    w.flush()
                    if not w.outbuf:
                        poller.unregister(fd)
                        del watched[fd]
                    continue
                messages = w.frames()
                if messages is None or not all(self._handle(w, m, results, budget) for m in messages):
                    fail(slot, "crashed")
            now = time.monotonic()
            for slot, w in enumerate(self._workers):
                if w is not None and w.jobs and now > w.deadline:
                    fail(slot, "timeout")

    def _handle(self, w: _Worker, msg, results, budget: float) -> bool:
        """Apply one message from a worker; False if it breaks the protocol (the worker is then killed)."""
        now = time.monotonic()
        if not isinstance(msg, dict):
            return False
        if "hello" in msg and not w.ready:
            w.ready, w.deadline = True, now + budget
            self.protections = [str(p) for p in msg.get("prot", [])]
            return True
        if not w.ready or not w.jobs or msg.get("i") != w.jobs[0]:
            return False  # results come strictly in the order the jobs were sent
        if msg.get("ev") == "import":
            w.deadline = now + _IMPORT_S
        elif msg.get("ev") == "start":
            w.deadline = now + budget
        elif "r" in msg:
            value, reason = msg.get("v"), msg["r"]
            if isinstance(value, bool):
                value = int(value)
            if not (value is None or isinstance(value, (int, float, str))) or not isinstance(reason, str):
                return False
            results[w.jobs.popleft()] = ExecResult(value, reason[:1000])
            w.tasks += 1
            w.deadline = now + budget
        else:
            return False
        return True


_default: ProgramExecutor | None = None  # the one piece of module state: created on first use
_default_lock = threading.Lock()


def _default_executor() -> ProgramExecutor:
    global _default
    with _default_lock:
        if _default is None:
            _default = ProgramExecutor()
        return _default


def configure(**kwargs) -> ProgramExecutor:
    """Replace the default pool used by run_programs (kwargs of ProgramExecutor); returns it."""
    global _default
    with _default_lock:
        old, _default = _default, ProgramExecutor(**kwargs)
    if old is not None:
        old.close()
    return _default


def run_programs(programs: list[str], timeout: float = 2.0, memory_mb: int = 512,
                 entry: str = "solution") -> list[ExecResult]:  # fmt: skip
    """Run each program in the default sandbox pool; results in input order (see ExecResult)."""
    return _default_executor().run(programs, timeout=timeout, memory_mb=memory_mb, entry=entry)


def run_program(program: str, **kw) -> ExecResult:
    return run_programs([program], **kw)[0]


def shutdown() -> None:
    """Close the default pool (a later call starts a new one)."""
    global _default
    with _default_lock:
        old, _default = _default, None
    if old is not None:
        old.close()


atexit.register(shutdown)
