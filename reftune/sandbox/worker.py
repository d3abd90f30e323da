"""Zygote worker of :mod:`reftune.sandbox` (the threat model is in ``executor.py``'s docstring).

Started by the parent as ``python -s -B worker.py CONFIG_JSON`` with a scrubbed environment, in a new
session, with one end of a Unix socketpair as fd CONFIG["fd"]. Standard library only: it never
imports ``reftune`` (whose ``__init__`` may pull in torch); its siblings (policy, rules, pure, apis,
harden, errors, oslayers, folders) are loaded as a private package ``_reftune_sandbox`` from this folder.

The zygote imports the allowed modules once and runs no program code. A program of at most
_ZYGOTE_COMPILE_MAX characters is parsed, checked and compiled by the zygote (which runs none of
it), while the pure program before it runs in the shared child if there is one; a longer one by the
child that runs it, where its timeout can cut a slow compile off. Either way the compile is charged
to its own program: the time it took comes off that program's timeout, it never delays another's
verdict by more than milliseconds, and its warnings go nowhere. A program
that is not pure runs in a fresh fork that applies the per-program OS layers to itself, runs the
program and writes one result frame to a pipe of its own. The zygote reads that pipe only, kills
the child's process group, waits for it, empties the temp folder and reports to the parent. A child
therefore cannot change what a later program sees (it dies with everything it touched) nor write
anything the parent would take as another program's result; before each forked program the
zygote checks that the temp folder is empty (if it cannot make it so, it asks the parent to rerun
its programs elsewhere and leaves).
Pure programs (``pure.py``: plain computations that can reach nothing that outlives them) instead
run one after another in one shared, equally locked-down child with no file access, which serves
one call of the parent's at most (a fresh one is forked while the zygote is idle). Each gets its
own namespace and its own copy of the builtins, and after each the child checks that the math and
cmath views and the import table are still the objects it started with; any doubt there (a change
there, a timeout, a crash, MemoryError, an object address in the result) ends that child, and the
program is rerun in a fresh fork unless it timed out.

Protocol with the parent (4-byte big-endian length + UTF-8 JSON, both ways):
  parent -> zygote  {"jobs": [[index, program], ...], "timeout": s, "memory_mb": n, "entry": "solution",
                     "call": number of the parent's run() call}
  zygote -> parent  {"hello": pid, "prot": [...]} once; {"batch": n} when a batch arrived; per job, in order:
                    {"i": index, "ev": "import"} / {"i": index, "ev": "start"} around slow imports,
                    {"i": index, "v": value, "r": reason} when it is done;
                    {"i": index, "requeue": why} before it leaves without running it (its temp folder
                    could not be emptied): the parent reruns the batch's remaining programs elsewhere.
zygote -> shared child: (code, entry), marshalled; shared child -> zygote: one frame per program,
                    {"v", "r"} plus "retry" (unsure: rerun it in a fork, and end this child) and
                    "grown" (end this child after it).
child -> zygote: one frame {"v": value, "r": reason} per program on the child's own pipe.
On EOF from the parent, SIGTERM/SIGHUP, or when the parent process is gone, the zygote kills its
children and removes its temp folder before it exits. Once it said hello its stderr is /dev/null:
the parent reads that pipe only for start-up errors, and nothing must ever block on it.
"""

import sys

if __name__ == "__main__" and not getattr(sys.flags, "safe_path", False):
    del sys.path[0]  # the script's folder must not shadow stdlib modules

import gc
import json
import marshal
import os
import resource
import select
import signal
import struct
import time
import types
import warnings

_HEADER = struct.Struct(">I")
_MAX_CHILD_FRAME = 256 << 10  # a result is at most 10k characters; more means a misbehaving child
_CHILD_LAYERS_MISSING = 70  # exit status of a child that could not apply every layer
_SHARED_TASKS = 500  # pure programs per shared child before a fresh one takes over
_SHARED_GROWTH = 64 << 10  # KiB of peak RSS growth after which the shared child is replaced
_SHARED_MAX_CODE = 32 << 10  # bigger compiled programs run in a fork of their own (pipe stays unblocked)
_MAX_PROGRAM = 1 << 20  # characters
# Compiled by the zygote up to this size (see the module doc): ~40 ms at worst (nested lambdas).
_ZYGOTE_COMPILE_MAX = 4 << 10
_TMP_POLL_S = 0.02  # without a private tmpfs: how often the temp folder's size is checked
_TMP_MAX_BYTES = 8 << 20  # ... and its bounds then (a private tmpfs has the same ones, see oslayers)
_TMP_MAX_ENTRIES = 1024
_IDLE_MS = 5  # no batch this long after one: the parent's call is likely over
_PROCESS_TOOLS = (
    "fork forkpty system popen execv execve execl execle execlp execlpe execvp execvpe spawnv spawnve "
    "spawnvp spawnvpe spawnl spawnle spawnlp spawnlpe posix_spawn posix_spawnp kill killpg putenv "
    "unsetenv register_at_fork"
).split()


def _load_siblings():
    """The sibling files as the package `_reftune_sandbox` (relative imports work; reftune and
    sys.path are left alone)."""
    if "_reftune_sandbox" not in sys.modules:
        package = types.ModuleType("_reftune_sandbox")
        package.__path__ = [os.path.dirname(os.path.abspath(__file__))]
        sys.modules[package.__name__] = package
    from _reftune_sandbox import apis, folders, harden, oslayers, policy

    return apis, folders, harden, oslayers, policy


def encode(obj):
    data = json.dumps(obj).encode()
    return _HEADER.pack(len(data)) + data


def write_all(fd, data):
    while data:
        data = data[os.write(fd, data) :]


def read_frame(fd):
    """One length-prefixed frame from a trusted blocking pipe (the shared child's job pipe)."""
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + _HEADER.unpack_from(buf)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        buf += chunk
    return buf[4:]


class ParentGone(Exception):
    pass


class Unfit(Exception):
    """This zygote cannot serve another program (its temp folder would not empty)."""


class _Shared:
    """The zygote's handle of the shared child that runs pure programs."""

    def __init__(self, pid, jobs, results, key):
        self.pid, self.jobs, self.results, self.key, self.tasks = pid, jobs, results, key, 0


class Zygote:
    def __init__(self, config):
        self.apis, self.folders, self.harden, self.oslayers, self.policy_mod = _load_siblings()
        self.sock = config["fd"]
        self.tmpdir = config["tmpdir"]
        self.os_only = bool(config.get("os_layers_only"))
        self.share_pure = bool(config.get("share_pure", True)) and not self.os_only
        self.pid, self.ppid = os.getpid(), os.getppid()
        self.child = None  # pid of the running forked child
        self.shared = None  # the shared child for pure programs, when one is running
        self.call = None  # the parent's call the shared child serves
        self.last_key = None  # (timeout, memory_mb) of the latest shared child
        self.memory_frame = encode({"v": None, "r": "memory"})  # pre-built: no allocation needed to send it
        self.prot, self.layers = self.oslayers.setup_zygote(self.tmpdir, tmpfs=config.get("tmpfs", True))
        self.tmpfs = "tmpfs" in self.prot
        os.chdir(self.tmpdir)  # after the mount: the children's working folder is the private tmpfs
        self.policy = self.policy_mod.Policy(config["modules"])
        for name in sorted(set(config["modules"]) - self.apis.LAZY_MODULES):
            try:
                self.policy.load(name)
            except ImportError:
                pass
        self._warm_stdlib()
        self._freeze()
        self.expected = self._probe()
        self.prot += ["fork-per-program"] + sorted(self.expected, key=self.layers.names.index)

    # ------------------------------------------------------------------------------- preparation

    def _warm_stdlib(self):
        """Trigger the imports and caches that allowed functions fill on first use, here rather than
        in every child (a child pays for what it imports, and the result must not depend on it)."""
        import datetime
        import decimal
        import fractions
        import statistics

        time.strptime("2024", "%Y")
        datetime.datetime.strptime("2024", "%Y")
        statistics.mean([fractions.Fraction(1, 2), 1]), statistics.stdev([1.0, 2.0])
        decimal.Decimal(1) / 7

    def _load_lazy(self, name):
        """Import a LAZY module (sympy) in the zygote, close its evaluators, then make its views (so
        that no view holds an unhardened function) and warm it up."""
        if name == "sympy":
            import sympy

            self.harden.harden_sympy(sympy)
        self.policy.load(name)
        if name == "sympy":
            x = sympy.Symbol("x")  # what programs hit first: solve, the parser, simplify, evalf
            sympy.solve(sympy.Eq(2 * x, sympy.sympify("7")), x), sympy.simplify(sympy.sin(x) ** 2 + 1)
            sympy.nsimplify(0.5), sympy.N(sympy.pi), sympy.factorint(12), sympy.Rational(1, 3) + 1
        self._freeze()

    def _freeze(self):
        gc.collect()
        gc.freeze()  # children's collections skip the zygote's objects (no copy-on-write of their pages)
        self.base_size = self.oslayers.address_space()

    def _probe(self):
        """Fork a child that only applies the per-program layers: those it could apply are required of
        every later child (one that cannot apply them all exits before it runs its program)."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                self.oslayers.child_start(self.pid)
                write_all(w, encode(self.layers.apply((w,), self.base_size + (64 << 20), 1.0)))
            finally:
                os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 1 << 16):
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        return set(json.loads(data[4:])) if len(data) > 4 else set()

    # ------------------------------------------------------------------------------------ serving

    def send(self, obj):
        write_all(self.sock, encode(obj))

    def serve(self):
        os.dup2(self.layers.null_fd, 2)  # from now on nobody reads our stderr: it must never fill
        self.send({"hello": self.pid, "prot": self.prot})
        buf = bytearray()
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        just_served = False
        while True:
            # Wake up now and then: a parent that died while a fork of it still holds the socket.
            if not poller.poll(_IDLE_MS if just_served else 1000):
                if just_served:  # the call is probably over: get a fresh shared child ready off its clock
                    self._renew_shared()
                just_served = False
                if os.getppid() != self.ppid:
                    return
                continue
            chunk = os.read(self.sock, 1 << 20)
            if not chunk:
                return  # the parent closed the socket or died
            buf += chunk
            while len(buf) >= 4 and len(buf) >= 4 + _HEADER.unpack_from(buf)[0]:
                size = _HEADER.unpack_from(buf)[0]
                msg = json.loads(buf[4 : 4 + size])
                del buf[: 4 + size]
                self.send({"batch": len(msg["jobs"])})  # received: a failure from now on is ours to report
                if self.shared is not None and self.shared.tasks and msg.get("call") != self.call:
                    self._drop_shared()  # a shared child serves one call of the parent's, never the next
                self.call = msg.get("call")
                self.run_batch(msg["jobs"], float(msg["timeout"]), int(msg["memory_mb"]), msg["entry"])
                just_served = True

    def run_batch(self, jobs, timeout, memory_mb, entry):
        """Run a batch in order. While a pure program runs in the shared child, the zygote compiles the
        next if it is short (see _ZYGOTE_COMPILE_MAX); that time is the next program's, taken from
        its timeout."""
        ahead = {}

        def compile_ahead(k):
            if k < len(jobs) and self._compiles_here(jobs[k][1]):
                ahead[k] = self._compile(jobs[k][1])

        for k, (index, program) in enumerate(jobs):
            try:
                value, reason = self.run_job(index, program, timeout, memory_mb, entry, ahead.pop(k, None),
                                             lambda: compile_ahead(k + 1))  # fmt: skip
            except Unfit as exc:
                self.send({"i": index, "requeue": str(exc)})
                raise
            self.send({"i": index, "v": value, "r": reason})

    def _compiles_here(self, program):
        return not self.os_only and len(program) <= _ZYGOTE_COMPILE_MAX

    def _compile(self, program):
        """(prepare()'s (code, reason, pure), the seconds it took)."""
        start = time.monotonic()
        return self.policy_mod.prepare(self.policy, program), time.monotonic() - start

    def run_job(self, index, program, timeout, memory_mb, entry, compiled=None, meanwhile=None):
        if len(program) > _MAX_PROGRAM:
            return None, "forbidden: a program of more than 1 MiB"
        lazy = [m for m in sorted(self.apis.LAZY_MODULES) if m in program and m in self.policy.allowed]
        if any(m not in self.policy.views for m in lazy):
            self.send({"i": index, "ev": "import"})  # the parent now allows a long import phase
            for name in lazy:
                try:
                    self._load_lazy(name)
                except Exception:  # not installed, or it would not harden: the program's import reports it
                    pass
            self.send({"i": index, "ev": "start"})
        start = time.monotonic()
        if compiled is None and self._compiles_here(program):
            compiled = self._compile(program)[0], 0.0  # on its own clock already: counted from `start`
        if compiled is None:  # a long program: its child compiles it
            return self._run_forked(None, program, entry, start + timeout, timeout, memory_mb)
        (code, reason, pure), spent = compiled
        deadline = start + timeout - spent
        if code is None:
            return None, reason  # refused, or not Python: nothing to run
        if pure and self.share_pure:
            job = marshal.dumps((code, entry))
            if len(job) <= _SHARED_MAX_CODE:
                result = self._run_shared(job, deadline, timeout, memory_mb, meanwhile)
                if result is not None:
                    return result
                # The shared child could not vouch for it (a crash, MemoryError in a fuller heap):
                # our doubt, not the program's fault, so a fresh fork with a fresh timeout.
                self.send({"i": index, "ev": "start"})
                deadline = time.monotonic() + timeout
        return self._run_forked(code, program, entry, deadline, timeout, memory_mb)

    def _run_forked(self, code, program, entry, deadline, timeout, memory_mb):
        """Run a program in a fork of its own; `code`: compiled already, or None (the child compiles).
        Nothing else runs in the zygote meanwhile: what it wrote while a fresh child shares its pages
        would be copied, page by page (~0.2 ms a program)."""
        if time.monotonic() >= deadline:
            return None, "timeout"  # its compile (or a try in the shared child) took its time
        self._ready_tmpdir()
        # Memory for the program on top of what the interpreter maps: the limit must not depend on
        # what this zygote imported for earlier programs.
        limit = self.base_size + (memory_mb << 20)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            self._child(w, code, program, entry, limit, max(0.0, deadline - time.monotonic()))  # never returns
        del code
        self.child = pid
        os.close(w)
        try:
            os.setpgid(pid, pid)  # also done by the child: whichever runs first
        except OSError:
            pass
        try:
            frame, ended = self._read_result(r, deadline, watch_tmp=not self.tmpfs)
        finally:
            os.close(r)
            self.child = None
            status = self._reap(pid)
        if not self.folders.is_empty(self.tmpdir):  # (one scandir when it is, the common case)
            self.folders.empty_folder(self.tmpdir)
        if frame is not None:
            return self._check_frame(frame)[:2]
        if ended is not None:
            return None, ended
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
            return None, "timeout"
        return None, "crashed"

    def _ready_tmpdir(self):
        """The temp folder must be empty when a program starts: a leftover would be another
        program's (or the folder escaped our clean-up); one we cannot remove makes us unfit."""
        if not self.folders.is_empty(self.tmpdir) and not self.folders.empty_folder(self.tmpdir):
            raise Unfit("temp folder not empty")

    def _run_shared(self, job, deadline, timeout, memory_mb, meanwhile=None):
        """A pure program (marshalled code, entry) in the shared child; None when it must be rerun in
        a fork of its own. `meanwhile()` runs in the zygote while the child computes."""
        shared = self._shared_child((timeout, memory_mb))
        if select.select([shared.results], [], [], 0)[0]:  # it wrote while it had no job: misbehaving
            self._drop_shared()
            return None
        try:
            write_all(shared.jobs, _HEADER.pack(len(job)) + job)
        except OSError:  # it died while idle
            self._drop_shared()
            return None
        if meanwhile is not None:
            meanwhile()  # short (a compile of at most _ZYGOTE_COMPILE_MAX characters); a frame that
            # arrives meanwhile is read below whatever the clock says: this program is not charged
        frame, ended = self._read_result(shared.results, deadline, exact=True)
        shared.tasks += 1
        if frame is None:
            self._drop_shared()
            return (None, "timeout") if ended == "timeout" else None  # a crash: rerun it in a fresh process
        value, reason, msg = self._check_frame(frame)
        if not msg or msg.get("retry") or msg.get("grown") or shared.tasks >= _SHARED_TASKS:
            self._drop_shared()
        return None if not msg or msg.get("retry") else (value, reason)  # malformed or unsure: a fresh fork

    def _shared_child(self, key):
        self.last_key = key
        if self.shared is not None and self.shared.key != key:
            self._drop_shared()
        if self.shared is None:
            job_r, job_w = os.pipe()
            res_r, res_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                self._shared_loop(job_r, res_w, self.base_size + (key[1] << 20), key[0] * _SHARED_TASKS)
            os.close(job_r)
            os.close(res_w)
            try:
                os.setpgid(pid, pid)
            except OSError:
                pass
            self.shared = _Shared(pid, job_w, res_r, key)
        return self.shared

    def _renew_shared(self):
        """Replace a shared child that ran programs by one that has run none (it may serve any call)."""
        key = self.shared.key if self.shared is not None else self.last_key
        if self.shared is not None and self.shared.tasks:
            self._drop_shared()
        if self.shared is None and key is not None and self.share_pure:
            self._shared_child(key)

    def _drop_shared(self):
        shared, self.shared = self.shared, None
        os.close(shared.jobs)
        os.close(shared.results)
        self._reap(shared.pid)

    def _read_result(self, r, deadline, exact=False, watch_tmp=False):
        """The child's frame (bytes) or None, and why it ended without one ("timeout", "temp folder
        too large", or None: it exited or closed its pipe). `exact`: bytes after the frame make it
        malformed (the shared child's pipe carries one frame per job). `watch_tmp`: without a private
        tmpfs, the temp folder's size is checked every _TMP_POLL_S."""
        poller = select.poll()
        poller.register(r, select.POLLIN)
        poller.register(self.sock, 0)  # hang-up only: the parent sends nothing while a batch runs
        buf = b""
        while True:
            left = max(0.0, deadline - time.monotonic())
            events = poller.poll(min(left, _TMP_POLL_S if watch_tmp else left) * 1000)
            if not events:
                if left == 0:
                    return None, "timeout"  # (a frame already waiting was read first: poll saw it)
                if watch_tmp and not self.folders.usage(self.tmpdir, _TMP_MAX_BYTES, _TMP_MAX_ENTRIES):
                    return None, "temp folder too large"
                continue
            for fd, _ in events:
                if fd == self.sock:
                    raise ParentGone()
                chunk = os.read(r, 1 << 16)
                buf += chunk
                if len(buf) >= 4:
                    size = _HEADER.unpack_from(buf)[0]
                    if size > _MAX_CHILD_FRAME or len(buf) > 4 + _MAX_CHILD_FRAME:
                        return b"", None  # malformed: an error for this program only
                    if len(buf) >= 4 + size:
                        return (b"" if exact and len(buf) > 4 + size else buf[4 : 4 + size]), None
                if not chunk:
                    return None, None  # it exited (or closed its pipe) without a whole frame

    def _check_frame(self, frame):
        """A child's frame is untrusted: only a well-formed (value, reason) passes, re-encoded by us.
        Returns (value, reason, the decoded message)."""
        try:
            msg = json.loads(frame)
            value, reason = msg["v"], msg["r"]
        except (ValueError, TypeError, KeyError):
            return None, "crashed", {}
        if isinstance(value, bool):
            value = int(value)
        short = isinstance(value, str) and len(value) <= self.policy_mod.MAX_STR
        ok_value = value is None or isinstance(value, (int, float)) or short
        if not ok_value or not isinstance(reason, str) or len(reason) > 1000:
            return None, "crashed", {}
        return value, reason, msg

    def _reap(self, pid):
        """Kill a child's process group (threads, and any process it managed to start) and wait."""
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return os.waitpid(pid, 0)[1]

    # ---------------------------------------------------------------------------- in the children

    def _lock_down(self, keep, limit, cpu_seconds, sealed=False):
        """First thing in a child: the OS layers, all of those the probe could apply, or exit; then
        the compile guard (programs never get the real builtins there)."""
        self.oslayers.child_start(self.pid)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # the zygote's handlers are not ours
            signal.signal(sig, signal.SIG_DFL)
        if set(self.layers.apply(keep, limit, cpu_seconds, sealed)) != self.expected:
            os._exit(_CHILD_LAYERS_MISSING)
        # Last line for code that reaches the real os module anyway: no process tools in it.
        for name in _PROCESS_TOOLS:
            vars(os).pop(name, None)
            vars(sys.modules["posix"]).pop(name, None)
        self.policy_mod.reset_stdio()
        if not self.os_only:
            self.policy_mod.install_compile_guard()

    def _child(self, w, code, program, entry, limit, timeout):
        """A forked child for one program: layers, the program, one frame out; never returns."""
        try:
            self._lock_down((w,), limit, timeout)
            if "random" in sys.modules:
                sys.modules["random"].seed(0)  # fork reseeded it from the OS; programs get seed 0
            if self.os_only:
                value, reason = self.policy_mod.run_unchecked(program, entry)
            else:
                if code is None:
                    code, reason, _ = self.policy_mod.prepare(self.policy, program)
                value = None
                if code is not None:
                    value, reason = self.policy_mod.run(self.policy, code, program, entry)
            data = encode({"v": value, "r": reason})
        except MemoryError:
            data = self.memory_frame
        except BaseException:
            os._exit(1)
        try:
            write_all(w, data)
        finally:
            os._exit(0)

    def _shared_loop(self, jobs, results, limit, cpu_seconds):
        """The shared child: pure programs, one frame each, until the zygote closes the job pipe."""
        policy, mod = self.policy, self.policy_mod
        try:
            self._lock_down((jobs, results), limit, cpu_seconds, sealed=True)  # pure programs need no files
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = policy.snapshot()
            while (job := read_frame(jobs)) is not None:
                code, entry = marshal.loads(job)  # written by the zygote
                value, reason, retry = mod.run_pure(policy, code, entry)
                changed = policy.snapshot() != start  # nothing should: then trust nothing of this child
                grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base > _SHARED_GROWTH
                write_all(results, encode({"v": value, "r": reason, "retry": retry or changed, "grown": grown}))
        except MemoryError:
            write_all(results, encode({"v": None, "r": "memory", "retry": True}))
        finally:
            os._exit(0)

    def close(self):
        if self.child is not None:
            self._reap(self.child)
        if self.shared is not None:
            self._drop_shared()
        self.folders.remove_folder(self.tmpdir)  # a private tmpfs stays a mount point: the janitor's


def _leave(signum, frame):
    raise SystemExit(0)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def start_janitor(tmpdir, folders):
    """A process outside the zygote's namespaces (forked before they are made: the zygote cannot
    unmount its private tmpfs) that removes the temp folder if it outlives the zygote, its children
    and the parent (a live parent removes it itself, in `close()`). Returns the pipe end the zygote
    keeps open (its children close theirs)."""
    parent = os.getppid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()  # out of the zygote's session and process group
            if os.fork() == 0:  # a grandchild: reparented at once, never one of the zygote's children
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):  # nothing of the zygote's: not its stderr pipe, nor its socket
                    os.dup2(null, fd)
                os.closerange(3, r)
                os.closerange(r + 1, 1 << 16)
                while os.read(r, 1 << 10):  # EOF: every holder of the other end exited
                    pass
                while _alive(parent) and os.path.lexists(tmpdir):  # (a live parent is removing it)
                    time.sleep(0.05)
                if not _alive(parent):
                    folders.remove_folder(tmpdir)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    os.close(r)
    return w


def main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which then closes us
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _leave)
    warnings.simplefilter("ignore")  # nothing of a program's (or a library's) may print here
    config = json.loads(sys.argv[1])
    os.mkdir(config["tmpdir"], 0o700)  # fails if the name is taken: then it is not ours to remove
    start_janitor(config["tmpdir"], _load_siblings()[1])
    zygote = None
    try:
        zygote = Zygote(config)
        zygote.serve()
    except (ParentGone, Unfit):
        pass
    finally:
        if zygote is not None:
            zygote.close()
        else:
            try:
                os.rmdir(config["tmpdir"])  # nothing ran: it is empty
            except OSError:
                pass


if __name__ == "__main__":
    main()
