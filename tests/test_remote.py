"""Pulling from the real registry (Debian's docker-registry), directly and through faults."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiolayercache import (
    DigestMismatchError,
    Hash,
    ManifestError,
    MediaType,
    Platform,
    SizeMismatchError,
    cache,
    remote,
    validate,
)
from aiolayercache.cache import FilesystemCache
from aiolayercache.remote import (
    Client,
    Credentials,
    PlatformNotFoundError,
    RemoteError,
    RetryPolicy,
    TransportError,
    UnauthorizedError,
)
from aiolayercache.streams import drain, read_all

from .conftest import USERS, Published, entries, temps
from .registry import FaultProxy, Registry, TokenServer, running_proxy

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05, retry_after_cap=2.0, resumes=6)


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    async with Client(retry=FAST, docker_config=False) as c:
        yield c


def layer_blobs(p: FaultProxy) -> dict[str, int]:
    return {k: v for k, v in p.stats.requests.items() if "/blobs/" in k}


# --- pulling -------------------------------------------------------------------------


async def test_pull_by_tag_through_cache_validates_then_moves_zero_blob_bytes(
    proxy: FaultProxy, published: Published, client: Client, tmp_path: Path
) -> None:
    fs = FilesystemCache(tmp_path)
    img = cache.image(await client.image(f"{proxy.address}/test/small:v1"), fs)
    assert await img.digest() == published.small_digest
    await validate.image(img)
    first = proxy.stats.blob_bytes
    assert first > 3 * 300 * 1024
    assert len(entries(tmp_path, configs=True)) == 7  # 3 layers x 2 forms + the config
    proxy.reset()
    again = cache.image(await client.image(f"{proxy.address}/test/small:v1"), fs)
    await validate.image(again)
    assert proxy.stats.blob_bytes == 0
    assert layer_blobs(proxy) == {}
    assert temps(tmp_path) == []


async def test_pull_by_digest_and_module_helpers(
    registry: Registry, published: Published, tmp_path: Path
) -> None:
    ref = f"{registry.host}/test/small@{published.small_digest}"
    img = await remote.image(ref)  # the event loop's shared client
    assert await img.digest() == published.small_digest
    await validate.image(cache.image(img, FilesystemCache(tmp_path)))
    desc = await remote.get(f"{registry.host}/test/small:v1")
    assert desc.digest == published.small_digest
    assert desc.media_type == MediaType.DOCKER_MANIFEST_SCHEMA2


async def test_oci_image_and_layer_streams(
    registry: Registry, published: Published, client: Client
) -> None:
    img = await client.image(f"{registry.host}/test/oci:v1")
    assert await img.media_type() == MediaType.OCI_MANIFEST_SCHEMA1
    assert await img.digest() == await published.oci.digest()
    for mine, theirs in zip(await img.layers(), await published.oci.layers(), strict=True):
        assert await read_all(await mine.uncompressed()) == await read_all(
            await theirs.uncompressed()
        )


async def test_index_resolves_to_the_asked_platform(
    registry: Registry, published: Published, client: Client
) -> None:
    ref = f"{registry.host}/test/multi:v1"
    ii = await client.index(ref)
    assert await ii.digest() == published.multi_digest
    await validate.index(ii)
    for plat in ["linux/arm64", "linux/arm64/v8", "linux/arm/v7", "windows/amd64"]:
        img = await client.image(ref, platform=plat)
        cf = await img.config_file()
        want = Platform.from_string(plat)
        assert (cf.os, cf.architecture) == (want.os, want.architecture)
    with pytest.raises(PlatformNotFoundError, match="linux/s390x"):
        await client.image(ref, platform="linux/s390x")
    with pytest.raises(ManifestError, match="not an index"):
        await client.index(f"{registry.host}/test/small:v1")


async def test_prefetch_of_a_remote_index(
    proxy: FaultProxy, published: Published, client: Client, tmp_path: Path
) -> None:
    fs = FilesystemCache(tmp_path)
    ii = await client.index(f"{proxy.address}/test/multi:v1")
    stats = await cache.prefetch(ii, fs)
    assert stats.misses == 2 * len(published.multi._blobs.manifests)  # type: ignore[attr-defined]
    assert stats.hits == 0
    again = await cache.prefetch(await client.index(f"{proxy.address}/test/multi:v1"), fs)
    assert again.hits == stats.misses and again.bytes_fetched == 0


async def test_unknown_tag_is_a_typed_error_naming_the_url(
    registry: Registry, client: Client
) -> None:
    with pytest.raises(RemoteError) as ei:
        await client.image(f"{registry.host}/test/small:nope")
    assert ei.value.status == 404
    assert "MANIFEST_UNKNOWN" in ei.value.codes
    assert f"{registry.host}/v2/test/small/manifests/nope" in str(ei.value)


async def test_manifest_digest_is_verified_when_pulled_by_digest(
    proxy: FaultProxy, published: Published, client: Client
) -> None:
    raw = await published.small.raw_manifest()
    tampered = raw.replace(b'"schemaVersion":2', b'"schemaVersion": 2')
    proxy.add("/manifests/", "body", tampered)
    with pytest.raises(DigestMismatchError):
        await client.image(f"{proxy.address}/test/small@{published.small_digest}")
    proxy.add("/manifests/", "body", tampered)
    img = await client.image(f"{proxy.address}/test/small:v1")  # by tag: reported, not checked
    assert await img.digest() == Hash.of(tampered)


async def test_oversized_and_schema1_manifests_are_refused(
    proxy: FaultProxy, client: Client
) -> None:
    proxy.add("/manifests/", "body", b"{" + b" " * (5 * 1024 * 1024) + b"}")
    with pytest.raises(RemoteError, match="cap"):
        await client.get(f"{proxy.address}/test/small:v1")
    schema1 = json.dumps({"schemaVersion": 1, "name": "x", "tag": "v1", "fsLayers": []}).encode()
    proxy.add("/manifests/", "body", schema1)
    with pytest.raises(ManifestError, match="schema 1"):
        await client.get(f"{proxy.address}/test/small:v1")


async def test_media_type_conflicting_with_content_type_is_refused(
    proxy: FaultProxy, client: Client
) -> None:
    proxy.add("/manifests/", "header", {"Content-Type": MediaType.OCI_IMAGE_INDEX})
    with pytest.raises(ManifestError, match="does not match"):
        await client.get(f"{proxy.address}/test/small:v1")


# --- auth ----------------------------------------------------------------------------


async def test_basic_auth(basic_registry: Registry, published: Published, tmp_path: Path) -> None:
    ref = f"{basic_registry.host}/test/small:v1"
    async with Client(retry=FAST, docker_config=False) as anon:
        with pytest.raises(UnauthorizedError) as ei:
            await anon.image(ref)
        assert ei.value.status == 401
    user, pw = next(iter(USERS.items()))
    creds = {basic_registry.host: Credentials(username=user, password=pw)}
    async with Client(retry=FAST, credentials=creds, docker_config=False) as c:
        await validate.image(cache.image(await c.image(ref), FilesystemCache(tmp_path)))
    async with Client(
        retry=FAST, credentials=Credentials(username=user, password="wrong"), docker_config=False
    ) as bad:
        with pytest.raises(UnauthorizedError) as ei:
            await bad.image(ref)
    assert "wrong" not in str(ei.value) and "wrong" not in repr(ei.value)
    assert pw not in repr(Credentials(username=user, password=pw))


async def test_credentials_from_docker_config(
    basic_registry: Registry,
    published: Published,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import base64

    user, pw = next(iter(USERS.items()))
    auth = base64.b64encode(f"{user}:{pw}".encode()).decode()
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {f"http://{basic_registry.host}": {"auth": auth}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    async with Client(retry=FAST) as c:
        img = await c.image(f"{basic_registry.host}/test/small:v1")
        assert await img.digest() == published.small_digest


async def test_token_auth_caches_tokens_per_scope(
    token_registry: Registry, token_server: TokenServer, published: Published, tmp_path: Path
) -> None:
    user, pw = next(iter(USERS.items()))
    token_server.requests = 0
    creds = Credentials(username=user, password=pw)
    async with Client(retry=FAST, credentials=creds, docker_config=False) as c:
        img = await c.image(f"{token_registry.host}/test/small:v1")
        await validate.image(cache.image(img, FilesystemCache(tmp_path)))
        img2 = await c.image(f"{token_registry.host}/test/oci:v1")
        await validate.image(img2)
    # One token per repository scope, reused for every manifest and blob request.
    assert token_server.requests == 2
    token_server.field = "access_token"
    token_server.expires_in = None
    try:
        async with Client(retry=FAST, credentials=creds, docker_config=False) as c:
            img = await c.image(f"{token_registry.host}/test/small:v1")
            assert await img.digest() == published.small_digest
    finally:
        token_server.field = "token"
        token_server.expires_in = 300
    async with Client(retry=FAST, docker_config=False) as anon:
        with pytest.raises(UnauthorizedError, match="refused"):
            await anon.image(f"{token_registry.host}/test/small:v1")


# --- faults --------------------------------------------------------------------------


def _big_layer_path(published: Published) -> str:
    big = max(published.big._blobs.blobs.items(), key=lambda kv: len(kv[1]))  # type: ignore[attr-defined]
    return f"/blobs/{big[0]}"


@pytest.mark.parametrize("code", [500, 502, 503])
async def test_5xx_is_retried(proxy: FaultProxy, client: Client, code: int) -> None:
    proxy.add("/manifests/", "status", (code, {}), times=2)
    img = await client.image(f"{proxy.address}/test/small:v1")
    assert img is not None
    assert proxy.stats.requests["GET /v2/test/small/manifests/v1"] == 3


async def test_5xx_storm_gives_a_typed_error_within_the_budget(
    proxy: FaultProxy, client: Client
) -> None:
    proxy.add("/manifests/", "status", (503, {}), times=100)
    with pytest.raises(RemoteError) as ei:
        await client.image(f"{proxy.address}/test/small:v1")
    assert ei.value.status == 503
    assert proxy.stats.requests["GET /v2/test/small/manifests/v1"] == FAST.attempts


async def test_429_retry_after_is_honoured(proxy: FaultProxy, client: Client) -> None:
    proxy.add("/manifests/", "status", (429, {"Retry-After": "1"}))
    t0 = time.monotonic()
    await client.get(f"{proxy.address}/test/small:v1")
    assert time.monotonic() - t0 >= 0.95
    proxy.add("/manifests/", "status", (429, {"Retry-After": "100000"}))
    t0 = time.monotonic()
    await client.get(f"{proxy.address}/test/small:v1")
    assert time.monotonic() - t0 < FAST.retry_after_cap + 1.5  # capped


@pytest.mark.parametrize("fault", ["cut", "cut_chunked", "short_chunked"])
async def test_blob_cut_off_resumes_with_range(
    proxy: FaultProxy, published: Published, client: Client, tmp_path: Path, fault: str
) -> None:
    path = _big_layer_path(published)
    cut = 1_000_000
    proxy.add(path, fault, cut)
    img = cache.image(await client.image(f"{proxy.address}/test/big:v1"), FilesystemCache(tmp_path))
    await validate.image(img)
    # From the byte reached, or a little before it: bytes aiohttp had buffered when the
    # connection was cut are dropped with it, and fetched again.
    assert any(0 < _range_start(r) <= cut for r in proxy.stats.range_headers)


async def test_blob_cut_off_without_range_support_restarts(
    proxy: FaultProxy, published: Published, client: Client
) -> None:
    path = _big_layer_path(published)
    proxy.add(path, "cut", 700_000)
    proxy.add(path, "no_range")  # the resume is answered with the whole blob (200)
    img = await client.image(f"{proxy.address}/test/big:v1")
    await validate.image(img)
    assert len(proxy.stats.range_headers) >= 1
    assert 0 < _range_start(proxy.stats.range_headers[0]) <= 700_000


def _range_start(header: str) -> int:
    """N of a ``bytes=N-`` Range header (-1 for any other form)."""
    if header.startswith("bytes=") and header.endswith("-") and header[6:-1].isdigit():
        return int(header[6:-1])
    return -1


async def test_wrong_content_range_restarts_from_zero(
    proxy: FaultProxy, published: Published, client: Client
) -> None:
    path = _big_layer_path(published)
    proxy.add(path, "cut", 500_000)
    proxy.add(path, "bad_range")
    await validate.image(await client.image(f"{proxy.address}/test/big:v1"))


async def test_endless_cuts_give_up_with_a_typed_error(
    proxy: FaultProxy, published: Published, client: Client, tmp_path: Path
) -> None:
    path = _big_layer_path(published)
    proxy.add(path, "cut", 10, times=100)
    fs = FilesystemCache(tmp_path)
    img = cache.image(await client.image(f"{proxy.address}/test/big:v1"), fs)
    layer = await img.layer_by_digest(Hash.parse(path.rsplit("/", 1)[1]))
    with pytest.raises(TransportError, match="cut off"):
        await drain(await layer.compressed())
    assert sum(v for k, v in proxy.stats.requests.items() if path in k) <= FAST.resumes + 2
    assert path.rsplit("/", 1)[1] not in entries(tmp_path)
    assert temps(tmp_path) == []


async def test_wrong_bytes_same_length_raise_and_cache_nothing(
    proxy: FaultProxy, published: Published, client: Client, tmp_path: Path
) -> None:
    path = _big_layer_path(published)
    proxy.add(path, "flip")
    fs = FilesystemCache(tmp_path)
    img = cache.image(await client.image(f"{proxy.address}/test/big:v1"), fs)
    layer = await img.layer_by_digest(Hash.parse(path.rsplit("/", 1)[1]))
    got = 0
    with pytest.raises(DigestMismatchError):
        async with await layer.compressed() as s:
            async for chunk in s:
                got += len(chunk)
    assert got < await layer.size()
    assert path.rsplit("/", 1)[1] not in entries(tmp_path)
    assert temps(tmp_path) == []


async def test_lying_content_length_is_refused(
    proxy: FaultProxy, published: Published, client: Client
) -> None:
    path = _big_layer_path(published)
    proxy.add(path, "body", b"x" * 100)
    img = await client.image(f"{proxy.address}/test/big:v1")
    layer = await img.layer_by_digest(Hash.parse(path.rsplit("/", 1)[1]))
    with pytest.raises(SizeMismatchError):
        await drain(await layer.compressed())


async def test_gzip_content_encoding_is_decoded_and_verified(
    proxy: FaultProxy, published: Published, client: Client
) -> None:
    path = _big_layer_path(published)
    proxy.add(path, "gzip")
    await validate.image(await client.image(f"{proxy.address}/test/big:v1"))


async def test_slow_response_times_out_and_is_retried(
    proxy: FaultProxy, published: Published
) -> None:
    path = _big_layer_path(published)
    proxy.add(path, "stall", 2.0)
    async with Client(retry=FAST, read_timeout=0.5, docker_config=False) as c:
        img = await c.image(f"{proxy.address}/test/big:v1")
        t0 = time.monotonic()
        await validate.image(img)
        assert time.monotonic() - t0 < 10
    assert sum(v for k, v in proxy.stats.requests.items() if path in k) >= 2


async def test_redirect_to_another_host_drops_authorization(
    basic_registry: Registry, published: Published, tmp_path: Path
) -> None:
    import base64

    user, pw = next(iter(USERS.items()))
    basic = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
    # "Object storage" on another loopback address: it answers 400 to any Authorization.
    with (
        running_proxy(
            basic_registry.host, host="127.0.0.2", upstream_auth=basic, reject_auth=True
        ) as store,
        running_proxy(basic_registry.host) as front,
    ):
        front.add("/blobs/sha256:", "redirect", store.address, times=100)
        creds = Credentials(username=user, password=pw)
        async with Client(retry=FAST, credentials=creds, docker_config=False) as c:
            img = await c.image(f"{front.address}/test/small:v1")
            await validate.image(cache.image(img, FilesystemCache(tmp_path)))
        assert store.stats.requests  # blobs were served from there
        assert store.stats.authorization_seen == []
        assert front.stats.authorization_seen  # the registry itself did get credentials


async def test_redirect_to_link_local_is_refused(
    proxy: FaultProxy, published: Published, client: Client
) -> None:
    proxy.add("/blobs/sha256:", "redirect", "169.254.169.254", times=10)
    img = await client.image(f"{proxy.address}/test/small:v1")
    with pytest.raises(RemoteError, match="link-local"):
        await img.config_file()
