"""Proofs of verification: what we know of each entry, and whether its file is still proven.

An entry's proof is its size, mtime and inode when its bytes last hashed to
its name in full (our own commit, or hashing a file another tool wrote). Any
change of those voids the proof and the file is hashed again before use. The
proofs live in ``<cache>/.aiolayercache/meta/<entry>.json``; the mtime of a
proof file records the entry's last use.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, BinaryIO

from .._atomic import DirSync
from .._hash import Hash
from ..streams import CHUNK_SIZE, NotARegularFileError, sniff

__all__ = ["Meta", "ProofStore", "entry_name"]

log = logging.getLogger("aiolayercache.cache")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_USE_GRANULARITY = 60.0


@dataclass(frozen=True, slots=True)
class Meta:
    """What we know of one entry, and the proof that its current file was verified."""

    size: int
    mtime_ns: int
    ino: int
    kind: str  # gzip | zstd | tar | blob
    digest: str | None = None
    diff_id: str | None = None
    media_type: str | None = None

    def proves(self, st: os.stat_result) -> bool:
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns and st.st_ino == self.ino


# Proofs seen by this process, keyed by entry path (saves reading meta files).
_PROOFS: dict[str, Meta] = {}
# When this process last recorded a use of each entry (time.time()).
_USED: dict[str, float] = {}


def what_it_is(st: os.stat_result) -> str:
    """``a directory``, ``a symlink``, ``a FIFO``, ... in words, for messages."""
    for test, words in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(st.st_mode):
            return words
    return "a device"


def entry_name(h: Hash) -> str:
    """The file name of entry ``h`` (ggcr's: ``sha256:<hex>``, ``sha256-<hex>`` on Windows)."""
    # A Hash is validated at construction: its file name has no separator.
    name = h.filename
    assert os.sep not in name and (os.altsep is None or os.altsep not in name)
    return name


class ProofStore:
    """The entries of one cache directory and their proofs (all calls block: run in a thread,
    except :meth:`proven_now`, one ``lstat``)."""

    def __init__(self, label: object, root: str, metadir: str, tmpdir: str, asidedir: str) -> None:
        self.label = label  # how log lines name the cache
        self.root = root
        self.metadir = metadir
        self.tmpdir = tmpdir  # "" while the cache is only read: nothing is saved then
        self.asidedir = asidedir
        self._warned: set[str] = set()
        # Entries committed together share one fsync of the entries' directory.
        self.dirsync = DirSync(root)

    def entry(self, h: Hash) -> str:
        return os.path.join(self.root, entry_name(h))

    def meta_path(self, entry: str) -> str:
        return os.path.join(self.metadir, os.path.basename(entry) + ".json")

    # --- the proof files ----------------------------------------------------------

    def save(self, entry: str, meta: Meta) -> None:
        _PROOFS[entry] = meta
        if not self.tmpdir:
            return
        tmp = os.path.join(self.tmpdir, f"meta.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
            with open(fd, "w") as f:
                json.dump(asdict(meta), f)
            os.replace(tmp, self.meta_path(entry))  # replaces a planted symlink, not its target
        except OSError as exc:
            log.debug("cache %s: cannot save proof for %s: %s", self.label, entry, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def load(self, entry: str) -> Meta | None:
        m = _PROOFS.get(entry)
        if m is not None:
            return m
        try:
            # Never through a symlink: a proof file that leads elsewhere is no proof.
            with open(os.open(self.meta_path(entry), os.O_RDONLY | _NOFOLLOW)) as f:
                return Meta(**json.load(f))
        except (OSError, ValueError, TypeError):
            return None

    def forget(self, entry: str) -> None:
        _PROOFS.pop(entry, None)
        with contextlib.suppress(OSError):
            os.unlink(self.meta_path(entry))

    def forget_proof(self, entry: str) -> None:
        """Void the proof of ``entry`` but keep what we know of it (digest, diff_id)."""
        _PROOFS.pop(entry, None)
        m = self.load(entry)
        if m is not None:
            self.save(entry, replace(m, ino=-1))

    def note_use(self, entry: str) -> None:
        """Record last use as the proof file's mtime, at most once a minute per entry."""
        now = time.time()
        if now - _USED.get(entry, 0.0) < _USE_GRANULARITY:
            return
        _USED[entry] = now
        with contextlib.suppress(OSError):
            os.utime(self.meta_path(entry), follow_symlinks=False)

    # --- lookups --------------------------------------------------------------------

    def proven_now(self, h: Hash) -> tuple[bool, Meta | None]:
        """Without a thread hop: ``(True, None)`` for a miss, ``(True, meta)`` for an entry
        proven in this process, ``(False, None)`` when :meth:`lookup` must decide."""
        entry = self.entry(h)
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            _PROOFS.pop(entry, None)
            return True, None
        m = _PROOFS.get(entry)
        if m is not None and m.proves(st):
            return True, m
        return False, None

    def lookup(self, h: Hash) -> Meta | None:
        """The proven meta of entry ``h``; hash an unproven file first; None if absent or bad.

        Only a regular file is an entry: anything else there (a directory, a FIFO, a
        symlink) is set aside, and an entry that cannot be read is a miss (one warning).
        """
        entry = self.entry(h)
        try:
            st = os.lstat(entry)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            self.set_aside(entry, st)
            return None
        m = self.load(entry)
        if m is not None and m.proves(st):
            _PROOFS[entry] = m
            return m
        return self.verify(h, entry, m)

    def open_entry(self, h: Hash, meta: Meta | None) -> tuple[Meta, BinaryIO] | None:
        """:meth:`lookup` (unless ``meta`` proves entry ``h`` already), then open it: its
        meta and file, or None for a miss. FileNotFoundError if it went meanwhile;
        another OSError if it cannot be read (then it is :meth:`unusable`)."""
        if meta is None:
            meta = self.lookup(h)
            if meta is None:
                return None
        entry = self.entry(h)
        # Only as itself (no symlink), never blocking (a FIFO planted there).
        fd = os.open(entry, os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotARegularFileError(errno.EINVAL, "not a regular file", entry)
            return meta, open(fd, "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise

    def verify(self, h: Hash, entry: str, old: Meta | None) -> Meta | None:
        """Hash ``entry`` in full; record and return its proof, or remove it if it is bad."""
        return self.check(h, entry, old)[0]

    def check(
        self, h: Hash, entry: str, old: Meta | None, *, upkeep: bool = False
    ) -> tuple[Meta | None, str]:
        """:meth:`verify`, with the reason when there is no proof (``""`` if it is gone).

        With ``upkeep`` an unreadable entry is not announced as fetched again."""
        hasher = h.hasher()
        head = b""
        try:
            fd = os.open(entry, os.O_RDONLY | _NOFOLLOW)
        except FileNotFoundError:
            return None, ""
        except OSError as exc:
            return None, self.unusable(entry, exc, quiet=upkeep)
        try:
            with open(fd, "rb", buffering=0) as f:
                before = os.fstat(f.fileno())
                if not stat.S_ISREG(before.st_mode):
                    return None, "replaced by something that is not a file while being read"
                while chunk := f.read(CHUNK_SIZE):
                    if not head:
                        head = chunk[:512]
                    hasher.update(chunk)
                after = os.fstat(f.fileno())
        except OSError as exc:
            return None, self.unusable(entry, exc, quiet=upkeep)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            return None, "changed while being read (another tool writing it?)"
        if hasher.hexdigest() != h.hex:
            self.remove_if_same(entry, after)
            log.warning("cache %s: removed entry %s: its bytes do not match", self.label, h)
            return None, "its bytes do not match its name"
        kind = sniff(head)
        info: dict[str, Any] = {}
        if old is not None:
            info = {"digest": old.digest, "diff_id": old.diff_id, "media_type": old.media_type}
        if kind == "tar":
            info["diff_id"] = str(h)
        else:
            info["digest"] = str(h)  # a compressed layer, or a blob served as it is
        meta = Meta(after.st_size, after.st_mtime_ns, after.st_ino, kind, **info)
        self.save(entry, meta)
        return meta, ""

    # --- what is not a good entry ---------------------------------------------------

    def unusable(self, entry: str, exc: OSError, *, quiet: bool = False) -> str:
        """An entry we cannot read is a miss: say so once, and forget its proof.
        Returns the reason, in words."""
        self.forget_proof(entry)
        why = f"cannot be read ({exc.strerror or exc})"
        if not quiet and entry not in self._warned:
            self._warned.add(entry)
            log.warning(
                "cache %s: cannot read entry %s (%s); fetching it again",
                self.label,
                os.path.basename(entry),
                exc.strerror or exc,
            )
        return why

    def set_aside(self, entry: str, st: os.stat_result) -> str:
        """Move something that is not a regular file out of an entry's name.
        Returns what it was, in words."""
        kind = what_it_is(st)
        name = os.path.basename(entry)
        self.forget(entry)
        aside = os.path.join(self.asidedir, f"{name}.{secrets.token_hex(4)}")
        try:
            os.rename(entry, aside)
        except FileNotFoundError:
            return kind
        except OSError as exc:
            why = exc.strerror or exc
            log.warning("cache %s: entry %s is %s; cannot move it: %s", self.label, name, kind, why)
            return kind
        log.warning(
            "cache %s: entry %s was %s; moved to %s (`cache verify` removes it)",
            self.label,
            name,
            kind,
            aside,
        )
        return kind

    def remove_if_same(self, entry: str, seen: os.stat_result) -> None:
        """Remove ``entry`` if it is still the file ``seen`` describes."""
        try:
            now = os.stat(entry)
        except FileNotFoundError:
            return
        if (now.st_ino, now.st_size, now.st_mtime_ns) == (
            seen.st_ino,
            seen.st_size,
            seen.st_mtime_ns,
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry)
            self.forget(entry)
