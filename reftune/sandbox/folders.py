"""The sandbox's temp folders: emptying and removing them at any depth and with any modes, without
recursion, and never raising; measuring what a program put in one.

Standard library only and imports none of its siblings: the parent (executor) and the zygote
(worker) both use it. A program that escaped the Python layer may leave a chain of folders deeper
than any recursion limit or path length, or folders whose mode keeps even their owner out (0o300,
0o000); `shutil.rmtree` then raises RecursionError (even with ignore_errors) or leaves them behind.
Here a folder's subfolders are first moved up to the top folder under new names, so at most two
folders are open at a time and every path is one name long, whatever the depth.
"""

import os

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_ENTRIES = 1_000_000  # work bound: a folder that holds more is reported as not emptied


def empty_folder(path, max_entries=_MAX_ENTRIES):
    """Remove everything inside the folder `path` (the folder stays). True if it is empty after
    (or gone); False otherwise. Never raises."""
    try:
        os.chmod(path, 0o700)  # an escaped program may have changed it: we own it, so we may
    except OSError:
        pass
    try:
        top = os.open(path, _DIR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        return _empty(top, max_entries)
    except Exception:  # MemoryError, an OS error we did not foresee: report, never raise
        return False
    finally:
        os.close(top)


def remove_folder(path, max_entries=_MAX_ENTRIES):
    """Remove the folder `path` and everything in it. True if it is gone; never raises."""
    if not empty_folder(path, max_entries):
        return False
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def is_empty(path):
    """True if the folder `path` exists and holds nothing (False on any error)."""
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def usage(path, max_bytes, max_entries):
    """True while what the folder holds (allocated bytes of its files, and its number of entries)
    stays within both bounds; False beyond them, and for a tree too deep to walk by path (which
    only a program that means harm builds). Never raises."""
    used, count, stack = 0, 0, [path]
    try:
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    count += 1
                    info = entry.stat(follow_symlinks=False)
                    used += max(info.st_blocks * 512, 4096)  # an empty file or folder still costs a page
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    if used > max_bytes or count > max_entries:
                        return False
    except Exception:
        return False
    return True


def _empty(top, budget):
    """Empty the folder open as `top` (see the module doc); True if it is empty after."""
    taken = set()  # names in top: moved folders get fresh ones
    queue = []  # folders in top still to empty, then remove
    with os.scandir(top) as entries:
        for entry in entries:
            taken.add(entry.name)
            if entry.is_dir(follow_symlinks=False):
                queue.append(entry.name)
            else:
                _unlink(top, entry.name)
    fresh = 0
    while queue and budget > 0:
        name = queue.pop()
        try:
            os.chmod(name, 0o700, dir_fd=top)  # read and search it, whatever mode it was given
            fd = os.open(name, _DIR, dir_fd=top)
        except OSError:
            continue
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    budget -= 1
                    if not entry.is_dir(follow_symlinks=False):
                        _unlink(fd, entry.name)
                        continue
                    while f".r{fresh}" in taken:
                        fresh += 1
                    new = f".r{fresh}"
                    try:  # up into top: emptied later, with at most two folders open
                        os.rename(entry.name, new, src_dir_fd=fd, dst_dir_fd=top)
                    except OSError:
                        continue
                    taken.add(new)
                    queue.append(new)
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=top)
            taken.discard(name)
        except OSError:
            pass
    with os.scandir(top) as entries:
        return next(entries, None) is None


def _unlink(fd, name):
    try:
        os.unlink(name, dir_fd=fd)
    except OSError:
        pass
