"""A broken or hostile fleet never fails a pull: what an outside attack found, as tests.

Each test breaks the fleet registry for real (its storage, its tags, a fault
proxy in front of it) and pulls through ``tiered(local, fleet)`` on a fresh
"machine": the pull must succeed with verified bytes, in bounded time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest

from aiolayercache import Hash, layout, validate
from aiolayercache.cache import MemoryCache, tiered
from aiolayercache.fleet import RegistryCache
from aiolayercache.fleet._entries import (
    claim_manifest,
    claim_tag,
    entry_tag,
    quarantine_tag,
)
from aiolayercache.remote import Client, RemoteError

from .conftest import Published
from .registry import FaultProxy, Registry, running_proxy
from .test_fleet import blob_data, blob_gets, pull_into

pytestmark = pytest.mark.anyio

REPO = "layer-cache"


async def warm(fleet_host: str, ref: str, tmp_path: Path) -> None:
    async with Client() as client:
        f = RegistryCache(f"{fleet_host}/{REPO}", client=client)
        await pull_into(tmp_path / "warm", ref, tiered(MemoryCache(), f), client)
        await f.flush()
        assert f.write_errors == 0


async def fresh_pull(
    fleet_host: str, ref: str, dest: Path, **options: float
) -> tuple[RegistryCache, float]:
    """Pull ``ref`` on a fresh machine through the fleet at ``fleet_host``; checked."""
    started = time.monotonic()
    async with Client() as client:
        f = RegistryCache(f"{fleet_host}/{REPO}", client=client, **options)  # type: ignore[arg-type]
        with anyio.fail_after(90):
            await pull_into(dest, ref, tiered(MemoryCache(), f), client)
            await f.flush()
    await validate.image(await layout.image(dest))
    return f, time.monotonic() - started


async def victim(published: Published) -> Hash:
    return (await published.big.manifest()).layers[0].digest


async def test_a_blob_gone_from_behind_its_tag_is_a_miss(
    fleet: Registry, origin: FaultProxy, published: Published, tmp_path: Path
) -> None:
    ref = f"{origin.address}/test/big:v1"
    await warm(fleet.host, ref, tmp_path)
    h = await victim(published)
    import urllib.request

    req = urllib.request.Request(f"http://{fleet.host}/v2/{REPO}/blobs/{h}", method="DELETE")
    assert urllib.request.urlopen(req, timeout=10).status == 202
    origin.reset()
    await fresh_pull(fleet.host, ref, tmp_path / "out")
    assert f"GET /v2/test/big/blobs/{h}" in blob_gets(origin)  # the origin served it
    f2, _ = await fresh_pull(fleet.host, ref, tmp_path / "out2")  # and again: re-filled
    assert f2.read_errors == 0


async def test_a_truncated_fleet_blob_is_a_miss_and_is_dropped(
    fleet: Registry, origin: FaultProxy, published: Published, tmp_path: Path
) -> None:
    ref = f"{origin.address}/test/big:v1"
    await warm(fleet.host, ref, tmp_path)
    h = await victim(published)
    data = blob_data(fleet, h)
    data.write_bytes(data.read_bytes()[:100_000])
    origin.reset()
    await fresh_pull(fleet.host, ref, tmp_path / "out")
    assert f"GET /v2/test/big/blobs/{h}" in blob_gets(origin)
    async with Client() as client:
        f = RegistryCache(f"{fleet.host}/{REPO}", client=client)
        # Dropped and quarantined: the re-fill did not tag the bad blob again.
        assert await f.read_tag(quarantine_tag(h)) is not None
        assert await f.read_tag(entry_tag(h)) is None


@pytest.mark.parametrize("fault", ["status", "cut", "stall"])
async def test_a_fleet_that_fails_mid_blob_never_fails_the_pull(
    fault: str, fleet: Registry, origin: FaultProxy, published: Published, tmp_path: Path
) -> None:
    ref = f"{origin.address}/test/big:v1"
    await warm(fleet.host, ref, tmp_path)
    h = await victim(published)
    arg = {"status": (500, {}), "cut": 100, "stall": 30}[fault]
    with running_proxy(fleet.host) as fpx:
        fpx.add(f"/blobs/{h}", fault, arg, times=10_000)
        origin.reset()
        f, took = await fresh_pull(fpx.address, ref, tmp_path / "out", stall_timeout=1.5)
    assert f"GET /v2/test/big/blobs/{h}" in blob_gets(origin)
    assert f.read_errors >= 1
    assert took < 30, took  # bounded by stall_timeout, not by the client's retries


@pytest.mark.parametrize("lie", ["size", "kind"])
async def test_a_lying_entry_manifest_never_fails_the_pull(
    lie: str, fleet: Registry, origin: FaultProxy, published: Published, tmp_path: Path
) -> None:
    ref = f"{origin.address}/test/big:v1"
    await warm(fleet.host, ref, tmp_path)
    h = await victim(published)
    async with Client() as client:
        f = RegistryCache(f"{fleet.host}/{REPO}", client=client)
        raw = await f.read_tag(entry_tag(h))
        assert raw is not None
        doc = json.loads(raw)
        if lie == "size":
            doc["layers"][0]["size"] = 9_999_999
        else:
            doc["annotations"]["dev.aiolayercache.entry.kind"] = "uncompressed"
        await f.put_tag(entry_tag(h), json.dumps(doc).encode())
    await fresh_pull(fleet.host, ref, tmp_path / "out")
    await fresh_pull(fleet.host, ref, tmp_path / "out2")


async def test_a_claim_renewed_forever_holds_a_pull_up_max_wait_at_most(
    fleet: Registry, origin: FaultProxy, published: Published, tmp_path: Path
) -> None:
    ref = f"{origin.address}/test/big:v1"
    h = await victim(published)
    async with Client() as client:
        f = RegistryCache(f"{fleet.host}/{REPO}", client=client)

        async def renew_forever() -> None:
            while True:
                await f.put_tag(claim_tag(h), claim_manifest("hostile", time.time() + 10))
                await anyio.sleep(1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(renew_forever)
            await anyio.sleep(0.3)
            _, took = await fresh_pull(fleet.host, ref, tmp_path / "out", claim_max_wait=3)
            tg.cancel_scope.cancel()
    assert 2.5 < took < 20, took


async def test_tag_list_pages_that_never_end_are_an_error(fleet: Registry) -> None:
    with running_proxy(fleet.host) as fpx:
        link = {"Link": f'</v2/{REPO}/tags/list?last=x>; rel="next"'}
        fpx.add("/tags/list", "header", link, times=10_000)
        async with Client() as client:
            f = RegistryCache(f"{fpx.address}/{REPO}", client=client)
            await f.put_tag("sha256-" + "0" * 64, claim_manifest("x", 0))
            with anyio.fail_after(30), pytest.raises(RemoteError, match="do not end"):
                await f.entries()
        assert fpx.stats.requests[f"GET /v2/{REPO}/tags/list"] <= 3
