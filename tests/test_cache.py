"""The cache: go-containerregistry's cache test scenarios, then ours."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ByteReceiveStream

from aiolayercache import (
    CacheDirectoryError,
    DigestMismatchError,
    Hash,
    Image,
    Layer,
    LayerNotFoundError,
    MediaType,
    cache,
    random,
    validate,
)
from aiolayercache.cache import FilesystemCache, MemoryCache
from aiolayercache.streams import drain, read_all

from .conftest import Source, entries, temps

pytestmark = pytest.mark.anyio


def file_sha256(p: Path) -> str:
    return "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()


# --- go-containerregistry's scenarios ----------------------------------------------


@pytest.mark.parametrize("kind", ["fs", "memory"])
async def test_validate_image_twice_through_cache(tmp_path: Path, kind: str) -> None:
    src = Source(random.image(300 * 1024, 3))
    c = FilesystemCache(tmp_path) if kind == "fs" else MemoryCache()
    img = cache.image(src.image(), c)
    await validate.image(img)
    first = src.layer_opens
    assert first > 0
    await validate.image(img)  # to hit the cache
    assert src.layer_opens == first  # nothing read upstream the second time


@pytest.mark.parametrize("kind", ["fs", "memory"])
async def test_validate_index_twice_through_cache(tmp_path: Path, kind: str) -> None:
    ii = random.index(50 * 1024, 2, 3)
    c = FilesystemCache(tmp_path) if kind == "fs" else MemoryCache()
    await validate.index(cache.image_index(ii, c))
    await validate.index(cache.image_index(ii, c))
    if kind == "fs":
        assert len(entries(tmp_path)) == 12  # 6 layers x (compressed + uncompressed)
        assert len(entries(tmp_path, configs=True)) == 15  # and the 3 configs


async def test_layers_are_lazy(tmp_path: Path) -> None:
    src = Source(random.image(10 * 1024, 3))
    img = cache.image(src.image(), FilesystemCache(tmp_path))
    layers = await img.layers()
    assert entries(tmp_path) == []  # nothing cached until read
    await drain(await layers[0].compressed())
    assert entries(tmp_path) == [(await layers[0].digest()).filename]


class NoLayerByDigest:
    """An image whose layer_by_digest always fails (ggcr's fakeImage)."""

    def __init__(self, inner: Image) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def layer_by_digest(self, h: Hash) -> Layer:
        raise AssertionError("layer_by_digest of the wrapped image was called")


async def test_cached_layer_short_circuits_layer_by_digest(tmp_path: Path) -> None:
    img = random.image(10 * 1024, 1)
    fs = FilesystemCache(tmp_path)
    layer = (await img.layers())[0]
    await drain(await (await fs.put(layer)).compressed())
    wrapped = cache.image(NoLayerByDigest(img), fs)  # type: ignore[arg-type]
    got = await wrapped.layer_by_digest(await layer.digest())
    assert await got.digest() == await layer.digest()
    assert await read_all(await got.compressed()) == await read_all(await layer.compressed())


async def test_n_entries_then_2n_each_named_by_its_sha256(tmp_path: Path) -> None:
    n = 4
    img = cache.image(random.image(20 * 1024, n), FilesystemCache(tmp_path))
    for layer in await img.layers():
        await drain(await layer.compressed())
    assert len(entries(tmp_path)) == n
    for layer in await img.layers():
        await drain(await layer.uncompressed())
    names = entries(tmp_path)
    assert len(names) == 2 * n
    for name in names:
        assert file_sha256(tmp_path / name) == name
    digests = {(await x.digest()).filename for x in await img.layers()}
    diff_ids = {(await x.diff_id()).filename for x in await img.layers()}
    assert set(names) == digests | diff_ids


async def test_delete_then_read_restores(tmp_path: Path) -> None:
    src = Source(random.image(20 * 1024, 1))
    fs = FilesystemCache(tmp_path)
    layer = (await cache.image(src.image(), fs).layers())[0]
    want = await read_all(await layer.compressed())
    h = await layer.digest()
    await fs.delete(h)
    assert entries(tmp_path) == []
    assert await read_all(await layer.compressed()) == want
    assert entries(tmp_path) == [h.filename]
    assert src.layer_opens == 2


@pytest.mark.parametrize("kind", ["fs", "memory"])
async def test_get_and_delete_of_absent_hash(tmp_path: Path, kind: str) -> None:
    c = FilesystemCache(tmp_path) if kind == "fs" else MemoryCache()
    h = Hash.of(b"nothing")
    with pytest.raises(LayerNotFoundError):
        await c.get(h)
    with pytest.raises(LayerNotFoundError) as ei:
        await c.delete(h)
    assert isinstance(ei.value, LookupError)
    assert str(h) in str(ei.value)


async def test_truncated_entry_is_not_found_and_refetched(tmp_path: Path) -> None:
    src = Source(random.image(200 * 1024, 1))
    fs = FilesystemCache(tmp_path)
    img = cache.image(src.image(), fs)
    layer = (await img.layers())[0]
    want = await read_all(await layer.compressed())
    h = await layer.digest()
    p = tmp_path / h.filename
    p.write_bytes(p.read_bytes()[:1000])  # truncated by a crash or another tool
    with pytest.raises(LayerNotFoundError):
        await fs.get(h)
    assert not p.exists()  # the bad entry was removed
    assert await read_all(await layer.compressed()) == want  # refetched transparently
    assert src.layer_opens == 2
    assert file_sha256(p) == str(h)


async def test_read_only_put_and_delete_do_nothing(tmp_path: Path) -> None:
    fs = FilesystemCache(tmp_path)
    layer = random.layer(10 * 1024)
    ro = cache.read_only(fs)
    assert await ro.put(layer) is layer
    await drain(await (await ro.put(layer)).compressed())
    assert entries(tmp_path) == []
    await drain(await (await fs.put(layer)).compressed())
    await ro.delete(await layer.digest())
    assert entries(tmp_path) == [(await layer.digest()).filename]
    got = await ro.get(await layer.digest())
    assert await got.digest() == await layer.digest()


# --- ours -------------------------------------------------------------------------


async def test_source_with_wrong_bytes_raises_and_commits_nothing(tmp_path: Path) -> None:
    src = Source(random.image(500 * 1024, 1))
    config = await src.image().config_name()
    layer_digest = next(h for h in src.blobs if h != config)
    src.corrupt.add(layer_digest)
    img = cache.image(src.image(), FilesystemCache(tmp_path))
    layer = (await img.layers())[0]
    with pytest.raises(DigestMismatchError) as ei:
        await read_all(await layer.compressed())
    assert str(layer_digest) in str(ei.value)
    assert entries(tmp_path) == []
    assert temps(tmp_path) == []


async def test_early_close_leaves_nothing(tmp_path: Path) -> None:
    src = Source(random.image(2 * 1024 * 1024, 1))
    img = cache.image(src.image(), FilesystemCache(tmp_path))
    layer = (await img.layers())[0]
    s = await layer.compressed()
    await s.receive()
    await s.receive()
    assert len(temps(tmp_path)) == 1  # a fill is under way
    await s.aclose()
    assert entries(tmp_path) == []
    assert temps(tmp_path) == []
    assert all(x.closed for x in src.streams)  # the upstream was released too


async def test_cancellation_mid_read_leaves_nothing(tmp_path: Path) -> None:
    src = Source(random.image(4 * 1024 * 1024, 1))
    img = cache.image(src.image(), FilesystemCache(tmp_path))
    layer = (await img.layers())[0]
    got = 0

    async def reader() -> None:
        nonlocal got
        async with await layer.compressed() as s:
            async for chunk in s:
                got += len(chunk)

    with anyio.move_on_after(10) as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            for _ in range(10_000):  # bounded: wait until the reader is mid-stream
                if got:
                    break
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    assert not outer.cancelled_caught
    assert 0 < got < await layer.size()
    assert entries(tmp_path) == []
    assert temps(tmp_path) == []
    # And the next read fills the cache normally.
    await drain(await layer.compressed())
    assert entries(tmp_path) == [(await layer.digest()).filename]


@pytest.mark.parametrize("same_object", [True, False])
async def test_50_concurrent_readers_make_one_upstream_read(
    tmp_path: Path, same_object: bool
) -> None:
    src = Source(random.image(1024 * 1024, 1))
    want: bytes | None = None
    results: list[bytes] = []
    shared = FilesystemCache(tmp_path)

    async def reader() -> None:
        fs = shared if same_object else FilesystemCache(tmp_path)
        layer = (await cache.image(src.image(), fs).layers())[0]
        results.append(await read_all(await layer.compressed()))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(reader)
    want = next(v for k, v in src.blobs.items() if len(v) > 1024 * 1024)
    assert src.layer_opens == 1
    assert len(results) == 50
    assert all(r == want for r in results)
    assert len(entries(tmp_path)) == 1
    assert temps(tmp_path) == []


async def test_waiters_take_over_when_the_filler_fails(tmp_path: Path) -> None:
    src = Source(random.image(1024 * 1024, 1))
    layer_digest = next(h for h in src.blobs if len(src.blobs[h]) > 1024 * 1024)
    src.fail_once.add(layer_digest)
    fs = FilesystemCache(tmp_path)
    outcomes: list[object] = []

    async def reader() -> None:
        layer = (await cache.image(src.image(), fs).layers())[0]
        try:
            outcomes.append(await read_all(await layer.compressed()))
        except ConnectionResetError as exc:
            outcomes.append(exc)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(reader)
    failures = [o for o in outcomes if isinstance(o, Exception)]
    assert len(failures) == 1  # only the first filler saw the upstream fail
    assert outcomes.count(src.blobs[layer_digest]) == 9
    assert src.opens[layer_digest] == 2  # one failed fill, one take-over
    assert entries(tmp_path) == [layer_digest.filename]
    assert temps(tmp_path) == []


async def test_prefetch_nested_index_fills_each_layer_once_then_all_hits(
    tmp_path: Path,
) -> None:
    inner = random.index(20 * 1024, 2, 2)
    img = random.image(20 * 1024, 3)
    top = random.index_of([img, inner, img])  # a duplicate child, and a nested index
    fs = FilesystemCache(tmp_path)
    stats = await cache.prefetch(top, fs, concurrency=3)
    assert stats.layers == 7
    assert stats.misses == 7 and stats.hits == 0
    assert stats.bytes_from_cache == 0
    names = entries(tmp_path)
    assert len(names) == 7
    assert stats.bytes_fetched == sum((tmp_path / n).stat().st_size for n in names)
    again = await cache.prefetch(top, fs)
    assert again.hits == 7 and again.misses == 0
    assert again.bytes_fetched == 0
    assert again.bytes_from_cache == stats.bytes_fetched
    unc = await cache.prefetch(top, fs, uncompressed=True)
    assert unc.misses == 7
    assert len(entries(tmp_path)) == 14


async def test_prefetch_reads_each_layer_once(tmp_path: Path) -> None:
    src = Source(random.image(100 * 1024, 4))
    stats = await cache.prefetch(src.image(), FilesystemCache(tmp_path), concurrency=2)
    assert stats.misses == 4
    assert all(n == 1 for n in src.opens.values())
    assert src.layer_opens == 4


async def test_cache_path_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    fs = FilesystemCache(f)  # no I/O until first use
    with pytest.raises(CacheDirectoryError, match="not-a-dir"):
        await fs.get(Hash.of(b"x"))
    below = FilesystemCache(f / "sub")
    with pytest.raises(CacheDirectoryError, match="not-a-dir"):
        await below.put(random.layer(10))
    assert f.read_text() == "x"


async def test_entry_corrupted_after_proof_fails_the_read_and_is_removed(
    tmp_path: Path,
) -> None:
    src = Source(random.image(300 * 1024, 1))
    fs = FilesystemCache(tmp_path)
    layer = (await cache.image(src.image(), fs).layers())[0]
    want = await read_all(await layer.compressed())
    p = tmp_path / (await layer.digest()).filename
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF  # silent corruption: same size, mtime put back
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    got = bytearray()
    with pytest.raises(DigestMismatchError):
        async with await layer.compressed() as s:
            async for chunk in s:
                got += chunk
    assert len(got) < len(want)  # no clean end of stream on bad bytes
    assert not p.exists()
    assert await read_all(await layer.compressed()) == want  # refetched
    assert src.layer_opens == 2


async def test_entries_written_by_another_tool_are_verified_once(tmp_path: Path) -> None:
    layer = random.layer(100 * 1024)
    blob = await read_all(await layer.compressed())
    h = await layer.digest()
    (tmp_path / h.filename).write_bytes(blob)  # as `crane --cache_path` leaves it
    bogus = Hash.of(b"something else")
    (tmp_path / bogus.filename).write_bytes(b"not what the name says")
    fs = FilesystemCache(tmp_path)
    got = await fs.get(h)
    assert await read_all(await got.compressed()) == blob
    assert await got.diff_id() == await layer.diff_id()
    with pytest.raises(LayerNotFoundError):
        await fs.get(bogus)
    assert not (tmp_path / bogus.filename).exists()


async def test_uncompressed_entry_serves_a_gzip_layer(tmp_path: Path) -> None:
    layer = random.layer(100 * 1024)
    fs = FilesystemCache(tmp_path)
    tar = await read_all(await (await fs.put(layer)).uncompressed())
    got = await fs.get(await layer.diff_id())
    assert await got.diff_id() == await layer.diff_id()
    assert await read_all(await got.uncompressed()) == tar
    gz = await read_all(await got.compressed())
    assert Hash.of(gz) == await got.digest()
    assert len(gz) == await got.size()


async def test_zstd_layer_through_the_cache(tmp_path: Path) -> None:
    img = random.image(200 * 1024, 2, layer_media_type=MediaType.OCI_LAYER_ZSTD)
    await validate.image(cache.image(img, FilesystemCache(tmp_path)))
    await validate.image(cache.image(img, FilesystemCache(tmp_path)))
    assert len(entries(tmp_path)) == 4


async def test_disk_full_passes_verified_bytes_through_uncached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from aiofiles.threadpool.binary import AsyncFileIO

    real = AsyncFileIO.write
    written: list[int] = []

    async def enospc(self: AsyncFileIO, chunk: bytes) -> int:
        if sum(written) > 256 * 1024:  # the disk fills up part way through
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(chunk))
        n: int = await real(self, chunk)
        return n

    monkeypatch.setattr(AsyncFileIO, "write", enospc)
    src = Source(random.image(1024 * 1024, 1))
    fs = FilesystemCache(tmp_path)
    layer = (await cache.image(src.image(), fs).layers())[0]
    data = await read_all(await layer.compressed())
    assert Hash.of(data) == await layer.digest()
    assert fs.write_errors == 1  # the config fitted; the layer did not
    assert sum("No space left" in r.getMessage() for r in caplog.records) == 1
    assert entries(tmp_path) == []
    assert temps(tmp_path) == []


async def test_durable_commit_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(a: str, b: str) -> None:
        if ".aiolayercache/meta" not in b:
            calls.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    layer = random.layer(10 * 1024)
    await drain(await (await FilesystemCache(tmp_path).put(layer)).compressed())
    assert calls == ["fsync-file", "rename", "fsync-dir"]
    calls.clear()
    fast = FilesystemCache(tmp_path / "fast", durability="fast")
    await drain(await (await fast.put(layer)).compressed())
    assert calls == ["rename"]


async def test_memory_cache_is_bounded(tmp_path: Path) -> None:
    layers = [random.layer(40 * 1024) for _ in range(5)]
    sizes = [await x.size() for x in layers]
    mc = MemoryCache(max_bytes=sum(sizes[2:]) + 10)  # room for the last three
    for x in layers:
        await drain(await (await mc.put(x)).compressed())
    assert mc.total_bytes <= mc.max_bytes
    assert len(mc) == 3
    with pytest.raises(LayerNotFoundError):
        await mc.get(await layers[0].digest())
    got = await mc.get(await layers[4].digest())
    assert await read_all(await got.compressed()) == await read_all(await layers[4].compressed())


async def test_memory_cache_commits_nothing_on_bad_bytes() -> None:
    class Liar:
        def __init__(self, inner: Layer) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        async def compressed(self) -> ByteReceiveStream:
            from aiolayercache.streams import BytesStream

            data = await read_all(await self.inner.compressed())
            return BytesStream(data[:-1] + bytes([data[-1] ^ 0xFF]))

    layer = random.layer(10 * 1024)
    mc = MemoryCache()
    with pytest.raises(DigestMismatchError):
        await read_all(await (await mc.put(Liar(layer))).compressed())  # type: ignore[arg-type]
    assert len(mc) == 0
