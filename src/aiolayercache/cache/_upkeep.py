"""Upkeep of a cache directory: list entries, hash them all again, remove one.

Every function here blocks (run it in a worker thread) and works on a
:class:`ProofStore`. Only regular files are entries; anything else at an
entry's name is skipped by listings and removed by ``verify`` and ``remove``
without following a symlink out of the cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass, field

from .._atomic import sweep_temps
from .._errors import CacheDirectoryError
from .._hash import Hash
from ._proofs import _PROOFS, ProofStore

__all__ = ["EntryInfo", "VerifyReport", "entries", "remove", "to_prune", "verify_all"]

log = logging.getLogger("aiolayercache.cache")


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """One cache entry: its hash, size in bytes, last use (epoch seconds) and kind
    (``gzip``, ``zstd``, ``tar``, ``blob``, ``unverified`` while no proof holds, or
    ``unreadable``); ``links``: how many names the file has (more than one when
    layouts hold hard links to it: removing the entry then frees no space)."""

    digest: Hash
    size: int
    last_used: float
    kind: str
    links: int = 1


@dataclass(slots=True)
class VerifyReport:
    """What :meth:`FilesystemCache.verify` found: good entries, removed ones, stale temps."""

    ok: int = 0
    removed: list[Hash] = field(default_factory=list)
    temps_removed: int = 0
    #: why each removed entry went, in words
    reasons: dict[Hash, str] = field(default_factory=dict)


def _scan(store: ProofStore) -> list[tuple[Hash, str, os.stat_result]]:
    """Every name in the cache that is an entry's name, with its ``lstat``."""
    out: list[tuple[Hash, str, os.stat_result]] = []
    try:
        names = os.listdir(store.root)
    except OSError as exc:
        raise CacheDirectoryError(
            f"cache path {store.label} cannot be read: {exc.strerror or exc}"
        ) from exc
    for name in names:
        alg, sep, hex_ = name.partition("-" if os.name == "nt" else ":")
        try:
            h = Hash(alg, hex_) if sep else None
        except ValueError:
            h = None
        if h is None:
            continue
        entry = os.path.join(store.root, name)
        try:
            out.append((h, entry, os.lstat(entry)))
        except FileNotFoundError:
            continue
    return out


def entries(store: ProofStore) -> list[EntryInfo]:
    """Every entry with its size, kind and last use, newest first. Reads only."""
    out: list[EntryInfo] = []
    for h, entry, st in _scan(store):
        if not stat.S_ISREG(st.st_mode):
            continue  # not an entry; `verify` moves it away
        m = store.load(entry)
        try:
            used = os.lstat(store.meta_path(entry)).st_mtime
        except OSError:
            used = st.st_mtime
        if not os.access(entry, os.R_OK):
            kind = "unreadable"
        elif m is not None and m.proves(st):
            kind = m.kind
        else:
            kind = "unverified"
        out.append(EntryInfo(h, st.st_size, max(used, st.st_mtime), kind, st.st_nlink))
    out.sort(key=lambda e: e.last_used, reverse=True)
    return out


def verify_all(store: ProofStore) -> VerifyReport:
    """Hash every entry again (proofs ignored); remove bad, unreadable and non-file ones,
    what was set aside, and stale temp files."""
    report = VerifyReport()
    for h, entry, st in _scan(store):
        if not stat.S_ISREG(st.st_mode):
            kind = store.set_aside(entry, st)
            report.removed.append(h)
            report.reasons[h] = f"it was {kind}, not a regular file"
            continue
        _PROOFS.pop(entry, None)
        with contextlib.suppress(OSError):
            os.unlink(store.meta_path(entry))
        meta, why = store.check(h, entry, None, upkeep=True)
        if meta is not None:
            report.ok += 1
            continue
        if not why:
            continue  # gone meanwhile
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry)  # unreadable: of no use to anyone here
        store.forget(entry)
        report.removed.append(h)
        report.reasons[h] = why
    _empty_aside(store)
    report.temps_removed = len(sweep_temps(store.tmpdir))
    return report


def _empty_aside(store: ProofStore) -> None:
    """Remove what was set aside (never following a symlink out of the cache)."""
    for name in os.listdir(store.asidedir):
        path = os.path.join(store.asidedir, name)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError as exc:
            log.warning("cache %s: cannot remove %s: %s", store.label, path, exc)


def remove(store: ProofStore, h: Hash) -> bool:
    """Remove whatever sits at entry ``h``'s name (a directory too); False if nothing."""
    entry = store.entry(h)
    try:
        st = os.lstat(entry)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(entry)  # does not follow symlinks inside
        else:
            os.unlink(entry)
    except FileNotFoundError:
        return False
    finally:
        store.forget(entry)
    return True


def to_prune(
    entries: list[EntryInfo], max_bytes: int | None, older_than: float | None
) -> list[EntryInfo]:
    """What ``prune`` removes of ``entries`` (most recently used first): least recently
    used first until at most ``max_bytes`` remain, and all unused for ``older_than`` s."""
    now = time.time()
    total = sum(e.size for e in entries)
    out: list[EntryInfo] = []
    for e in reversed(entries):
        too_old = older_than is not None and now - e.last_used > older_than
        too_big = max_bytes is not None and total > max_bytes
        if too_old or too_big:
            out.append(e)
            total -= e.size
    return out
