"""Per-entry cost: one worker-thread job per phase of an entry, one directory fsync per batch.

Counted, never timed: how many fsyncs of a directory ran and how many
``anyio.to_thread`` jobs a pull makes per blob.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from aiolayercache import _atomic, _dirs, cache, layout, random
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


def test_dirsync_an_fsync_begins_after_every_caller_and_they_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = SlowSyncs(0.05)
    monkeypatch.setattr(_dirs, "fsync_dir", syncs)
    ds = DirSync(os.fspath(tmp_path))
    calls: list[float] = []
    lock = threading.Lock()

    def caller() -> None:
        with lock:
            calls.append(time.monotonic())
        ds.sync()

    threads = [threading.Thread(target=caller) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 12 and not any(t.is_alive() for t in threads)
    # Shared: far fewer fsyncs than callers (one running, the rest batched into the next).
    assert ds.syncs == len(syncs.calls) < 12
    for called in calls:
        # Once every caller returned, an fsync that began after each call has finished.
        assert any(called <= s for _, s, _ in syncs.calls), called


def test_dirsync_failure_reaches_the_caller_that_ran_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_dirs, "fsync_dir", SlowSyncs(0.0, fail=True))
    ds = DirSync(os.fspath(tmp_path))
    with pytest.raises(OSError, match="Input/output"):
        ds.sync()


@pytest.mark.anyio
async def test_entries_committed_together_share_directory_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = SlowSyncs(0.03)
    monkeypatch.setattr(_dirs, "fsync_dir", syncs)
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


@pytest.mark.anyio
async def test_a_sweep_right_before_the_rename_cannot_take_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit renames while it still holds the temp file's lock: another writer's
    start-up sweep (which removes unlocked temps) running in that instant spares it.
    (Seen as FileNotFoundError from concurrent ``layout.write_all`` into one layout.)"""
    f = _atomic.AtomicFile(str(tmp_path / "final"), str(tmp_path), durable=True, tag="t")
    await f.open()
    await f.write(b"x" * 1000)
    real_replace = os.replace
    swept: list[list[str]] = []

    def replace_after_a_sweep(src: str, dst: str) -> None:
        swept.append(_atomic.sweep_temps(str(tmp_path), ours_only=True))
        real_replace(src, dst)

    monkeypatch.setattr(_atomic.os, "replace", replace_after_a_sweep)
    await f.commit()
    assert swept == [[]]
    assert (tmp_path / "final").read_bytes() == b"x" * 1000


@pytest.mark.anyio
async def test_concurrent_writers_of_one_layout_write_a_shared_blob_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 ``layout.write`` calls at once into one layout, of images that share blobs: each
    blob lands once (one writer writes it, the others wait for it and reuse it), and no
    writer's start-up sweep takes another's temp file."""
    img = random.image(256 * 1024, 2)
    dest = tmp_path / "layout"
    temps: list[str] = []
    real_open = _atomic.AtomicFile.open_sync

    def counted(self: _atomic.AtomicFile) -> None:
        temps.append(self.final)
        real_open(self)

    monkeypatch.setattr(_atomic.AtomicFile, "open_sync", counted)

    async with anyio.create_task_group() as tg:
        for i in range(32):
            tg.start_soon(lambda i=i: layout.write(dest, img, ref_name=f"img{i}"))
    blob_temps = [p for p in temps if os.sep + "blobs" + os.sep in p]
    # Two layers, a config and a manifest: four blobs, each written once.
    assert len(set(blob_temps)) == 4 and len(blob_temps) == 4, sorted(blob_temps)
    names = {
        m["annotations"]["org.opencontainers.image.ref.name"]
        for m in json.loads((dest / "index.json").read_text())["manifests"]
    }
    assert names == {f"img{i}" for i in range(32)}


# --- a layout links the cache entries it filled -----------------------------------


def _blob(dest: Path, d: object) -> Path:
    h = str(d).split(":")
    return dest / "blobs" / h[0] / h[1]


@pytest.mark.anyio
async def test_a_layout_links_the_entries_it_filled_and_link_false_copies(
    tmp_path: Path,
) -> None:
    fs = FilesystemCache(tmp_path / "c")
    src = random.image(200 * 1024, 3)
    await layout.write(tmp_path / "linked", cache.image(src, fs))
    await layout.write(
        tmp_path / "copied", cache.image(random.image(200 * 1024, 2), fs), link=False
    )
    for layer in await src.layers():
        d = await layer.digest()
        blob, entry = _blob(tmp_path / "linked", d), tmp_path / "c" / d.filename
        assert blob.stat().st_ino == entry.stat().st_ino  # one file, two names
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == str(d)
    for p in (tmp_path / "copied" / "blobs" / "sha256").iterdir():
        assert p.stat().st_nlink == 1


@pytest.mark.anyio
async def test_an_entry_replaced_before_the_link_never_reaches_the_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the entry's commit and the layout's link, another process renames a file of
    the same size (wrong bytes) over the entry's name, again and again (so the freed inode
    number may come back): the layout links the very file the tee hashed, by descriptor,
    never what the name holds by then. (The attack: 5 runs in 10 got wrong blobs when the
    link went by path and checked the inode number.)"""
    fs = FilesystemCache(tmp_path / "c")
    src = random.image(100 * 1024, 3)
    layers = await src.layers()
    real_link_fd = _atomic.link_fd
    swapped: list[int] = []

    def swap_then_link(fd: int, dst: str) -> bool:
        for layer_file in (tmp_path / "c").glob("sha256:*"):
            for _ in range(3):  # a few rounds: freed inode numbers get reused
                bad = tmp_path / f"bad-{os.urandom(8).hex()}"
                bad.write_bytes(b"E" * layer_file.stat().st_size)
                os.replace(bad, layer_file)
                swapped.append(1)
        return real_link_fd(fd, dst)

    monkeypatch.setattr(_atomic, "link_fd", swap_then_link)
    await layout.write(tmp_path / "out", cache.image(src, fs))
    assert swapped
    for layer in layers:
        d = await layer.digest()
        blob = _blob(tmp_path / "out", d)
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == str(d)


@pytest.mark.anyio
async def test_when_the_cache_cannot_keep_an_entry_the_layout_still_gets_the_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The entry's temp file cannot be written (ENOSPC): nothing to link, so the blob is
    read once more from upstream (not through the cache: one 'not caching', one fill)."""
    fs = FilesystemCache(tmp_path / "c")
    src = random.image(300 * 1024, 2)
    real_open = _atomic.AtomicFile.open_sync

    def no_space(self: _atomic.AtomicFile) -> None:
        if "/c/" in self.final:
            raise OSError(28, "No space left on device")
        real_open(self)

    monkeypatch.setattr(_atomic.AtomicFile, "open_sync", no_space)
    with caplog.at_level(logging.WARNING, logger="aiolayercache.cache"):
        await layout.write(tmp_path / "out", cache.image(src, fs))
    said = [r.getMessage() for r in caplog.records if "not caching" in r.getMessage()]
    for layer in await src.layers():
        d = await layer.digest()
        assert sum(str(d) in m for m in said) == 1, said  # one attempt to cache it, not two
    assert fs.write_errors == len(said)
    for layer in await src.layers():
        d = await layer.digest()
        data = _blob(tmp_path / "out", d).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == str(d)


@pytest.mark.anyio
async def test_a_warm_entry_is_linked_after_it_hashes_right(tmp_path: Path) -> None:
    fs = FilesystemCache(tmp_path / "c")
    src = random.image(200 * 1024, 2)
    await layout.write(tmp_path / "first", cache.image(src, fs), link=False)
    fs2 = FilesystemCache(tmp_path / "c")  # another process's view: proofs from disk
    await layout.write(tmp_path / "second", cache.image(src, fs2))
    for layer in await src.layers():
        d = await layer.digest()
        assert _blob(tmp_path / "second", d).stat().st_ino == (
            (tmp_path / "c" / d.filename).stat().st_ino
        )
    # No temp names left behind by the links.
    assert not [p for p in (tmp_path / "second" / "blobs" / "sha256").iterdir() if "tmp" in p.name]


@pytest.mark.anyio
async def test_a_rotted_warm_entry_is_never_linked(tmp_path: Path) -> None:
    """Bit rot that keeps size and mtime: the proof still holds, so only the hash of what
    the link would publish catches it; the entry is condemned and the blob fetched anew."""
    fs = FilesystemCache(tmp_path / "c")
    src = random.image(200 * 1024, 1)
    await layout.write(tmp_path / "first", cache.image(src, fs), link=False)
    (layer,) = await src.layers()
    d = await layer.digest()
    entry = tmp_path / "c" / d.filename
    st = entry.stat()
    with open(entry, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\x00\xff")
    os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.link(entry, tmp_path / "rotted")  # keeps the inode (its number is not reused)
    fs2 = FilesystemCache(tmp_path / "c")
    await layout.write(tmp_path / "second", cache.image(src, fs2))
    blob = _blob(tmp_path / "second", d)
    assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == str(d)
    assert blob.stat().st_ino != st.st_ino  # not the rotted inode


@pytest.mark.anyio
async def test_a_pull_again_into_the_same_layout_rewrites_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up and "again": nothing new means no index.json rewrite and no fsync; an
    image pulled again under its name keeps its place in index.json."""
    fs = FilesystemCache(tmp_path / "c")
    a, b = random.image(1024, 1), random.image(1024, 1)
    dest = tmp_path / "out"
    await layout.write(dest, cache.image(a, fs), ref_name="a")
    await layout.write(dest, cache.image(b, fs), ref_name="b")
    before = (dest / "index.json").read_bytes()
    st = (dest / "index.json").stat()
    syncs = SlowSyncs(0.0)
    monkeypatch.setattr(_dirs, "fsync_dir", syncs)
    monkeypatch.setattr(_atomic, "fsync_dir", syncs)
    await layout.write(dest, cache.image(a, fs), ref_name="a")
    assert (dest / "index.json").read_bytes() == before
    assert (dest / "index.json").stat().st_ino == st.st_ino  # not replaced
    assert syncs.calls == []


@pytest.mark.anyio
async def test_prune_says_what_it_freed_when_layouts_link_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aiolayercache.cli import main

    fs = FilesystemCache(tmp_path / "c")
    src = random.image(100 * 1024, 2)
    await layout.write(tmp_path / "out", cache.image(src, fs))
    infos = await fs.entries()
    layer_digests = {await x.digest() for x in await src.layers()}
    assert all(e.links == 2 for e in infos if e.digest in layer_digests)
    capsys.readouterr()
    # (the CLI runs its own event loop: in a thread, as this test has one)
    code = await anyio.to_thread.run_sync(
        main, ["cache", "prune", "--max-size", "0", "--cache-dir", str(tmp_path / "c")]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "still held by layouts that link them" in out, out
    # The layout is whole after its entries went.
    for d in layer_digests:
        data = _blob(tmp_path / "out", d).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == str(d)


@pytest.mark.anyio
async def test_a_full_disk_under_a_layout_names_the_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiolayercache.layout import LayoutError

    async def no_space(self: _atomic.AtomicFile, chunk: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_atomic.AtomicFile, "write", no_space)
    with pytest.raises(LayoutError, match=r"blobs/sha256/[0-9a-f]{64}: cannot write blob .*space"):
        await layout.write(tmp_path / "out", random.image(100 * 1024, 1), link=False)


def test_ctrl_c_outside_a_command_exits_130_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C during start-up (argument parsing, imports) or at exit: no traceback."""
    import aiolayercache.cli as cli

    def interrupted() -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    with pytest.raises(SystemExit) as exc:
        cli.run()
    assert exc.value.code == cli.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "aiolayercache: interrupted\n"


@pytest.mark.anyio
async def test_no_link_possible_copies_the_entry_not_the_upstream_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cache and layout on different filesystems (no link): each blob is copied from the
    entry the tee just filled, hashing what lands; the upstream is read once, not twice."""
    from aiolayercache.cache import _fs

    reopened: list[int] = []
    real_filled = _fs.FilledEntry

    def counting(take: object, durable: bool, reopen: object) -> object:
        async def again() -> object:
            reopened.append(1)
            return await reopen()  # type: ignore[operator]

        return real_filled(take, durable, again)  # type: ignore[arg-type]

    monkeypatch.setattr(_fs, "FilledEntry", counting)
    monkeypatch.setattr(_atomic, "link_fd", lambda fd, dst: False)
    fs = FilesystemCache(tmp_path / "c")
    src = random.image(300 * 1024, 3)
    await layout.write(tmp_path / "out", cache.image(src, fs))
    assert reopened == []
    for layer in await src.layers():
        d = await layer.digest()
        blob = _blob(tmp_path / "out", d)
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == str(d)
        assert blob.stat().st_nlink == 1
