"""Measuring the reliability invariants: what a consumer saw, what a cache holds, what a
library call touched on disk and on the network.

``Scenario`` ties them together: a test measures inside ``with Scenario("16 …") as sc``,
states its checks with ``sc.check(name, ok)`` and its counters with ``sc.count(...)``;
on exit one JSON line goes to the reliability log (``_log.record``) from the measured
values, failures included, and only then are the checks asserted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from anyio.abc import ByteReceiveStream

from ._log import COUNTERS, record

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


# --- a scenario: measured values, one log line, then the assertions --------------------


class Scenario:
    """One matrix scenario: collects checks and counters, logs them, then asserts them.

    ``xfail=True`` marks a promise the library does not keep (the test is an
    ``xfail(strict=True)``): the line says so, and its failures are expected ones.
    """

    def __init__(self, name: str, *, runs: int = 1, xfail: bool = False) -> None:
        self.name = name
        self.runs = runs
        self.xfail = xfail
        self.failed: list[str] = []
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS[1:], 0)
        self.extra: dict[str, Any] = {}

    def check(self, what: str, ok: bool) -> bool:
        if not ok:
            self.failed.append(what)
        return ok

    def count(self, **counters: int) -> None:
        for k, v in counters.items():
            self.counters[k] = self.counters.get(k, 0) + int(v)

    def note(self, **values: Any) -> None:
        self.extra.update(values)

    def __enter__(self) -> Scenario:
        return self

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failures = len(self.failed)
        for k in COUNTERS[1:]:
            if self.counters.get(k, 0):
                failures += 1
        if exc is not None:
            failures += 1
            self.extra.setdefault("error", f"{type(exc).__name__}: {exc}"[:300])
        fields: dict[str, Any] = {"runs": self.runs, "failures": min(failures, self.runs)}
        fields.update(self.counters)
        if self.xfail:
            fields["xfail"] = 1
        if self.failed:
            fields["failed_checks"] = self.failed
        fields.update(self.extra)
        record(self.name, **fields)
        if exc is None:
            bad = {k: v for k, v in self.counters.items() if v}
            assert not self.failed and not bad, f"{self.name}: failed {self.failed} {bad}"


# --- what a consumer saw -----------------------------------------------------------------


@dataclass
class Consumed:
    """Everything a consumer read from a stream, whether it ended cleanly, and the error."""

    data: bytes = b""
    clean_end: bool = False
    error: BaseException | None = None

    def bad_bytes(self, truth: bytes) -> int:
        """Wrong bytes handed out *with a clean end of stream* (0 when the stream failed)."""
        if not self.clean_end:
            return 0
        if self.data == truth:
            return 0
        same = sum(1 for a, b in zip(self.data, truth, strict=False) if a == b)
        return max(len(self.data), len(truth)) - same


async def consume(open_: Callable[[], Awaitable[ByteReceiveStream]]) -> Consumed:
    """Open a stream and read it to its end as an ordinary consumer would."""
    out = Consumed()
    parts: list[bytes] = []
    try:
        stream = await open_()
        async with stream:
            async for chunk in stream:
                parts.append(chunk)
        out.clean_end = True
    except Exception as exc:
        out.error = exc
    out.data = b"".join(parts)
    return out


# --- what a cache directory holds ------------------------------------------------------


@dataclass
class CacheState:
    entries: dict[str, bool] = field(default_factory=dict)  # name -> verifies
    temps: list[str] = field(default_factory=list)
    open_fds: list[str] = field(default_factory=list)
    held_locks: list[str] = field(default_factory=list)

    @property
    def bad_entries(self) -> list[str]:
        return [n for n, ok in self.entries.items() if not ok]

    @property
    def partial_entries(self) -> int:
        """Entries whose bytes do not hash to their name, plus temp files left behind."""
        return len(self.bad_entries) + len(self.temps)

    @property
    def leaks(self) -> int:
        """Descriptors of this process still open under the cache, plus entry locks held."""
        return len(self.open_fds) + len(self.held_locks)


def _verifies(path: Path, name: str) -> bool:
    alg, _, hex_ = name.replace("-", ":", 1).partition(":")
    try:
        h = hashlib.new(alg)
    except ValueError:
        return False
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest() == hex_


def open_fds_under(root: Path) -> list[str]:
    """Paths under ``root`` that this process holds open (Linux: /proc/self/fd)."""
    real = os.path.realpath(root)
    out = []
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target == real or target.startswith(real + os.sep):
                out.append(target)
    return out


def cache_state(root: Path) -> CacheState:
    """Entries (verified by hashing), temp files, open descriptors and held locks of a cache."""
    st = CacheState()
    if not root.exists():
        return st
    for name in sorted(os.listdir(root)):
        p = root / name
        if name.startswith(("sha256:", "sha512:", "sha256-", "sha512-")) and stat.S_ISREG(
            os.lstat(p).st_mode
        ):
            st.entries[name] = _verifies(p, name)
    tmp = root / ".aiolayercache" / "tmp"
    if tmp.exists():
        st.temps = sorted(os.listdir(tmp))
    st.open_fds = open_fds_under(root)
    locks = root / ".aiolayercache" / "locks"
    if fcntl is not None and locks.exists():
        for name in sorted(os.listdir(locks)):
            fd = os.open(locks / name, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                st.held_locks.append(name)
            finally:
                os.close(fd)
    return st


# --- what a library call touched: an audit hook ------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_MUTATING = {
    "os.rename": 2,
    "os.replace": 2,
    "os.remove": 1,
    "os.rmdir": 1,
    "os.mkdir": 1,
    "os.symlink": 2,
    "os.link": 2,
    "os.truncate": 1,
    "os.chmod": 1,
    "os.chown": 1,
    "os.utime": 1,
    "os.chflags": 1,
    "os.mkfifo": 1,
    "os.mknod": 1,
    "shutil.copyfile": 2,
    "shutil.copytree": 2,
    "shutil.move": 2,
    "shutil.rmtree": 1,
}
_LISTING = ("os.listdir", "os.scandir")
_recording: list[tuple[str, str, str]] | None = None
_lock = threading.Lock()


def _as_path(p: object) -> str | None:
    if isinstance(p, int) or p is None:
        return None
    try:
        s = os.fsdecode(os.fspath(p))  # type: ignore[arg-type]
    except TypeError:
        return None
    return os.path.abspath(s)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    rec = _recording
    if rec is None:
        return
    if event == "open":
        path = _as_path(args[0])
        if path is None:
            return
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        rec.append(("write" if write else "read", path, event))
    elif event in _MUTATING:
        for a in args[: _MUTATING[event]]:
            path = _as_path(a)
            if path is not None:
                rec.append(("write", path, event))
    elif event in _LISTING:
        path = _as_path(args[0]) if args else None
        if path is not None:
            rec.append(("read", path, event))
    elif event in ("socket.connect", "socket.getaddrinfo"):
        rec.append(("net", repr(args[1] if event == "socket.connect" else args[0]), event))


sys.addaudithook(_hook)

# Reads the interpreter itself may do during a call (lazy imports, locale data).
_RUNTIME_PREFIXES = tuple(
    {os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    | {"/proc/", "/dev/", "/sys/"}
)


@dataclass
class Touched:
    """Paths (resolved through symlinks) a call opened, listed or changed, and its sockets."""

    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    net: list[str] = field(default_factory=list)  # "connect ('1.2.3.4', 80)", "getaddrinfo 'h'"

    def reads_outside(self, *roots: Path | str) -> list[str]:
        return [p for p in self.reads if not _under(p, roots) and not _runtime(p)]

    def writes_outside(self, *roots: Path | str) -> list[str]:
        return [p for p in self.writes if not _under(p, roots)]


def _under(path: str, roots: tuple[Path | str, ...]) -> bool:
    for r in roots:
        real = os.path.realpath(r)
        if path == real or path.startswith(real + os.sep):
            return True
    return False


def _runtime(path: str) -> bool:
    return path.startswith(_RUNTIME_PREFIXES) or path.endswith((".py", ".pyc", ".so"))


@contextlib.contextmanager
def audit() -> Iterator[Touched]:
    """Record what the code in the block opens, lists, changes and connects to (all threads).

    Paths are resolved after the block, so a read through a planted symlink shows
    as a read of its target.
    """
    global _recording
    with _lock:
        assert _recording is None, "audit() does not nest"
        events: list[tuple[str, str, str]] = []
        _recording = events
    out = Touched()
    try:
        yield out
    finally:
        _recording = None
        for kind, path, event in events:
            if kind == "net":
                out.net.append(f"{event.removeprefix('socket.')} {path}")
                continue
            # A path written may be gone now (a temp file renamed): resolve its directory.
            real = os.path.realpath(path)
            (out.writes if kind == "write" else out.reads).append(real)


def snapshot(root: Path, *, skip: Path | None = None) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime_ns) of everything under ``root`` except ``skip``, not following links."""
    out: dict[str, tuple[int, int, int]] = {}
    skip_real = os.path.realpath(skip) if skip is not None else None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if skip_real is not None and os.path.realpath(dirpath) == skip_real:
            dirnames[:] = []
            continue
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if skip_real is not None and os.path.realpath(p) == skip_real:
                continue
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out
