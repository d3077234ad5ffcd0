from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ByteReceiveStream

from aiolayercache import Descriptor, Hash, Image, Manifest, partial
from aiolayercache.streams import ChunkStream


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class SlowStream(ChunkStream):
    """Bytes in small chunks with a yield between them, so other tasks interleave."""

    def __init__(self, data: bytes, chunk: int = 64 * 1024, fail_at: int | None = None) -> None:
        super().__init__()
        self._data = data
        self._pos = 0
        self._chunk = chunk
        self._fail_at = fail_at
        self.closed = False

    async def _next(self) -> bytes | None:
        await anyio.lowlevel.checkpoint()
        if self._fail_at is not None and self._pos >= self._fail_at:
            raise ConnectionResetError("injected failure mid-stream")
        if self._pos >= len(self._data):
            return None
        out = self._data[self._pos : self._pos + self._chunk]
        self._pos += len(out)
        return out

    async def _aclose(self) -> None:
        self.closed = True


class Source:
    """A counting in-memory source for one image: every blob open is counted."""

    def __init__(self, img: Image) -> None:
        self.blobs: dict[Hash, bytes] = dict(img._blobs.blobs)  # type: ignore[attr-defined]
        self.raw: bytes = img._raw  # type: ignore[attr-defined]
        self.opens: Counter[Hash] = Counter()
        self.corrupt: set[Hash] = set()
        self.fail_once: set[Hash] = set()
        self.streams: list[SlowStream] = []

    async def open_blob(self, desc: Descriptor) -> ByteReceiveStream:
        self.opens[desc.digest] += 1
        data = self.blobs[desc.digest]
        fail_at = None
        if desc.digest in self.fail_once:
            self.fail_once.discard(desc.digest)
            fail_at = len(data) // 2
        if desc.digest in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        s = SlowStream(data, fail_at=fail_at)
        self.streams.append(s)
        return s

    def image(self) -> Image:
        config = Manifest.parse(self.raw).config.digest
        return partial.image(self.raw, self.open_blob, raw_config=self.blobs[config])

    @property
    def layer_opens(self) -> int:
        return sum(self.opens.values())


def entries(d: Path, *, configs: bool = False) -> list[str]:
    """Committed layer entries (files named like a digest) in ``d``.

    Image configs are cached too (so a warm pull reads no blob upstream); they
    are left out unless ``configs`` is true.
    """
    out = []
    for n in os.listdir(d):
        if not n.startswith("sha256:"):
            continue
        with open(d / n, "rb") as f:
            is_config = f.read(1) == b"{"
        if configs or not is_config:
            out.append(n)
    return sorted(out)


def temps(d: Path) -> list[str]:
    t = d / ".aiolayercache" / "tmp"
    return sorted(os.listdir(t)) if t.exists() else []


# --- the real registry, a token server and fault proxies (session-wide) -----------------

import asyncio as _asyncio  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass as _dataclass  # noqa: E402

from aiolayercache import ImageIndex, random  # noqa: E402

from .registry import (  # noqa: E402
    FaultProxy,
    Registry,
    TokenServer,
    htpasswd,
    push_image,
    push_index,
    registry_available,
    running_proxy,
    start_registry,
)

USERS = {"alice": "s3cret-Pa55word"}
PLATFORMS = ["linux/amd64", "linux/arm64/v8", "linux/arm/v7", "windows/amd64"]


@_dataclass
class Published:
    small: Image
    big: Image
    oci: Image
    multi: ImageIndex
    small_digest: Hash
    multi_digest: Hash


def _need_registry() -> None:
    if not registry_available():
        if os.environ.get("CI"):
            pytest.fail("docker-registry is missing in CI: .ci/run must install it")
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")


@pytest.fixture(scope="session")
def registry_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry-data")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory, registry_data: Path) -> Iterator[Registry]:
    _need_registry()
    reg = start_registry(tmp_path_factory.mktemp("registry-open"), registry_data)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def published(registry: Registry) -> Published:
    small = random.image(300 * 1024, 3, seed=1)
    big = random.image(3 * 1024 * 1024, 2, seed=2)
    oci = random.image(
        100 * 1024, 2, media_type="application/vnd.oci.image.manifest.v1+json", seed=3
    )
    multi = random.index(64 * 1024, 2, len(PLATFORMS), platforms=PLATFORMS, seed=4)

    async def push() -> tuple[Hash, Hash]:
        d = await push_image(registry.host, "test/small", "v1", small)
        await push_image(registry.host, "test/big", "v1", big)
        await push_image(registry.host, "test/oci", "v1", oci)
        m = await push_index(registry.host, "test/multi", "v1", multi)
        return d, m

    d, m = _asyncio.run(push())
    return Published(small, big, oci, multi, d, m)


@pytest.fixture(scope="session")
def basic_registry(
    tmp_path_factory: pytest.TempPathFactory, registry_data: Path, published: Published
) -> Iterator[Registry]:
    work = tmp_path_factory.mktemp("registry-basic")
    htpasswd(work / "htpasswd", USERS)
    auth = {"htpasswd": {"realm": "aiolayercache-test", "path": str(work / "htpasswd")}}
    reg = start_registry(work, registry_data, auth)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    ts = TokenServer(tmp_path_factory.mktemp("token"), USERS)
    ts.server.start()
    yield ts
    ts.server.stop()


@pytest.fixture(scope="session")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory,
    registry_data: Path,
    published: Published,
    token_server: TokenServer,
) -> Iterator[Registry]:
    reg = start_registry(
        tmp_path_factory.mktemp("registry-token"), registry_data, token_server.registry_auth()
    )
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def _session_proxy(registry: Registry, published: Published) -> Iterator[FaultProxy]:
    with running_proxy(registry.host) as px:
        yield px


@pytest.fixture
def proxy(_session_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The fault proxy in front of the open registry, with no rules and zeroed counts."""
    _session_proxy.reset()
    yield _session_proxy
    _session_proxy.reset()


# --- the fleet tier (tests/test_fleet*.py) -------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Registry]:
    """A fleet store: a registry of its own (storage under tmp_path), for one test."""
    _need_registry()
    reg = start_registry(tmp_path / "fleet-work", tmp_path / "fleet-data")
    yield reg
    reg.stop()


@pytest.fixture
def origin(registry: Registry, published: Published) -> Iterator[FaultProxy]:
    """The session's registry (with the test images) behind a counting fault proxy."""
    with running_proxy(registry.host) as px:
        yield px
