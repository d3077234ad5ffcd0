"""Per-entry cost: one worker-thread job per phase of an entry, one directory fsync per batch.

Counted, never timed: how many fsyncs of a directory ran and how many
``anyio.to_thread`` jobs a pull makes per blob.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from aiolayercache import _atomic, cache, layout, random
from aiolayercache._atomic import DirSync
from aiolayercache.cache import FilesystemCache
from aiolayercache.streams import drain

from .conftest import entries


class SlowSyncs:
    """fsync_dir replaced by a recorder that takes ``pause`` seconds per call."""

    def __init__(self, pause: float, fail: bool = False) -> None:
        self.pause = pause
        self.fail = fail
        self.calls: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()
        self._real = _atomic.fsync_dir

    def __call__(self, path: str) -> None:
        start = time.monotonic()
        time.sleep(self.pause)
        if self.fail:
            raise OSError(5, "Input/output error", path)
        self._real(path)
        with self._lock:
            self.calls.append((path, start, time.monotonic()))

    def of(self, path: Path) -> list[tuple[str, float, float]]:
        return [c for c in self.calls if c[0] == os.fspath(path)]


def test_dirsync_each_caller_waits_for_an_fsync_that_began_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = SlowSyncs(0.05)
    monkeypatch.setattr(_atomic, "fsync_dir", syncs)
    ds = DirSync(os.fspath(tmp_path))
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    def caller() -> None:
        called = time.monotonic()
        ds.sync()
        with lock:
            spans.append((called, time.monotonic()))

    threads = [threading.Thread(target=caller) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(spans) == 12
    # Shared: far fewer fsyncs than callers (one running, the rest grouped into the next).
    assert ds.syncs == len(syncs.calls) < 12
    for called, returned in spans:
        # Some fsync began after this caller asked and ended before it returned.
        assert any(called <= s and e <= returned for _, s, e in syncs.calls), (called, returned)


def test_dirsync_failure_reaches_the_callers_it_was_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_atomic, "fsync_dir", SlowSyncs(0.0, fail=True))
    ds = DirSync(os.fspath(tmp_path))
    with pytest.raises(OSError, match="Input/output"):
        ds.sync()


@pytest.mark.anyio
async def test_entries_committed_together_share_directory_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = SlowSyncs(0.03)
    monkeypatch.setattr(_atomic, "fsync_dir", syncs)
    root = tmp_path / "c"
    fs = FilesystemCache(root)
    img = cache.image(random.image(64 * 1024, 16), fs)
    layers = await img.layers()
    async with anyio.create_task_group() as tg:
        for layer in layers:

            async def read(x: cache.Layer = layer) -> None:
                await drain(await x.compressed())

            tg.start_soon(read)
    names = entries(root)
    assert len([n for n in names if n.startswith("sha256")]) >= 16
    # Every entry durable, with far fewer fsyncs of the entries' directory than entries.
    assert 1 <= len(syncs.of(root)) < 16
    # The bytes are right (the fsync grouping changed nothing of what landed).
    for layer in layers:
        d = await layer.digest()
        data = (root / d.filename).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == str(d)


class Hops:
    """Counts ``anyio.to_thread.run_sync`` jobs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real = anyio.to_thread.run_sync

        async def counted(*args: object, **kw: object) -> object:
            self.n += 1
            return await real(*args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(anyio.to_thread, "run_sync", counted)


@pytest.mark.anyio
async def test_thread_jobs_per_blob_warm_cache_into_a_new_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 24
    fs = FilesystemCache(tmp_path / "c")
    src = random.image(32 * 1024, n)
    await layout.write(tmp_path / "first", cache.image(src, fs))  # fills the cache
    # A new cache object over the same directory (another process's view): entries are
    # proven by their proof files, not by this process's memory.
    fs2 = FilesystemCache(tmp_path / "c")
    hops = Hops(monkeypatch)
    await layout.write(tmp_path / "second", cache.image(src, fs2))
    # Per blob: one job to look the entry up and open it, one to check the layout and
    # create the temp file (the copy and the commit run on the file's own executor).
    # Before: lookup, open, check, create temp, proof: five.
    assert hops.n <= 2 * (n + 2) + 12, hops.n


@pytest.mark.anyio
async def test_thread_jobs_per_blob_cold_fill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 24
    fs = FilesystemCache(tmp_path / "c")
    src = random.image(32 * 1024, n)
    await fs.sweep()  # set the cache up before counting
    hops = Hops(monkeypatch)
    await layout.write(tmp_path / "out", cache.image(src, fs))
    # Per blob: create the entry's temp file; check the layout and create its temp file.
    # Commits are one job each on the files' executors. Before: seven or more.
    assert hops.n <= 2 * (n + 2) + 12, hops.n


def test_a_pull_into_a_layout_imports_only_its_own_modules(tmp_path: Path) -> None:
    """Start-up: ``pull`` loads neither the fleet, the tarball format, nor the other
    commands (each costs import time on every run); ``--fleet`` would."""
    import subprocess
    import sys

    src = tmp_path / "src"
    asyncio_run = (
        "import asyncio\n"
        "from aiolayercache import layout, random\n"
        f"asyncio.run(layout.write({str(src)!r}, random.image(1024, 2), ref_name='x'))\n"
    )
    subprocess.run([sys.executable, "-c", asyncio_run], check=True, timeout=60)
    probe = (
        "import sys\n"
        "from aiolayercache.cli import main\n"
        f"code = main(['pull', 'oci:{src}:x', {str(tmp_path / 'dest')!r}, "
        f"'--cache-dir', {str(tmp_path / 'c')!r}, '-q'])\n"
        "print(code)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('aiolayercache'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out[-2] == "0", out
    loaded = set(out[-1].split())
    assert "aiolayercache.cli._pull" in loaded  # the probe ran the pull it meant to
    for lazy in (
        "aiolayercache.fleet",
        "aiolayercache.tarball",
        "aiolayercache.cli._copy",
        "aiolayercache.cli._login",
    ):
        assert lazy not in loaded, lazy
