"""Cache upkeep: ls, verify, prune, sweep of stale temp files (lock-based)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from aiolayercache import Hash, LayerNotFoundError, cache, random
from aiolayercache._atomic import AtomicFile
from aiolayercache.cache import FilesystemCache
from aiolayercache.streams import drain

from .conftest import entries, temps

pytestmark = pytest.mark.anyio


async def fill(fs: FilesystemCache, n: int, size: int = 20 * 1024) -> list[Hash]:
    out = []
    for i in range(n):
        layer = random.layer(size, seed=100 + i)
        await drain(await (await fs.put(layer)).compressed())
        out.append(await layer.digest())
    return out


async def test_entries_lists_sizes_kinds_and_last_use(tmp_path: Path) -> None:
    fs = FilesystemCache(tmp_path)
    hs = await fill(fs, 3)
    es = await fs.entries()
    assert {e.digest for e in es} == set(hs)
    for e in es:
        assert e.size == (tmp_path / e.digest.filename).stat().st_size
        assert e.kind == "gzip"
        assert abs(e.last_used - time.time()) < 60


async def test_verify_removes_corrupt_entries_and_stale_temps(tmp_path: Path) -> None:
    fs = FilesystemCache(tmp_path)
    hs = await fill(fs, 3)
    bad = tmp_path / hs[1].filename
    data = bytearray(bad.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    stale = tmp_path / ".aiolayercache" / "tmp" / ".dead.0000.tmp"
    stale.write_bytes(b"left by a killed writer")
    live = AtomicFile(str(tmp_path / "x"), str(tmp_path / ".aiolayercache" / "tmp"), durable=False)
    await live.open()  # a live writer: holds its lock
    try:
        report = await fs.verify()
        assert report.ok == 2
        assert report.removed == [hs[1]]
        assert report.temps_removed == 1
        assert not bad.exists() and not stale.exists()
        assert os.path.exists(live.tmp)
    finally:
        await live.discard()
    assert temps(tmp_path) == []


async def test_prune_by_size_removes_least_recently_used_first(tmp_path: Path) -> None:
    fs = FilesystemCache(tmp_path)
    hs = await fill(fs, 4)
    meta = tmp_path / ".aiolayercache" / "meta"
    for i, h in enumerate(hs):  # h0 oldest ... h3 newest
        t = time.time() - 1000 + i * 100
        os.utime(meta / (h.filename + ".json"), (t, t))
        os.utime(tmp_path / h.filename, (t - 5000, t - 5000))
    sizes = {e.digest: e.size for e in await fs.entries()}
    budget = sizes[hs[2]] + sizes[hs[3]]
    removed = await fs.prune(max_bytes=budget)
    assert [e.digest for e in removed] == [hs[0], hs[1]]
    assert set(entries(tmp_path)) == {hs[2].filename, hs[3].filename}
    removed = await fs.prune(older_than=750)  # h2 was used 800 s ago, h3 700 s ago
    assert [e.digest for e in removed] == [hs[2]]


async def test_reads_record_use_without_writing_entries(tmp_path: Path) -> None:
    fs = FilesystemCache(tmp_path)
    img = random.image(20 * 1024, 1)
    await drain(await (await cache.image(img, fs).layers())[0].compressed())
    h = await (await img.layers())[0].digest()
    meta = tmp_path / ".aiolayercache" / "meta" / (h.filename + ".json")
    os.utime(meta, (1000, 1000))
    from aiolayercache.cache import _proofs

    _proofs._USED.clear()  # this process's "recorded a use a moment ago" memory
    entry_mtime = (tmp_path / h.filename).stat().st_mtime_ns
    await drain(await (await cache.image(img, FilesystemCache(tmp_path)).layers())[0].compressed())
    assert meta.stat().st_mtime > 1000
    assert (tmp_path / h.filename).stat().st_mtime_ns == entry_mtime  # proof still holds


async def test_stale_temps_are_swept_at_first_use_and_by_sweep(tmp_path: Path) -> None:
    tmp = tmp_path / ".aiolayercache" / "tmp"
    tmp.mkdir(parents=True)
    stale = tmp / ".abc.1234.tmp"
    stale.write_bytes(b"x")
    fs = FilesystemCache(tmp_path)
    with pytest.raises(LayerNotFoundError):
        await fs.get(Hash.of(b"absent"))  # first use
    assert not stale.exists()
    stale.write_bytes(b"y")
    assert await fs.sweep() == 1
    assert not stale.exists()
