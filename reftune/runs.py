"""Run folders on disk: claiming one (a lock), deciding what an earlier run left there, the metrics
log (JSONL, plus the trackers of reftune.trackers), atomic writes of files and checkpoint folders, and
the progress bar. No torch, no models.

The rules every command follows (docs/usage.md, "Mistakes and recovery"):
- a folder is claimed with a lock file (`.reftune.lock`, a POSIX record lock: the kernel drops it
  when the process dies, so a lock left by a killed run is stale by construction and taken over);
  a second command on a folder that is in use is refused;
- nothing is written into a folder before the command knows it will run (`RunFolder.begin`);
  a refused command removes the folder it created for its lock;
- every file is written atomically (temp file + rename) or appended line by line and repaired
  on read (a torn last line is dropped and reported with the file name);
- checkpoint folders are replaced by an atomic exchange where the OS has one (Linux
  renameat2), so `best/` is never missing; temporary copies a kill left (`.tmp-*`, `.old-*`)
  are removed, or put back, when the folder is next claimed.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from reftune.config import save_config

LOCK_NAME = ".reftune.lock"
TMP_PREFIX, OLD_PREFIX = ".tmp-", ".old-"


class RunFolderError(ValueError):
    """A run folder that cannot be used now (in use, not writable, holds other outputs)."""


def note(message: str) -> None:
    """One line for the user on stderr: what was repaired or decided on their behalf."""
    print(f"reftune: note: {message}", file=sys.stderr, flush=True)


def _finite(v):
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


# ---------------------------------------------------------------------------- atomic files

def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> None:
    """Write `path` via a temp file in the same folder and a rename: readers and kills see the
    old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_jsonl(path: str | Path, *, strict: bool = False, repair: bool = False) -> list[dict]:
    """Records of a JSONL file that is appended to. A torn last line (a kill while appending) is
    dropped and reported; with `repair` it is also cut from the file, so the next append starts
    on a clean line. A bad line elsewhere is an error with `strict` (a damaged file, not a torn
    write), otherwise dropped and reported too."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    records, good_bytes, torn = [], 0, bool(tail.strip())
    for number, line in enumerate(complete, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(complete) and not tail:
                torn = True  # an unreadable last line is torn too (garbage before the final newline)
                break
            if strict:
                raise ValueError(f"{path}: line {number} is not valid JSON; the file is damaged") from None
            note(f"{path}: line {number} is not valid JSON; dropped")
            good_bytes += len(line) + 1
            continue
        if record is not None and not isinstance(record, dict):
            if strict:
                raise ValueError(f"{path}: line {number} is not a JSON object; the file is damaged")
            note(f"{path}: line {number} is not a JSON object; dropped")
        elif record is not None:
            records.append(record)
        good_bytes += len(line) + 1
    if torn:
        note(f"{path}: dropped a torn last line (an interrupted write)")
    if repair and good_bytes != len(raw):
        with path.open("r+b") as f:  # one truncate: a kill cannot leave it half done
            f.truncate(good_bytes)
    return records


# ---------------------------------------------------------------------------- atomic folders

def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(new: Path, final: Path) -> None:
    """Put the complete folder `new` at `final`, replacing what is there. With an atomic exchange
    `final` is never missing; without one it is missing only between two renames, and a kill
    there leaves `.old-<name>-<pid>`, which the next claim of the folder puts back."""
    new, final = Path(new), Path(final)
    if not final.exists():
        new.rename(final)
        return
    if _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old copy
        return
    old = final.with_name(f"{OLD_PREFIX}{final.name}-{os.getpid()}")
    final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_save(save_fn, final_dir: str | Path) -> Path:
    """Write a checkpoint folder into a temporary sibling, then swap it into place.

    A kill while saving leaves at worst a stray `.tmp-*` folder (removed on the next claim);
    `final_dir` is either the old complete checkpoint or the new complete one, never a mix.
    """
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f"{TMP_PREFIX}{final_dir.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_fn(tmp)
    replace_dir(tmp, final_dir)
    return final_dir


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(run_dir: Path) -> list[str]:
    """Remove the temporary copies an interrupted write left under `run_dir` (`.tmp-*`), and put
    back an `.old-*` copy whose replacement never arrived. Folders that are run folders of their
    own (they hold a lock file) are left to their own claim. Returns what was done."""
    done = []
    for root, dirs, files in os.walk(run_dir):
        root_path = Path(root)
        if root_path != Path(run_dir) and (root_path / LOCK_NAME).exists():
            dirs[:] = []
            continue
        for name in list(dirs) + files:
            path = root_path / name
            if name.startswith(TMP_PREFIX):
                _remove(path)
                done.append(f"removed {path}")
            elif name.startswith(OLD_PREFIX):
                target = root_path / name[len(OLD_PREFIX):].rsplit("-", 1)[0]
                if not target.exists() and path.is_dir():
                    path.rename(target)
                    done.append(f"restored {target}")
                else:
                    _remove(path)
                    done.append(f"removed {path}")
        dirs[:] = [d for d in dirs if not d.startswith((TMP_PREFIX, OLD_PREFIX))]
    return done


# ---------------------------------------------------------------------------- the lock

def _lockf(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # no POSIX record locks (Windows): folders are not locked there
        return True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def _writable_error(path: Path, e: OSError) -> RunFolderError:
    return RunFolderError(f"cannot write in {path}: {e.strerror or e} (a read-only folder? choose another out_dir)")


class RunFolder:
    """A claimed run folder: `claim` takes the lock (creating the folder if needed), `begin`
    writes the resolved config once the command knows it will run, `release` lets go (and
    removes the folder again when this claim created it and nothing was written)."""

    def __init__(self, path: Path, fd: int | None, created: list[Path], command: str):
        self.path, self._fd, self._created, self.command = path, fd, created, command
        self.began = False

    @classmethod
    def claim(cls, run_dir: str | Path, command: str = "") -> RunFolder:
        path = Path(run_dir)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path} is a file, not a folder; choose another out_dir")
        created = [p for p in [path, *path.parents] if not p.exists()]
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _writable_error(path if path.parent.exists() else path.parent, e) from None
        lock = path / LOCK_NAME
        for _ in range(10):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                for p in created:
                    try:
                        p.rmdir()
                    except OSError:
                        break
                raise _writable_error(path, e) from None
            if not _lockf(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise RunFolderError(
                    f"{path} is in use by another reftune command (pid {holder.get('pid', '?')}: "
                    f"`{holder.get('command', '?')}`, since {holder.get('started', '?')}); wait for it to "
                    f"finish or choose another out_dir")
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file between our open and lock: try again
        else:
            raise RunFolderError(f"{path}: could not take its lock ({lock})")
        holder = _read_holder(fd)
        if holder.get("pid") not in (None, os.getpid()) and not _pid_alive(holder.get("pid")):
            note(f"{path}: took over the lock of pid {holder['pid']}, which is no longer running")
        info = {"pid": os.getpid(), "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        folder = cls(path, fd, created, command)
        for line in clean_stale(path):
            note(f"{path}: {line} (left by an interrupted run)")
        return folder

    def begin(self, cfg=None) -> Path:
        """From here on the command writes: the resolved config first (atomically)."""
        if cfg is not None:
            try:
                save_config(cfg, self.path / "config.yaml")
            except OSError as e:
                raise _writable_error(self.path, e) from None
        self.began = True
        return self.path

    def clear(self) -> None:
        """--overwrite: take what an earlier run left out of the way (each entry renamed into one
        temporary folder, then deleted; a kill in between leaves a `.tmp-*` the next claim removes)."""
        entries = [p for p in self.path.iterdir() if p.name != LOCK_NAME]
        if not entries:
            return
        trash = self.path / f"{TMP_PREFIX}replaced-{os.getpid()}"
        trash.mkdir(exist_ok=True)
        for p in entries:
            p.rename(trash / p.name)
        shutil.rmtree(trash, ignore_errors=True)
        note(f"{self.path}: --overwrite: removed {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} "
             f"of the earlier run")

    def release(self) -> None:
        if self._fd is None:
            return
        lock = self.path / LOCK_NAME
        try:
            if os.stat(lock).st_ino == os.fstat(self._fd).st_ino:
                lock.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if not self.began:  # refused before writing: leave no folder behind that we made
            for p in self._created:
                try:
                    p.rmdir()
                except OSError:
                    break

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def claim_run(run_dir: str | Path, command: str = "") -> RunFolder:
    """Claim `run_dir` for this process (see RunFolder)."""
    return RunFolder.claim(run_dir, command or " ".join(["reftune", *sys.argv[1:2]]))


# ---------------------------------------------------------------------------- trainers' folders

RUN_OUTPUTS = ("checkpoints", "latest.json", "result.json")


def held_outputs(run_dir: Path) -> list[str]:
    """What an earlier training run left that a fresh run would replace: checkpoints, result."""
    found = []
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        found += [f"checkpoints/{p.name}" for p in sorted(ckpts.iterdir()) if not p.name.startswith(".")]
    found += [name for name in RUN_OUTPUTS[1:] if (run_dir / name).exists()]
    return found


def prepare_training_folder(folder: RunFolder, *, resume: bool, overwrite: bool, command: str,
                            resumable: bool = True) -> str:
    """Decide what to do with what an earlier run left in a trainer's folder. Returns the mode:
    "fresh", "resume" (a step/epoch checkpoint to continue from) or "restart" (resume asked, the
    run has a config but no resumable checkpoint yet: it starts again from step 0).

    A fresh start into a folder with checkpoints or a result is refused (resume it, or pass
    --overwrite); logs of an attempt that never reached a checkpoint are replaced."""
    run_dir = folder.path
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in the folder, --overwrite replaces it: choose one")
    if overwrite:
        folder.clear()
        return "fresh"
    if resume:
        if not (run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"--resume {run_dir}: no run to resume there (no config.yaml, no latest.json)")
        if (run_dir / "latest.json").exists():
            return "resume"
        note(f"{run_dir}: no resumable checkpoint yet (the run stopped before its first one): it restarts from "
             f"step 0 with its saved config; the same seed reproduces it")
        return "restart"
    held = held_outputs(run_dir)
    if held:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints or results of an earlier run ({', '.join(held[:3])}"
            f"{', ...' if len(held) > 3 else ''}): "
            + (f"continue it with `reftune {command} --resume {run_dir}`, " if resumable else "")
            + "choose another out_dir, or pass --overwrite to replace it")
    stale = [n for n in ("metrics.jsonl", "samples.jsonl", "tb", TRACKERS_FILE) if (run_dir / n).exists()]
    if stale:
        for n in stale:
            _remove(run_dir / n)
        note(f"{run_dir}: an earlier attempt stopped before its first checkpoint; its logs ({', '.join(stale)}) "
             f"are replaced")
    return "fresh"


# ---------------------------------------------------------------------------- metrics log

TRACKERS_FILE = "trackers.json"
"""Per external tracker: its backend run (ids) and the last step sent to it, for resume."""


class RunLogger:
    """A run's metrics log. `metrics.jsonl` always (one JSON object per `log`; repaired when opened,
    cut back on resume), `samples.jsonl` when tables of samples are logged, and the trackers
    `report_to` names (reftune.trackers): each gets the resolved config, every step's metrics
    and, every `samples_every` steps, a table of sampled CoTs.

    Resume: JSONL files are cut back to the resumed step and TensorBoard purges later events. An
    external tracker (W&B, Trackio, MLflow) continues the same backend run (ids kept in
    `trackers.json`) and is not sent the steps the interrupted attempt already sent it, so it
    holds each step once. A tracker that fails after it started is noted once and dropped for the
    rest of the run: metrics.jsonl still has every record."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, *, report_to=None, config: dict | None = None,
                 samples_every: int = 0):
        from reftune.trackers import open_tracker, resolve_report_to

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path, self.samples_path = self.run_dir / "metrics.jsonl", self.run_dir / "samples.jsonl"
        for path in (self.path, self.samples_path):
            if path.exists():
                read_jsonl(path, repair=True)  # a torn last line must not glue onto the next record
        self.samples_every = samples_every
        names = resolve_report_to(["tensorboard"] if report_to is None else report_to, tensorboard)
        self._state_path = self.run_dir / TRACKERS_FILE
        self._saved = saved = self._read_state()
        self.trackers, self._sent, self._resumed_to = {}, {}, {}
        try:
            for name in names:
                tracker = self.trackers[name] = open_tracker(name, self.run_dir, saved.get(name))
                last = saved.get(name, {}).get("last_step") if tracker.resumed else 0
                self._sent[name] = self._resumed_to[name] = last if isinstance(last, int) else 0
            for name in list(self.trackers) if config is not None else []:
                self._send(name, "log_config", config)
        except BaseException:
            self.close()
            raise
        self._write_state()

    @classmethod
    def for_run(cls, run_dir: str | Path, cfg) -> RunLogger:
        """The logger of a run configured by `cfg` (a RunConfig: report_to, log_samples_every, the
        deprecated tensorboard); the trackers get `cfg` resolved, as config.yaml holds it."""
        from reftune.config import to_dict

        return cls(run_dir, getattr(cfg, "tensorboard", True), report_to=getattr(cfg, "report_to", None),
                   config=to_dict(cfg), samples_every=getattr(cfg, "log_samples_every", 0))

    def _read_state(self) -> dict:
        try:
            state = json.loads(self._state_path.read_text()) if self._state_path.exists() else {}
        except (OSError, ValueError):
            note(f"{self._state_path}: unreadable; trackers start new runs")
            return {}
        return {k: v for k, v in state.items() if isinstance(v, dict)} if isinstance(state, dict) else {}

    def _write_state(self) -> None:
        external = {n: {**t.state(), "last_step": self._sent[n]} for n, t in self.trackers.items() if t.state()}
        if external:  # trackers not used now keep their entry: a later resume may name them again
            atomic_write_text(self._state_path, json.dumps({**self._saved, **external}, indent=2) + "\n")

    def _send(self, name: str, method: str, *args) -> None:
        """Call one tracker; an error drops it (noted), the run goes on."""
        try:
            getattr(self.trackers[name], method)(*args)
        except Exception as e:  # noqa: BLE001  (a tracker must not end a training run)
            note(f"report_to={name}: {method} failed ({type(e).__name__}: {e}); it gets no more records from this "
                 f"run (metrics.jsonl has them all)")
            tracker = self.trackers.pop(name)
            if method != "close":
                try:
                    tracker.close()
                except Exception:  # noqa: BLE001  (already reported)
                    pass

    def _fan_out(self, step: int, method: str, *args) -> None:
        """Send to every tracker that has not had `step` from an interrupted attempt already."""
        for name in list(self.trackers):
            if step > self._resumed_to[name]:
                self._send(name, method, step, *args)
                self._sent[name] = max(self._sent[name], step)
        self._write_state()

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, "time": round(time.time(), 3), **{k: _finite(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._fan_out(step, "log", metrics)

    def log_samples(self, step: int, rows: list[dict], name: str = "samples") -> None:
        """A table of sampled CoTs at `step`: one line per row in samples.jsonl (with the step and
        the table's name), and the table to every tracker."""
        if not rows:
            return
        with self.samples_path.open("a") as f:
            f.writelines(json.dumps({"step": step, "table": name, **{k: _finite(v) for k, v in row.items()}},
                                    default=str) + "\n" for row in rows)
        self._fan_out(step, "log_table", name, rows)

    def log_rollout(self, step: int, scored, tokenizer) -> None:
        """The online trainers' hook, called with each step's scored rollout: every
        `samples_every` steps (0: never) its rows (reftune.trackers.rollout_rows) go to
        `log_samples`."""
        if self.samples_every and step % self.samples_every == 0:
            from reftune.trackers import rollout_rows

            self.log_samples(step, rollout_rows(scored, tokenizer))

    def truncate_after(self, step: int) -> None:
        """On resume: drop JSONL records logged after the checkpoint we resume from (rewritten
        atomically, so a kill here leaves the old file); TensorBoard purges its later events;
        external trackers keep what they were sent and are not sent those steps again."""
        for path in (self.path, self.samples_path):
            if path.exists():
                kept = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        for name in list(self.trackers):
            self._send(name, "truncate_after", step)
            last = self._resumed_to[name]
            if last > step:
                span = f"step {last} as the interrupted attempt sent it" if last == step + 1 else \
                    f"steps {step + 1}-{last} as the interrupted attempt sent them"
                note(f"report_to={name}: keeps {span}; the resumed run sends from step {last + 1} on "
                     f"(metrics.jsonl holds the resumed numbers)")

    def close(self) -> None:
        for name in list(self.trackers):
            self._send(name, "close")
        self.trackers.clear()


def progress(total: int, desc: str, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


def begin_resumable(folder: RunFolder, cfg, free: tuple[str, ...], what: str, overwrite: bool) -> Path:
    """Begin a claimed folder that a rerun with the same settings resumes: settings other than the
    `free` ones that differ from the earlier run's are refused (naming them) unless `overwrite`,
    which starts the folder again. `what` names the earlier run ("a comparison")."""
    changed = config_changes(folder.path, cfg, free)
    if changed and not overwrite:
        raise RunFolderError(f"{folder.path} holds {what} with other settings ({', '.join(changed)} differ): rerun "
                             f"with the same settings to resume it, choose another out_dir, or pass --overwrite to "
                             f"replace it")
    if overwrite:
        folder.clear()
    return folder.begin(cfg)


def config_changes(run_dir: Path, cfg, ignore: tuple[str, ...] = ()) -> list[str] | None:
    """Keys whose value differs between `cfg` and the config.yaml an earlier run left in `run_dir`
    (None when there is none). A config.yaml that cannot be read counts as different everywhere."""
    from reftune.config import ConfigError, from_dict, read_yaml, to_dict

    saved = run_dir / "config.yaml"
    if not saved.exists():
        return None
    now = to_dict(cfg)
    try:
        before = to_dict(from_dict(type(cfg), read_yaml(saved)))
    except ConfigError:
        return ["config.yaml (unreadable)"]
    # out_dir is where the run is, not what it computes: a moved or copied folder still matches
    return sorted(k for k in now if k not in ignore and k != "out_dir" and before.get(k) != now[k])
