"""Run model-written Python programs (P-CoT) safely and fast: ``run_programs(programs) -> [ExecResult]``.

Each program is defined in a fresh namespace (one globals dict, so top-level helpers work) and its
``solution()`` is called; the returned value becomes the reward input. In ReFT the policy writes the
code that decides its own reward, so the executor is built to hold against programs written to break
it: no program can change another's result or timing, or be charged for another's faults.

How it runs: a pool of zygote processes (``worker.py``, started with ``subprocess``: fork+exec of a
clean ``python -s -B`` in a new session, never a fork of the trainer, never torch) imports the allowed
modules once and runs no program code. It parses, checks and compiles a short program (4 KB:
milliseconds at worst) itself, while the program before runs, and takes that time off the program's
own timeout; a longer one compiles in the child that runs it, on its clock and under its memory
limit. So a slow compile, or its warnings, cost that program alone. A forked child runs the program
and writes one result frame to a pipe of its own.
The zygote reads only that pipe, kills the child's process group, waits for it and empties the
temp folder before the next program. So nothing a program does survives it (monkeypatched classes,
module, random or decimal state, threads, objects with ``__del__``, files, sympy caches), and a
program can forge nothing but its own result. Results stream back one by one over a Unix socket
whose sender the kernel attests (a frame from any process but the zygote is refused); up to
``max_batch`` programs go per round trip. A zygote that dies or breaks the protocol costs its
current program ("crashed"); one that stalls (no word past ``timeout + grace``, though it ends
every program at ``timeout`` itself) is replaced and all its programs run again on a fresh one --
the current one at most twice before it gets "timeout".

The shared child. Pure programs (``pure.py``: plain computations on builtin data, math/cmath and
allow-listed methods of lists, dicts and strings -- every SVAMP gold program, most generated ones)
save the fork (~1-3 ms here) by running one after another in a shared child, which serves one call
of ``run`` at most and has no file access at all. What it guarantees: each program gets a namespace
and a copy of the builtins of its own (no name of a pure program starts with ``__``, and no program
may name ``__builtins__``), so no program rebinds what a later one calls; the modules it can import
(math, cmath) are read-only views; after each program the child checks that the views and the
import table are still the objects it started with, and ends itself if not; a program that
runs out of memory, crashes, or whose result shows an object address is rerun in a fork of its own;
one that hangs ends the shared child. Programs that are not pure, or longer than 4 KB, run in a
fresh fork each.

Layers, outermost first (``ProgramExecutor.protections`` lists the OS ones that took effect here;
each is best effort and left out where the kernel refuses it, and a child that cannot apply every
layer its zygote's probe child could exits before running its program):

* fork-per-program (always): state, threads and files die with the child; PR_SET_PDEATHSIG kills it
  if the zygote dies; the zygote kills it at ``timeout`` (plus RLIMIT_CPU as a backstop).
* seccomp (x86_64/aarch64, kernel >= 3.5, needs no_new_privs): an ALLOW-list of the ~80 system calls
  CPython needs to run a program (file and memory calls, futex, clocks, getrandom, threads = clone
  with CLONE_THREAD); everything else is EPERM -- socket of any family, io_uring_*, bpf, ptrace,
  process_vm_*, pidfd_*, mount, unshare/setns, keyctl, userfaultfd, perf_event_open, SysV IPC, ioctl,
  prctl, kill/tgkill (to anyone), fork/vfork/clone of a process, execve, chdir, chmod, links,
  fcntl(F_SETOWN). Installed in the child before the first byte of program code runs. Without it
  (other architectures, old kernels) an escaped program can open sockets (pathname Unix sockets such
  as /var/run/docker.sock; TCP is then still stopped by the network namespace/Landlock), fork (as
  root) and signal same-user processes.
* Landlock (kernel >= 5.13, enabled LSM): read-only access to the Python install and system library
  folders; in the temp folder, regular files and folders only; nothing else -- no user files, no
  /proc (so no /proc/<trainer>/environ, fd or mem), no /dev -- and never EXECUTE (the shared child:
  no file at all). ABI >= 4: no TCP bind/connect; ABI >= 6: no signals to, or abstract Unix sockets
  of, processes outside. Without it an escaped program reads what the trainer's user can and writes
  up to 1 MiB per file anywhere that user can (cross-program state through files then needs an escape).
* tmpfs (root, or unprivileged user namespaces): the temp folder is a private tmpfs of
  ``oslayers.TMPFS_MB`` (8 MiB) and 1,024 entries in a mount namespace of the zygote's own: the
  kernel bounds what a program stores there (RAM outside ``memory_mb``), and it vanishes with the
  zygote; a janitor process outside that namespace removes the mount point if the trainer is gone
  too. Without it the zygote polls the folder every 20 ms while a forked program runs and kills it
  past the same bounds ("temp folder too large"): a program may exceed them by what it writes in
  20 ms. Either way the folder is emptied after every program -- at any depth, with any modes,
  without recursion (``folders.py``) -- and checked empty before each forked program starts (a
  zygote that cannot empty it asks to be replaced and its programs run elsewhere).
* network namespace (root, or unprivileged user namespaces): no usable interface at all. Without it
  UDP is stopped only by seccomp (no socket()).
* capabilities (root only): dropped in the zygote, so children have no CAP_SYS_PTRACE,
  DAC_OVERRIDE, NET_ADMIN...; the zygote is non-dumpable, so its /proc files are closed to them.
  RLIMIT_NPROC 0 stops forks of non-root children (root ignores it: seccomp is what stops them).
* limits: RLIMIT_AS = the interpreter's mapped size + ``memory_mb`` (MemoryError -> "memory"),
  RLIMIT_FSIZE 1 MiB, RLIMIT_CORE 0, RLIMIT_NOFILE 64, RLIMIT_CPU; stdout/stderr are /dev/null and
  print() is a no-op; warnings are ignored in the zygote and its children, and the zygote's own
  stderr is /dev/null once it has started, so no pipe can fill. The environment holds only
  thread-count caps, PYTHONHASHSEED=0 (same set order, hence same str() results, everywhere) and
  PYTHONSAFEPATH -- no tokens, HOME or PATH.
* Python level (always; a first filter, not the boundary): the program is parsed and refused
  ("forbidden: ...") by ``rules.py`` if it names an attribute that starts with ``_`` other than
  harmless protocol dunders (``__init__``, ``__add__``...) and namedtuple's ``_asdict``/..., a frame,
  code or traceback attribute, or ``.obj`` (AttributeError.obj holds the object whose lookup
  failed); if it names ``__builtins__``; if it calls ``.format``/``.format_map`` on anything but a
  string literal whose fields pass the same rule (a template walks attributes); if a ``match`` class
  pattern has positional sub-patterns (they read names from ``__match_args__``, which a program
  controls) other than ``case int(x)`` and the like on unshadowed builtin types. Names given at run
  time (getattr/setattr/delattr/hasattr, ``operator.attrgetter``/``methodcaller``, ``__import__``)
  are checked as the exact ``str`` Python will use, never through a ``str`` subclass's own methods.
  Builtins are an allow-list: no eval/exec/compile, open, input, globals/locals/vars, breakpoint,
  help, exit. ``import`` gives views of ``DEFAULT_MODULES`` holding only an allow-listed public API per
  module (``apis.py``): never the real module, never a submodule without its own list, never
  ``string.Formatter``, ``functools.singledispatch``/``wraps`` or ``dataclasses``. Inside sympy and
  mpmath (``harden.py``), sympify()/parse_expr() parse strings with an AST walk that builds the
  expression without eval, lambdify (exec of printed code) substitutes values instead,
  ``mpmath.identify`` takes its constants only as a dict of values (by name they are eval'ed), and
  ``import_module`` answers "not installed". In every child an audit hook then refuses any compile
  of text -- eval, exec, compile, typing's forward references, code generated anywhere in a library
  -- except the program's own checked tree and a few callers that compile text of their own (the
  parser, namedtuple, the import system, sympy's monomial code generator): a path to an evaluator
  that no rule foresaw fails closed. A lazily imported module (sympy) is importable only by a
  program whose text names it, so whether an earlier program made the zygote import it never
  changes what a later one can do.

What is NOT covered:

* The Python layer is a filter over a huge surface (sympy alone has hundreds of modules); a new
  gadget, a CPython/sympy bug or memory corruption yields real interpreter objects. Such a program
  is then still inside the OS layers above -- and only inside the ones listed in ``protections``.
  A forked child is a copy of its zygote, whose memory holds the rest of the batch's programs: an
  escaped program could read their text (not change their results). Run the trainer as a non-root
  user.
* A pure program that corrupted the interpreter's memory (a CPython bug reachable from arithmetic,
  list, dict and string code) would control the shared child, and with it the results of the pure
  programs after it in the same call on that zygote; every other guarantee holds. ``_share_pure =
  False`` on an executor gives every program a fork of its own (~5-10x slower for such programs).
* Only ``solution()``'s return value is collected; printed answers are discarded. A program is killed
  at ``timeout`` wherever it is (CPU work inside one C call, or its own compile, included).
* Only the modules with an allow-list in ``apis.py`` can be allowed (``allowed_modules`` is a subset).

The parent never unpickles anything from a worker: results are length-prefixed JSON, size-capped,
checked by the zygote (the child's frame) and again by the parent. What grading makes of a value
(bounds on magnitude, digits and length) is in ``reftune.rewards``; ``docs/sandbox.md`` has the
measured throughput.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass

from reftune.sandbox.apis import API
from reftune.sandbox.folders import remove_folder
from reftune.sandbox.policy import DEFAULT_MODULES, KEEP_ENV

__all__ = ["DEFAULT_MODULES", "ExecResult", "ProgramExecutor", "configure", "run_program", "run_programs", "shutdown"]

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
_HEADER = struct.Struct(">I")
_CRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid
_MAX_FRAME = 1 << 20  # a zygote's messages are small (strings are capped at 10k chars); more = misbehaving
_STARTUP_S = 30.0  # allowance for a fresh zygote to say hello (cold disk, loaded machine)
_IMPORT_S = 60.0  # allowance for a zygote's first `import sympy` (not counted in the program's timeout)
_MAX_STRIKES = 2  # a program whose zygote stalled (or asked to be replaced) this often gets no more tries


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program.

    value: what solution() returned: int/float/str kept (bool -> int); Fraction, Decimal and sympy
        numbers -> float; anything else -> str(obj) (capped); None on failure (or if solution()
        returned None).
    reason: "" on success; otherwise one of "timeout", "memory", "crashed", "no solution()",
        "output too large", "temp folder too large", "error: <ExcType>: <msg>", "forbidden: <what>".
    """

    value: int | float | str | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.reason == ""


class _Worker:
    """Parent-side handle of one zygote: socket, framing buffer, jobs in flight, deadline, temp dir."""

    def __init__(self, config: dict):
        # The name is ours (the zygote creates and removes the folder): safe to remove after a kill.
        self.tmpdir = os.path.join(tempfile.gettempdir(), f"reftune-sandbox-{secrets.token_hex(8)}")
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # kernel-attested sender pid
        config = dict(config, fd=theirs.fileno(), tmpdir=self.tmpdir)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-s", "-B", _WORKER, json.dumps(config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(),), cwd="/", env=dict(KEEP_ENV), start_new_session=True,
            )  # fmt: skip
        finally:
            theirs.close()
        self.sock.setblocking(False)  # never block the event loop on a zygote that stopped reading
        self.fd = self.sock.fileno()
        self.inbuf, self.outbuf = bytearray(), b""
        self.jobs: deque[int] = deque()  # indices sent and not yet answered, in execution order
        self.ready = False  # hello received
        self.acked = False  # the zygote confirmed the batch in flight (before: nobody to blame if it dies)
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
                self.outbuf = self.outbuf[self.sock.send(self.outbuf) :]
        except BlockingIOError:
            pass  # the rest goes out when poll() says the socket has room
        except OSError:
            self.outbuf = b""  # dead zygote: the socket reports EOF next

    def frames(self) -> list | None:
        """Read what is available; the complete messages, or None on EOF / protocol violation."""
        try:
            chunk, ancdata, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(_CRED.size))
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not chunk:
            return None
        creds = [_CRED.unpack_from(d)[0] for lvl, kind, d in ancdata
                 if lvl == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(d) >= _CRED.size]  # fmt: skip
        if creds != [self.proc.pid]:  # written by some other process (or unattested): not a result
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
        """Stop the zygote (EOF on its socket asks it to leave; SIGKILL if asked or needed) and remove
        its temp folder. Never raises on what a program left there (any depth, any mode)."""
        if kill:
            self.proc.kill()
        self.sock.close()
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not self.ready:  # keep the start-up error for the exception message
            self.stderr = self.proc.stderr.read(1 << 16).decode(errors="replace")
        self.proc.stderr.close()
        remove_folder(self.tmpdir)  # a killed zygote could not remove it
        return self.proc.returncode


def _close_all(workers: list) -> None:
    for i, w in enumerate(workers):
        if w is not None:
            workers[i] = None
            try:
                w.close()
            except Exception:  # close() and the exit hook must not raise: the next zygote goes on
                pass


class ProgramExecutor:
    """A pool of sandbox zygotes, started lazily and reused across calls. Thread-safe (calls serialize).

    workers: pool size (default min(cpu_count, 4)). grace: seconds past `timeout` that the parent
    waits for a result before it kills a zygote that stopped answering (the zygote itself kills a
    program at `timeout`). max_batch: most programs per round trip. max_tasks_per_worker: replace a
    zygote after that many programs (nothing of a program survives it; this only bounds a zygote's
    lifetime). allowed_modules: importable top-level modules, a subset of those with an API list in
    `apis.py`. _os_layers_only: for tests of the OS layers only -- programs get the real builtins and
    imports (never use it for model output).
    """

    def __init__(self, workers: int | None = None, *, grace: float = 0.5, max_batch: int = 16,
                 max_tasks_per_worker: int = 2000, allowed_modules: tuple[str, ...] = DEFAULT_MODULES,
                 _os_layers_only: bool = False):  # fmt: skip
        unknown = [m for m in allowed_modules if m not in API]
        if unknown:
            raise ValueError(f"no API allow-list for {unknown} (see reftune/sandbox/apis.py)")
        self.size = workers or min(os.cpu_count() or 1, 4)
        self.grace, self.max_tasks, self.max_batch = grace, max_tasks_per_worker, max_batch
        self._allowed, self._os_only = tuple(allowed_modules), _os_layers_only
        self._workers: list[_Worker | None] = [None] * self.size
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.protections: list[str] = []  # layers reported by the latest zygote (see module doc)
        self._share_pure = True  # pure programs share a child (worker.py); False: a fork for every program
        self._private_tmpfs = True  # False: the temp folder is a plain one, its size polled (tests of that path)
        self._calls = 0  # run() calls so far: a zygote's shared child never serves two
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

    def _spawn(self) -> _Worker:
        return _Worker({"modules": self._allowed, "os_layers_only": self._os_only, "share_pure": self._share_pure,
                        "tmpfs": self._private_tmpfs})

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
                self._workers[:] = [None] * self.size  # those zygotes belong to it, leave them alone
                self._pid = os.getpid()
            try:
                return self._run(programs, float(timeout), int(memory_mb), str(entry))
            except BaseException:  # e.g. KeyboardInterrupt: zygotes still busy would answer a later call
                for slot, w in enumerate(self._workers):
                    if w is not None and (w.jobs or w.outbuf):
                        self._workers[slot] = None
                        w.close(kill=True)
                raise

    def _run(self, programs: list[str], timeout: float, memory_mb: int, entry: str) -> list[ExecResult]:
        self._calls += 1
        job = {"timeout": timeout, "memory_mb": memory_mb, "entry": entry, "call": self._calls}
        return _Round(self, programs, job).run()


class _Round:
    """One call of `ProgramExecutor.run`: feeds the zygotes batches, reads their results, and
    replaces a zygote that dies, stalls or breaks the protocol.

    Blame: a zygote that dies or breaks the protocol costs its current program ("crashed"); one
    that stalls (no word past `timeout + grace`: the zygote itself ends every program at `timeout`,
    so the stall is its own, or the machine's) or asks to be replaced (its temp folder would not
    empty) costs nobody: all its programs are rerun on a fresh zygote, the current one at most
    _MAX_STRIKES times before it gets "timeout" / "crashed"."""

    def __init__(self, pool: ProgramExecutor, programs: list[str], job: dict):
        self.pool, self.programs, self.job = pool, programs, job
        self.results: list = [None] * len(programs)
        self.pending = deque(range(len(programs)))
        self.budget = job["timeout"] + pool.grace
        self.poller, self.watched = select.poll(), {}  # watched: fd -> slot
        self.startup_failures = 0
        self.strikes: Counter = Counter()

    def run(self) -> list[ExecResult]:
        workers = self.pool._workers
        while True:
            for slot, w in enumerate(workers):
                if self.pending and (w is None or not w.jobs):
                    self.feed(slot)
            busy = [w for w in workers if w is not None and w.jobs]
            if not busy:
                return self.results
            wait = min(w.deadline for w in busy) - time.monotonic()
            for fd, events in self.poller.poll(max(0.0, wait) * 1000 + 1):
                slot = self.watched.get(fd)
                if slot is not None:  # (None: its zygote was retired earlier in this round)
                    self.on_events(slot, events)
            now = time.monotonic()
            for slot, w in enumerate(workers):
                if w is not None and w.jobs and now > w.deadline:
                    self.fail(slot, "timeout", rerun=True)

    def on_events(self, slot: int, events: int) -> None:
        w = self.pool._workers[slot]
        if events & select.POLLOUT:  # room in the socket for the rest of a large batch
            w.flush()
            self.watch(w, slot)
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
            messages = w.frames()
            verdicts = [self.handle(w, m) for m in messages] if messages is not None else [False]
            if "requeue" in verdicts:
                self.fail(slot, "crashed", rerun=True)
            elif not all(verdicts):
                self.fail(slot, "crashed")

    def retire(self, slot: int, kill: bool) -> tuple[_Worker, int | None]:
        w, self.pool._workers[slot] = self.pool._workers[slot], None
        if self.watched.pop(w.fd, None) is not None:
            self.poller.unregister(w.fd)
        return w, w.close(kill=kill)

    def fail(self, slot: int, reason: str, rerun: bool = False) -> None:
        """Replace a zygote (see the class doc): its current program gets `reason` (unless `rerun`
        and it has strikes left); the rest go back to the queue."""
        w, code = self.retire(slot, kill=True)
        if not (w.ready and w.acked):  # it died before it got our batch: nobody to blame
            self.startup_failures += 1  # but do not loop forever
            if self.startup_failures > 3:
                raise RuntimeError(f"sandbox worker does not start (exit {code}): {w.stderr[-2000:]}")
        elif w.jobs:
            self.strikes[w.jobs[0]] += rerun
            if not rerun or self.strikes[w.jobs[0]] >= _MAX_STRIKES:
                self.results[w.jobs.popleft()] = ExecResult(None, reason)
        self.pending.extendleft(reversed(w.jobs))

    def watch(self, w: _Worker, slot: int) -> None:
        mask = select.POLLIN | (select.POLLOUT if w.outbuf else 0)
        if w.fd in self.watched:
            self.poller.modify(w.fd, mask)
        else:
            self.poller.register(w.fd, mask)
            self.watched[w.fd] = slot

    def feed(self, slot: int) -> None:
        pool, pending = self.pool, self.pending
        w = pool._workers[slot]
        if w is not None and (w.proc.poll() is not None or w.tasks >= pool.max_tasks):
            self.retire(slot, kill=False)  # died while idle, or due for replacement
            w = None
        if w is None:
            w = pool._workers[slot] = pool._spawn()
        # Guided self-scheduling: batches amortise round trips but shrink as the queue drains, so
        # that a few slow programs at the end do not queue up behind each other on one zygote.
        batch = max(1, min(pool.max_batch, len(pending) // (2 * pool.size)))
        jobs = [pending.popleft() for _ in range(batch)]
        w.jobs.extend(jobs)
        w.acked = False
        w.send({"jobs": [[i, self.programs[i]] for i in jobs], **self.job})
        if w.ready:
            w.deadline = time.monotonic() + self.budget
        self.watch(w, slot)

    def handle(self, w: _Worker, msg) -> bool | str:
        """Apply one message from a zygote; False if it breaks the protocol (the zygote is then
        killed), "requeue" if it asks to be replaced."""
        now = time.monotonic()
        if not isinstance(msg, dict):
            return False
        if "hello" in msg and not w.ready:
            w.ready, w.deadline = True, now + self.budget
            self.pool.protections = [str(p) for p in msg.get("prot", [])]
            return True
        if w.ready and "batch" in msg and not w.acked:
            w.acked = msg["batch"] == len(w.jobs)
            return w.acked
        if not w.ready or not w.acked or not w.jobs or msg.get("i") != w.jobs[0]:
            return False  # results come strictly in the order the jobs were sent
        if "requeue" in msg:
            return "requeue"
        if msg.get("ev") == "import":
            w.deadline = now + _IMPORT_S
        elif msg.get("ev") == "start":
            w.deadline = now + self.budget
        elif "r" in msg:
            value, reason = msg.get("v"), msg["r"]
            if isinstance(value, bool):
                value = int(value)
            if not (value is None or isinstance(value, (int, float, str))) or not isinstance(reason, str):
                return False
            self.results[w.jobs.popleft()] = ExecResult(value, reason[:1000])
            w.tasks += 1
            w.deadline = now + self.budget
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
