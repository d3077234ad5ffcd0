"""Directories of atomically written files and the files' descriptors: the directory's
fsync (batched), its temp sweep, and linking and hashing a file by its descriptor."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["TEMP_NAME", "DirSync", "close_all", "fsync_dir", "hash_fd", "link_fd", "sweep_temps"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSync:
    """One directory's fsyncs, batched: renames that land together share one.

    :meth:`sync` (blocking, in a worker thread, after a rename) makes sure an
    fsync of the directory *begins after the call*: it runs one itself when
    none is running; when one is, it only marks another as due, and the
    running thread runs that too before it returns. So commits never queue
    behind each other's directory fsyncs, and a burst of commits costs a few
    of them. (A cache entry whose name is lost in a power cut is fetched
    again; its data was fsynced before the rename, so a name never shows a
    partial file.)
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._running = False
        self._due = False
        self.syncs = 0  # how many fsyncs ran (for tests and stats)

    def sync(self) -> None:
        with self._lock:
            if self._running:
                self._due = True  # the running thread syncs once more
                return
            self._running = True
        try:
            while True:
                with self._lock:
                    self._due = False
                fsync_dir(self.path)
                with self._lock:
                    self.syncs += 1
                    if not self._due:
                        self._running = False
                        return
        except BaseException:
            with self._lock:
                self._running = False
            raise


# The names AtomicFile gives its temp files: ".<tag>.<16 hex>.tmp".
TEMP_NAME = re.compile(r"\.[0-9A-Za-z_-]{1,64}\.[0-9a-f]{16}\.tmp")


def sweep_temps(directory: str, *, ours_only: bool = False) -> list[str]:
    """Remove temp files in ``directory`` whose writer is gone (their lock is free).

    Never guesses by age: a live writer holds an exclusive ``flock`` on its
    temp file until it commits or discards it. With ``ours_only`` only names
    that :class:`AtomicFile` gives are touched (in a directory we share with
    others, such as a layout). Symlinks are never followed. Returns the
    removed names.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:  # absent, not a directory, or not ours to list: nothing to sweep
        return removed
    for name in names:
        if not name.endswith(".tmp"):
            continue
        if ours_only and not TEMP_NAME.fullmatch(name):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live writer holds it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(name)
        finally:
            os.close(fd)
    return removed


def link_fd(fd: int, dst: str) -> bool:
    """Hard-link the inode open as ``fd`` at ``dst`` (linkat through /proc/self/fd, so the
    very file, not whatever its old path names now). False where that cannot be done
    (no /proc, another filesystem, not permitted, too many links, ``dst`` exists)."""
    try:
        fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:  # (AT_SYMLINK_FOLLOW: plain link() would link the /proc symlink itself)
        os.link(str(fd), dst, src_dir_fd=fds, follow_symlinks=True)
    except OSError:
        return False
    finally:
        os.close(fds)
    return True


def hash_fd(fd: int, start: int, n: int, hasher: Any, buf: bytearray) -> None:
    """Feed ``n`` bytes of ``fd`` from ``start`` to ``hasher``, through ``buf`` (reused:
    no allocation per step, so concurrent jobs keep memory flat)."""
    view = memoryview(buf)
    pos, end = start, start + n
    while pos < end:
        got = os.preadv(fd, [view[: min(end - pos, len(buf))]], pos)
        if not got:
            raise OSError(f"the file ended after {pos - start} of {n} bytes")
        hasher.update(view[:got])
        pos += got


def close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())
