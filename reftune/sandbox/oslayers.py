"""OS-level layers of the sandbox (Linux): what the zygote sets up once and each forked child applies.

Standard library only (ctypes for the system calls Python does not wrap); never imports reftune.
Each layer is best effort: `setup_zygote()` returns the names of those the kernel accepted, a probe
child tells which of the per-child ones work here, and a child that cannot apply all of those exits
without running its program. What each layer needs and what happens without it is in `executor.py`.
"""

import ctypes
import os
import resource
import signal
import struct
import sys

# ------------------------------------------------------------------------------------------ seccomp
# System calls a forked child may make after its filter is installed: what CPython (3.10-3.13), its
# allocator, threads and the allowed modules use while running a program, found with strace over the
# test programs. Everything else fails with EPERM -- sockets of every family, io_uring, bpf, ptrace,
# process_vm_*, pidfd_*, mount and namespace calls, keyctl, userfaultfd, perf_event_open, SysV IPC,
# ioctl, prctl, setsid/setpgid, chmod/chown, links, execve, fork. Names: x86_64 and aarch64 numbers;
# None where that architecture has no such call.
_NR = {
    "read": (0, 63), "write": (1, 64), "readv": (19, 65), "writev": (20, 66), "pread64": (17, 67),
    "pwrite64": (18, 68), "close": (3, 57), "lseek": (8, 62), "fstat": (5, 80), "newfstatat": (262, 79),
    "stat": (4, None), "lstat": (6, None), "statx": (332, 291), "openat": (257, 56), "open": (2, None),
    "getdents64": (217, 61), "getcwd": (79, 17), "readlink": (89, None), "readlinkat": (267, 78),
    "access": (21, None), "faccessat": (269, 48), "faccessat2": (439, 439), "dup": (32, 23),
    "dup2": (33, None), "dup3": (292, 24), "mmap": (9, 222), "munmap": (11, 215), "mprotect": (10, 226),
    "mremap": (25, 216), "brk": (12, 214), "madvise": (28, 233), "rt_sigaction": (13, 134),
    "rt_sigprocmask": (14, 135), "rt_sigreturn": (15, 139), "sigaltstack": (131, 132), "futex": (202, 98),
    "set_robust_list": (273, 99), "rseq": (334, 293), "gettid": (186, 178), "getpid": (39, 172),
    "getppid": (110, 173), "getuid": (102, 174), "geteuid": (107, 175), "getgid": (104, 176),
    "getegid": (108, 177), "getrandom": (318, 278), "clock_gettime": (228, 113), "clock_getres": (229, 114),
    "clock_nanosleep": (230, 115), "nanosleep": (35, 101), "gettimeofday": (96, 169), "time": (201, None),
    "sched_yield": (24, 124), "sched_getaffinity": (204, 123), "exit": (60, 93), "exit_group": (231, 94),
    "unlink": (87, None), "unlinkat": (263, 35), "mkdir": (83, None), "mkdirat": (258, 34),
    "rmdir": (84, None), "rename": (82, None), "renameat": (264, 38), "renameat2": (316, 276),
    "ftruncate": (77, 46), "fsync": (74, 82), "fdatasync": (75, 83), "poll": (7, None), "ppoll": (271, 73),
    "select": (23, None), "pselect6": (270, 72), "getrusage": (98, 165), "times": (100, 153),
    "uname": (63, 160), "getrlimit": (97, 163), "restart_syscall": (219, 128),
}  # fmt: skip
# Allowed only with some arguments (see seccomp_filter), or answered specially.
_NR_CHECKED = {"clone": (56, 220), "clone3": (435, 435), "prlimit64": (302, 261), "fcntl": (72, 25)}
_AUDIT_ARCH = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}  # (seccomp_data.arch, column)
_CLONE_THREAD = 0x00010000
_CLONE_NAMESPACES = 0x7E020080  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
_FCNTL_OK = (0, 1, 2, 3, 4, 1030)  # F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC (no F_SETOWN)
_RET_ALLOW, _RET_EPERM, _RET_ENOSYS = 0x7FFF0000, 0x00050001, 0x00050026
_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # classic BPF: A = data[k]; jumps; return
_ALLOW, _EPERM = (_RET, 0, 0, _RET_ALLOW), (_RET, 0, 0, _RET_EPERM)


def _arg(i, high=False):
    """Offset of syscall argument i (its low or high 32 bits, little-endian) in struct seccomp_data."""
    return 16 + 8 * i + (4 if high else 0)


# What to do with a checked call; each body ends in a return. A holds the syscall number on entry.
_CHECKS = {
    # Threads only: CLONE_THREAD and no new namespace. Processes (fork, vfork, clone without
    # CLONE_THREAD) get EPERM, so a program cannot leave anything running after it is killed.
    "clone": [(_LD, 0, 0, _arg(0)), (_JSET, 0, 1, _CLONE_NAMESPACES), _EPERM, (_JSET, 0, 1, _CLONE_THREAD),
              _ALLOW, _EPERM],
    "clone3": [(_RET, 0, 0, _RET_ENOSYS)],  # libc then falls back to clone, whose flags a filter can read
    # getrlimit() through prlimit64 with a NULL new limit only: a program cannot change its limits.
    "prlimit64": [(_LD, 0, 0, _arg(2)), (_JEQ, 0, 3, 0), (_LD, 0, 0, _arg(2, True)), (_JEQ, 0, 1, 0), _ALLOW,
                  _EPERM],
    # No F_SETOWN/F_SETSIG (SIGIO to another process), leases, locks or notifications.
    "fcntl": [(_LD, 0, 0, _arg(1))] + [i for cmd in _FCNTL_OK for i in ((_JEQ, 0, 1, cmd), _ALLOW)] + [_EPERM],
}  # fmt: skip


def _decide(leaves):
    """A binary decision tree over sorted (nr, body) pairs: ~log2(n) comparisons per call, so that
    installing the filter (the kernel pre-computes its verdict for every syscall number) stays cheap."""
    if len(leaves) <= 3:
        code = []
        for nr, body in leaves:
            code += [(_JEQ, 0, len(body), nr)] + body
        return code + [_EPERM]
    mid = len(leaves) // 2
    low, high = _decide(leaves[:mid]), _decide(leaves[mid:])
    return [(_JGE, len(low), 0, leaves[mid][0])] + low + high  # nr >= pivot: skip the low half


def seccomp_filter():
    """The children's filter (a classic BPF program, as bytes); None on other architectures.

    An allow-list: the calls in _NR, those in _CHECKS with the arguments they allow, EPERM for
    everything else -- including signals to any process (kill/tgkill/tkill), a call that did not
    exist when this list was written, and the x32 ABI on x86_64."""
    machine = os.uname().machine
    if machine not in _AUDIT_ARCH:
        return None
    arch, col = _AUDIT_ARCH[machine]
    leaves = {nums[col]: [_ALLOW] for nums in _NR.values() if nums[col] is not None}
    leaves.update({_NR_CHECKED[name][col]: body for name, body in _CHECKS.items()})
    prog = [(_LD, 0, 0, 4), (_JEQ, 1, 0, arch), _EPERM, (_LD, 0, 0, 0)]  # wrong arch; then A = nr
    if machine == "x86_64":
        prog += [(_JGE, 0, 1, 0x40000000), _EPERM]
    prog += _decide(sorted(leaves.items()))
    if any(jt > 255 or jf > 255 for _, jt, jf, _ in prog):  # 8-bit offsets in classic BPF
        raise ValueError("seccomp filter: jump out of range")
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


# ----------------------------------------------------------------------------------------- Landlock
_LL_EXECUTE, _LL_WRITE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_REMOVE_DIR, _LL_REMOVE_FILE, _LL_MAKE_DIR, _LL_MAKE_REG = 1 << 4, 1 << 5, 1 << 7, 1 << 8
_LL_REFER, _LL_TRUNCATE = 1 << 13, 1 << 14


def landlock_ruleset(read_paths, rw_path):
    """A Landlock ruleset fd (kept by the zygote, applied by each child) and the layer names it gives.

    Read-only: `read_paths` (the Python install and system libraries); in `rw_path` (the temp dir):
    read, write, create and remove regular files and folders (no fifos, sockets, devices, links);
    nothing else anywhere, and never EXECUTE. No paths at all: no file access whatsoever. ABI >= 4:
    no TCP bind/connect; ABI >= 6: no signals to, or abstract Unix sockets of, processes outside."""
    lib = libc()
    abi = lib.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        raise OSError("Landlock is not available")
    fs_all = (1 << {1: 13, 2: 14}.get(abi, 15 if abi < 5 else 16)) - 1  # every right this ABI knows
    attr = struct.pack("=QQQ", fs_all, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    attr = attr[: 8 if abi < 4 else 16 if abi < 6 else 24]
    fd = lib.syscall(444, attr, len(attr), 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    rw = _LL_WRITE | _LL_READ_FILE | _LL_READ_DIR | _LL_REMOVE_DIR | _LL_REMOVE_FILE | _LL_MAKE_DIR | _LL_MAKE_REG
    rw |= (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0)  # REFER: rename across folders
    for path, access in [(p, _LL_READ_FILE | _LL_READ_DIR) for p in read_paths] + [(rw_path, rw)] * bool(rw_path):
        try:
            target = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # a path that does not exist here
        if not os.path.isdir(path):  # a file takes file rights only
            access &= _LL_WRITE | _LL_READ_FILE | _LL_TRUNCATE
        lib.syscall(445, fd, 1, struct.pack("=Qi", access, target), 0)  # landlock_add_rule(PATH_BENEATH)
        os.close(target)
    return fd, ["landlock-fs"] + ["landlock-tcp"] * (abi >= 4) + ["landlock-signals"] * (abi >= 6)


# ---------------------------------------------------------------------------------------- the rest
_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


_CAPSET = {"x86_64": (125, 126), "aarch64": (90, 91)}  # capget, capset


def _caps(get):
    """capget() -> True if any capability is permitted; capset() -> drop them all (True on success)."""
    nums = _CAPSET.get(os.uname().machine)
    if nums is None:
        return False
    header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0))  # _LINUX_CAPABILITY_VERSION_3
    data = ctypes.create_string_buffer(24)  # two {effective, permitted, inheritable}, zeroed
    if get:
        return libc().syscall(nums[0], header, data) == 0 and any(struct.unpack("=6I", data.raw)[1::3])
    return libc().syscall(nums[1], header, data) == 0


_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
TMPFS_MB = 8  # the temp folder's total size (files and folders) when it is a private tmpfs
TMPFS_INODES = 1024  # and its number of files and folders


def private_tmpfs(path):
    """Mount a size-capped tmpfs over `path` in a mount namespace of this process's own (root, or
    inside the user namespace made for the network one): what the children write there is RAM,
    bounded by the kernel, and it disappears with the last process of the namespace. True if done."""
    lib = libc()
    if lib.unshare(_CLONE_NEWNS) != 0 or lib.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return False
    options = f"size={TMPFS_MB}m,nr_inodes={TMPFS_INODES},mode=0700".encode()
    return lib.mount(b"tmpfs", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, options) == 0


def setup_zygote(tmpdir, tmpfs=True):
    """Once, in the zygote before it imports anything for programs; returns the layer names in force.
    `tmpfs`: try to make the temp folder a private size-capped tmpfs (False: a plain folder).

    The zygote runs no program code: it keeps the privileges it needs to fork, kill and clean up, and
    prepares what each child applies to itself (ChildLayers)."""
    done, lib = [], libc()
    # Private network namespace (no usable interface): root directly, others via a user namespace.
    if lib.unshare(_CLONE_NEWNET) == 0 or lib.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        done.append("netns")
    if tmpfs and private_tmpfs(tmpdir):  # before Landlock's rules, which open the folder by its path
        done.append("tmpfs")
    for name, value in {"FSIZE": 1 << 20, "CORE": 0, "NOFILE": 64}.items():
        try:
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))
            done.append(f"rlimit-{name.lower()}")
        except (ValueError, OSError):
            pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes fail (EFBIG) instead of killing
    lib.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: /proc/<pid>/{mem,fd,environ} closed to uncapable peers
    if _caps(get=True) and _caps(get=False):  # root: children then have no CAP_SYS_PTRACE, DAC_OVERRIDE...
        done.append("caps-dropped")
    layers = ChildLayers()
    if lib.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS, which Landlock and seccomp require
        read_paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *filter(os.path.isdir, sys.path),
                      "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache"}  # fmt: skip
        try:
            layers.landlock_fd, names = landlock_ruleset(sorted(read_paths), tmpdir)
            layers.sealed_fd, _ = landlock_ruleset((), None)  # for the shared child: no files at all
            layers.names += names
        except OSError:
            pass
        bpf = seccomp_filter()
        if bpf is not None:  # built once: a child only passes it to the kernel
            layers.seccomp_buf = ctypes.create_string_buffer(bpf, len(bpf))
            layers.seccomp = struct.pack("=HxxxxxxQ", len(bpf) // 8, ctypes.addressof(layers.seccomp_buf))
            layers.names.append("seccomp")
    return done, layers


class ChildLayers:
    """What a forked child applies to itself, in this order, before it parses its program."""

    def __init__(self):
        self.null_fd = os.open(os.devnull, os.O_RDWR)  # opened now: Landlock hides /dev/null from children
        self.landlock_fd = self.sealed_fd = -1
        self.seccomp = None  # a prepared sock_fprog, filled by setup_zygote
        self.names = ["rlimit-as", "rlimit-cpu"] + ["rlimit-nproc"] * (os.geteuid() != 0)  # root ignores NPROC

    def apply(self, keep, address_space, cpu_seconds, sealed=False):
        """In the child: limits, Landlock (`sealed`: no file access at all, for the shared child of
        pure programs, which need none), fds (all closed but `keep`), seccomp. Returns the names of
        the layers applied."""
        done, lib = [], libc()
        limits = {"AS": address_space, "CPU": int(cpu_seconds) + 1, "NPROC": 0}
        for name, value in limits.items():
            try:
                resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))
                done.append(f"rlimit-{name.lower()}")
            except (ValueError, OSError):
                pass
        if os.geteuid() == 0 and "rlimit-nproc" in done:
            done.remove("rlimit-nproc")
        ruleset = self.sealed_fd if sealed else self.landlock_fd
        if ruleset >= 0 and lib.syscall(446, ruleset, 0) == 0:  # landlock_restrict_self
            done += [n for n in self.names if n.startswith("landlock")]
        # Nothing of the zygote stays reachable: its socket to the parent, stderr, the ruleset.
        for fd in (0, 1, 2):
            os.dup2(self.null_fd, fd)
        low = 3
        for fd in sorted(keep) + [max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0])]:
            os.closerange(low, fd)
            low = fd + 1
        if self.seccomp is not None and lib.prctl(22, 2, self.seccomp, 0, 0) == 0:  # PR_SET_SECCOMP, FILTER
            done.append("seccomp")
        return done


def address_space():
    """This process's mapped address space in bytes (what RLIMIT_AS counts)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def child_start(zygote_pid):
    """First thing in a forked child: die with the zygote, own process group (killed as a whole)."""
    libc().prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != zygote_pid:  # the zygote died before the line above
        os._exit(1)
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
