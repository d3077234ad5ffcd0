from __future__ import annotations

import gzip
import os
import zlib

import anyio
import pytest
import zstandard

from aiolayercache import DecompressionError, DigestMismatchError, Hash, SizeMismatchError
from aiolayercache.streams import (
    BytesStream,
    GunzipStream,
    GzipStream,
    VerifyingStream,
    ZstdDecompressStream,
    decompress,
    read_all,
)

pytestmark = pytest.mark.anyio

DATA = os.urandom(3 * 1024 * 1024 + 123)


async def test_bytes_stream_honours_max_bytes() -> None:
    s = BytesStream(b"abcdef")
    assert await s.receive(4) == b"abcd"
    assert await s.receive(4) == b"ef"
    with pytest.raises(anyio.EndOfStream):
        await s.receive()


async def test_gunzip_inflates_chunkwise_and_across_members() -> None:
    blob = gzip.compress(DATA[:1000]) + gzip.compress(DATA[1000:])
    out = await read_all(GunzipStream(BytesStream(blob, 4096)))
    assert out == DATA


async def test_gunzip_truncated_raises() -> None:
    blob = gzip.compress(DATA)[:-100]
    with pytest.raises(DecompressionError, match="ends"):
        await read_all(GunzipStream(BytesStream(blob)))


async def test_gunzip_corrupt_raises() -> None:
    blob = bytearray(gzip.compress(b"x" * 100000))
    blob[20:40] = b"\xff" * 20
    with pytest.raises(DecompressionError):
        await read_all(GunzipStream(BytesStream(bytes(blob))))


async def test_zstd_inflates_frames() -> None:
    c = zstandard.ZstdCompressor()
    blob = c.compress(DATA[:5000]) + c.compress(DATA[5000:])
    assert await read_all(ZstdDecompressStream(BytesStream(blob, 7000))) == DATA


async def test_decompress_sniffs_magic() -> None:
    assert await read_all(await decompress(BytesStream(gzip.compress(b"hello")))) == b"hello"
    z = zstandard.ZstdCompressor().compress(b"hello")
    assert await read_all(await decompress(BytesStream(z))) == b"hello"
    assert await read_all(await decompress(BytesStream(b"plain tar"))) == b"plain tar"
    assert await read_all(await decompress(BytesStream(b""))) == b""


async def test_gzip_on_the_fly_is_deterministic_and_inflates() -> None:
    a = await read_all(GzipStream(BytesStream(DATA)))
    b = await read_all(GzipStream(BytesStream(DATA, 5000)))
    assert a == b
    assert zlib.decompress(a, 31) == DATA


async def test_verifying_stream_passes_good_bytes() -> None:
    s = VerifyingStream(BytesStream(DATA), Hash.of(DATA), len(DATA))
    assert await read_all(s) == DATA


async def test_verifying_stream_never_releases_the_last_chunk_of_bad_bytes() -> None:
    bad = DATA[:-1] + bytes([DATA[-1] ^ 1])
    got = bytearray()
    s = VerifyingStream(BytesStream(bad), Hash.of(DATA), len(DATA))
    with pytest.raises(DigestMismatchError) as ei:
        async with s:
            async for chunk in s:
                got += chunk
    assert len(got) < len(DATA)  # the consumer never had all the bytes
    assert ei.value.expected == Hash.of(DATA)


async def test_verifying_stream_short_and_long() -> None:
    with pytest.raises(SizeMismatchError):
        await read_all(VerifyingStream(BytesStream(DATA[:-5]), Hash.of(DATA), len(DATA)))
    with pytest.raises(SizeMismatchError):
        await read_all(VerifyingStream(BytesStream(DATA + b"x"), Hash.of(DATA), len(DATA)))


async def test_verifying_stream_without_size_checks_digest() -> None:
    with pytest.raises(DigestMismatchError):
        await read_all(VerifyingStream(BytesStream(b"abc"), Hash.of(b"abd")))
    assert await read_all(VerifyingStream(BytesStream(b""), Hash.of(b""), 0)) == b""


class RecordingSink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.events: list[str] = []

    async def write(self, chunk: bytes) -> None:
        self.data += chunk

    async def commit(self) -> None:
        self.events.append("commit")

    async def abort(self) -> None:
        self.events.append("abort")


async def test_sink_committed_before_the_last_chunk_is_released() -> None:
    sink = RecordingSink()
    s = VerifyingStream(BytesStream(DATA), Hash.of(DATA), len(DATA), sinks=[sink])
    seen_commit_before_end = False
    async with s:
        async for _ in s:
            pass
        seen_commit_before_end = sink.events == ["commit"]
    assert seen_commit_before_end
    assert bytes(sink.data) == DATA


async def test_sink_aborted_on_early_close_and_on_mismatch() -> None:
    sink = RecordingSink()
    s = VerifyingStream(BytesStream(DATA), Hash.of(DATA), len(DATA), sinks=[sink])
    await s.receive()
    await s.aclose()
    assert sink.events == ["abort"]
    sink2 = RecordingSink()
    with pytest.raises(DigestMismatchError):
        await read_all(VerifyingStream(BytesStream(DATA), Hash.of(b"x"), sinks=[sink2]))
    assert sink2.events == ["abort"]
