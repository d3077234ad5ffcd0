"""The fleet tier: RegistryCache on a real registry, tiered caches, machines sharing it.

Three real registries play the parts: the session's origin (with the test
images), a fleet store (its own ``docker-registry`` and storage), and fault
proxies in front of either to count what each served or to break it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from aiolayercache import Hash, LayerNotFoundError, cache, layout, random, validate
from aiolayercache._types import Descriptor, MediaType
from aiolayercache.cache import FilesystemCache, MemoryCache, TierHit, tiered
from aiolayercache.fleet import RegistryCache
from aiolayercache.partial import ConfigLayer
from aiolayercache.remote import Client
from aiolayercache.streams import read_all

from .conftest import Published, _need_registry
from .registry import (
    REGISTRY_BIN,
    FaultProxy,
    Registry,
    free_port,
    running_proxy,
    start_registry,
)

pytestmark = pytest.mark.anyio


def blob_gets(px: FaultProxy) -> dict[str, int]:
    """Blob GETs the proxy forwarded, by path."""
    return {k: n for k, n in px.stats.requests.items() if k.startswith("GET ") and "/blobs/" in k}


def blob_data(reg: Registry, h: Hash) -> Path:
    return reg.root / "docker/registry/v2/blobs" / h.algorithm / h.hex[:2] / h.hex / "data"


async def test_round_trips_compressed_uncompressed_and_config_entries(fleet: Registry) -> None:
    layer = random.layer(3 * 1024 * 1024 + 17, seed=41)
    raw_config = json.dumps({"architecture": "amd64", "os": "linux", "x": 1}).encode()
    cdesc = Descriptor(
        media_type=MediaType.DOCKER_CONFIG_JSON, size=len(raw_config), digest=Hash.of(raw_config)
    )

    async def config() -> bytes:
        return raw_config

    async with Client() as client:
        f = RegistryCache(f"{fleet.host}/layer-cache", client=client)
        digest, diff_id = await layer.digest(), await layer.diff_id()
        for h in (digest, diff_id, cdesc.digest):
            with pytest.raises(LayerNotFoundError):
                await f.get(h)
        want_c = await read_all(await layer.compressed())
        want_u = await read_all(await layer.uncompressed())
        assert await read_all(await (await f.put(layer)).compressed()) == want_c
        assert await read_all(await (await f.put(layer)).uncompressed()) == want_u
        put_cfg = await f.put(ConfigLayer(config, cdesc))
        assert await read_all(await put_cfg.compressed()) == raw_config
        await f.flush()  # the entries are tagged behind the reads
        assert f.write_errors == 0

        # Another process's view: a new RegistryCache, a new client.
        async with Client() as other:
            g = RegistryCache(f"{fleet.host}/layer-cache", client=other)
            hit = await g.get(digest)
            assert await hit.media_type() == await layer.media_type()
            assert await read_all(await hit.compressed()) == want_c
            assert await read_all(await (await g.get(diff_id)).uncompressed()) == want_u
            assert await read_all(await (await g.get(cdesc.digest)).compressed()) == raw_config
            assert set(await g.entries()) == {digest, diff_id, cdesc.digest}
            await g.delete(diff_id)
            with pytest.raises(LayerNotFoundError):
                await g.get(diff_id)
            with pytest.raises(LayerNotFoundError):
                await g.delete(diff_id)
            assert set(await g.entries()) == {digest, cdesc.digest}


def gc(reg: Registry) -> str:
    cfg = reg.root.parent / "fleet-work" / "config.yml"
    out = subprocess.run(
        [REGISTRY_BIN, "garbage-collect", str(cfg)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


async def test_entries_survive_garbage_collection(fleet: Registry, tmp_path: Path) -> None:
    kept = random.layer(600 * 1024, seed=42)
    dropped = random.layer(500 * 1024, seed=43)
    async with Client() as client:
        f = RegistryCache(f"{fleet.host}/layer-cache", client=client)
        for x in (kept, dropped):
            await read_all(await (await f.put(x)).compressed())
        await f.flush()
        await f.delete(await dropped.digest())
    fleet.stop()
    gc(fleet)
    assert blob_data(fleet, await kept.digest()).exists()
    assert not blob_data(fleet, await dropped.digest()).exists()  # GC ran for real
    again = start_registry(tmp_path / "fleet-work", fleet.root)
    try:
        async with Client() as client:
            f = RegistryCache(f"{again.host}/layer-cache", client=client)
            got = await read_all(await (await f.get(await kept.digest())).compressed())
            assert got == await read_all(await kept.compressed())
    finally:
        again.stop()


async def pull_into(dest: Path, ref: str, c: cache.Cache, client: Client) -> None:
    img = cache.image(await client.image(ref), c)
    await layout.write(dest, img)


async def test_corrupt_fleet_blob_is_never_served_and_the_origin_is_used(
    fleet: Registry, origin: FaultProxy, published: Published, tmp_path: Path
) -> None:
    ref = f"{origin.address}/test/big:v1"
    async with Client() as client:
        f = RegistryCache(f"{fleet.host}/layer-cache", client=client)
        await pull_into(tmp_path / "a", ref, tiered(MemoryCache(), f), client)
        await f.flush()
        victim = (await published.big.manifest()).layers[0].digest
        data = blob_data(fleet, victim)
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        st = data.stat()
        data.write_bytes(raw)
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot keeps the mtime

        # Read alone: never a clean end on the bad bytes, and the entry is dropped.
        with pytest.raises(Exception) as err:
            await read_all(await (await f.get(victim)).compressed())
        assert "DigestMismatch" in type(err.value).__name__
        with pytest.raises(LayerNotFoundError):
            await f.get(victim)

    # Rot it again (the pull above re-tags it), then pull on a fresh machine: the pull
    # succeeds with the right bytes, taking the rotted layer from the origin.
    async with Client() as client:
        f = RegistryCache(f"{fleet.host}/layer-cache", client=client)
        await read_all(
            await (await f.put(await published.big.layer_by_digest(victim))).compressed()
        )
        await f.flush()
        origin.reset()
        await pull_into(tmp_path / "b", ref, tiered(MemoryCache(), f), client)
        assert f"GET /v2/test/big/blobs/{victim}" in blob_gets(origin)
        await validate.image(await layout.image(tmp_path / "b"))


async def test_two_machines_share_the_fleet_and_the_origin_serves_each_blob_once(
    fleet: Registry, origin: FaultProxy, published: Published, tmp_path: Path
) -> None:
    script = textwrap.dedent(
        """
        import sys, anyio
        from aiolayercache import cache, layout
        from aiolayercache.cache import FilesystemCache, tiered
        from aiolayercache.fleet import RegistryCache
        from aiolayercache.remote import Client

        async def main(cache_dir, fleet_repo, dest, *refs):
            async with Client() as client:
                fleet = RegistryCache(fleet_repo, client=client)
                c = tiered(FilesystemCache(cache_dir), fleet)
                imgs = [(cache.image(await client.image(r), c), r.rsplit("/", 1)[1]) for r in refs]
                await layout.write_all(dest, imgs)
                await fleet.flush()

        anyio.run(main, *sys.argv[1:])
        """
    )
    refs = [f"{origin.address}/test/big:v1", f"{origin.address}/test/small:v1"]
    for machine in ("m1", "m2"):
        if machine == "m2":
            origin.reset()
        subprocess.run(
            [
                sys.executable,
                "-c",
                script,
                str(tmp_path / machine / "cache"),
                f"{fleet.host}/layer-cache",
                str(tmp_path / machine / "out"),
                *refs,
            ],
            check=True,
            timeout=120,
        )
        served = blob_gets(origin)
        if machine == "m1":
            assert served and all(n == 1 for n in served.values()), served
            unique = set(served)
        else:
            assert served == {}, served  # every blob (and config) came from the fleet
    assert len(unique) == 5 + 2  # the layers and the configs of both images
    for machine in ("m1", "m2"):
        entries = list((tmp_path / machine / "cache").rglob("sha256:*"))
        assert len(entries) >= 7  # the local cache filled on both machines


def local_entries(d: Path) -> set[str]:
    return {p.name for p in d.rglob("sha256:*") if p.is_file() and "." not in p.name}


async def pull_checked(
    tmp_path: Path, name: str, ref: str, f: RegistryCache, client: Client, published: Published
) -> set[str]:
    """Pull ``ref`` through tiered(local, f) into a layout; the local entries it left."""
    local = FilesystemCache(tmp_path / f"{name}-cache")
    with anyio.fail_after(60):
        await pull_into(tmp_path / f"{name}-out", ref, tiered(local, f), client)
        await f.flush()
    await validate.image(await layout.image(tmp_path / f"{name}-out"))
    return local_entries(tmp_path / f"{name}-cache")


def fleet_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "aiolayercache.fleet" and r.levelname == "WARNING"
    ]


async def test_a_read_only_fleet_never_fails_a_pull(
    fleet: Registry,
    origin: FaultProxy,
    published: Published,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = await published.big.manifest()
    want = {f"{d.digest}" for d in [*m.layers, m.config]}
    with running_proxy(fleet.host) as fpx:
        # Pushing is refused (403 DENIED), as for a robot account with pull rights only.
        for method in ("POST", "PUT", "PATCH"):
            fpx.add("/v2/", "status", (403, {}, "DENIED"), times=10_000, method=method)
        async with Client() as client:
            f = RegistryCache(f"{fpx.address}/layer-cache", client=client)
            got = await pull_checked(
                tmp_path, "ro", f"{origin.address}/test/big:v1", f, client, published
            )
        assert want <= got  # the local cache still filled
        assert f.write_errors >= 1
        assert len(fleet_warnings(caplog)) == 1, fleet_warnings(caplog)
        assert "403" in fleet_warnings(caplog)[0] or "DENIED" in fleet_warnings(caplog)[0]
        # Refused once, the fleet is not asked to take writes again for a while.
        writes = sum(n for k, n in fpx.stats.requests.items() if not k.startswith(("GET", "HEAD")))
        assert writes <= 3, fpx.stats.requests


async def test_a_fleet_that_is_down_never_fails_a_pull(
    origin: FaultProxy, published: Published, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from aiolayercache.remote import RetryPolicy

    dead = f"127.0.0.1:{free_port()}/layer-cache"  # nothing listens there
    async with Client(retry=RetryPolicy(attempts=2, backoff=0.01)) as client:
        f = RegistryCache(dead, client=client)
        got = await pull_checked(
            tmp_path, "down", f"{origin.address}/test/big:v1", f, client, published
        )
    assert len(got) == 3  # two layers and the config
    assert f.read_errors >= 1 and f.down
    assert len([w for w in fleet_warnings(caplog) if "cannot be read" in w]) == 1


async def test_a_slow_fleet_is_given_up_and_the_pull_goes_on(
    fleet: Registry, origin: FaultProxy, published: Published, tmp_path: Path
) -> None:
    with running_proxy(fleet.host) as fpx:
        # Uploads hang (the registry takes no bytes): the read must not wait on them.
        fpx.add("/blobs/uploads/", "delay", 4, times=10_000, method=None)
        async with Client() as client:
            f = RegistryCache(
                f"{fpx.address}/layer-cache",
                client=client,
                claims=False,
                stall_timeout=0.5,
                commit_timeout=1.0,
            )
            got = await pull_checked(
                tmp_path, "slow", f"{origin.address}/test/big:v1", f, client, published
            )
        assert len(got) == 3
        assert f.write_errors >= 1
        # Nothing was tagged: the fleet names no entry whose upload did not finish.
        assert not [k for k in fpx.stats.requests if k.startswith("PUT ") and "/manifests/" in k]


async def test_an_abandoned_read_cancels_the_upload_and_tags_nothing(fleet: Registry) -> None:
    layer = random.layer(6 * 1024 * 1024, seed=44)
    with running_proxy(fleet.host) as fpx:
        async with Client() as client:
            f = RegistryCache(f"{fpx.address}/layer-cache", client=client, claims=False)
            stream = await (await f.put(layer)).compressed()
            await stream.receive()
            await stream.receive()
            await stream.aclose()
            with pytest.raises(LayerNotFoundError):
                await f.get(await layer.digest())
        deletes = [k for k in fpx.stats.requests if k.startswith("DELETE ") and "/uploads/" in k]
        assert deletes, fpx.stats.requests  # the session was cancelled
        assert not [k for k in fpx.stats.requests if k.startswith("PUT ")]
    assert f.write_errors == 0  # an abandoned read is not a fleet failure


async def test_machines_missing_at_once_fetch_from_the_origin_once(
    fleet: Registry, registry: Registry, tmp_path: Path
) -> None:
    from .registry import push_image

    img = random.image(4 * 1024 * 1024, 2, seed=45)
    await push_image(registry.host, "test/claims", "v1", img)
    with running_proxy(registry.host) as origin:
        # A far origin: every blob answer waits, so the machines overlap.
        origin.add("/blobs/", "stall", 0.3, times=10_000)
        async with Client() as client:
            machines = [
                tiered(MemoryCache(), RegistryCache(f"{fleet.host}/layer-cache", client=client))
                for _ in range(3)
            ]
            ref = f"{origin.address}/test/claims:v1"
            async with anyio.create_task_group() as tg:
                for i, c in enumerate(machines):
                    tg.start_soon(pull_into, tmp_path / f"m{i}", ref, c, client)
            for c in machines:
                await c.tiers[1].flush()  # type: ignore[attr-defined]
        for i in range(3):
            await validate.image(await layout.image(tmp_path / f"m{i}"))
        layers = [str(d.digest) for d in (await img.manifest()).layers]
        served = blob_gets(origin)
        fetched = [served.get(f"GET /v2/test/claims/blobs/{d}", 0) for d in layers]
    # Without claims each machine fetches each layer (6). A registry has no "create if
    # absent": two claims put within the settle time may both win (one extra fetch), so
    # the bound is the 1.5 x unique, not 1.00.
    assert all(n >= 1 for n in fetched) and sum(fetched) <= 3, served
    # The machines that did not fetch a layer waited on a claim for it (or found it in
    # the fleet already, when they came late): at least one wait happened.
    waits = sum(c.tiers[1].claims.waits for c in machines)  # type: ignore[attr-defined]
    assert waits >= 1, waits


async def test_prefetch_over_tiers_counts_hits_per_tier_and_promotes(
    fleet: Registry, origin: FaultProxy, published: Published, tmp_path: Path
) -> None:
    async with Client() as client:
        img = await client.image(f"{origin.address}/test/big:v1")
        f = RegistryCache(f"{fleet.host}/layer-cache", client=client)
        cold = await cache.prefetch(img, tiered(FilesystemCache(tmp_path / "a"), f))
        await f.flush()
        assert (cold.misses, cold.hits, cold.hits_by_tier) == (2, 0, {})
        local = FilesystemCache(tmp_path / "b")
        origin.reset()
        warm = await cache.prefetch(img, tiered(local, f))
        assert (warm.misses, warm.hits, warm.hits_by_tier) == (0, 2, {"fleet": 2})
        assert blob_gets(origin) == {}
        again = await cache.prefetch(img, tiered(local, f))
        assert again.hits_by_tier == {"local": 2}  # the fleet hit filled the local tier
        hit = await tiered(local, f).get((await img.manifest()).layers[0].digest)
        assert isinstance(hit, TierHit) and hit.tier == "local" and not hit.promotes


async def put_claim(f: RegistryCache, h: Hash, expires_in: float) -> None:
    import time

    from aiolayercache.fleet._entries import claim_manifest, claim_tag

    await f.put_tag(claim_tag(h), claim_manifest("someone-else", time.time() + expires_in))


async def test_a_dead_claimer_holds_the_others_up_one_ttl_at_most(fleet: Registry) -> None:
    import time

    layer = random.layer(2 * 1024 * 1024, seed=46)
    h = await layer.digest()
    async with Client() as client:
        f = RegistryCache(f"{fleet.host}/layer-cache", client=client, claim_ttl=1.5)
        await put_claim(f, h, 1.5)  # a claimer that then died: never renewed, never released
        started = time.monotonic()
        with anyio.fail_after(30):
            got = await read_all(await (await f.put(layer)).compressed())
        waited = time.monotonic() - started
        await f.flush()
        assert got == await read_all(await layer.compressed())
        assert 1.0 <= waited <= 6, waited  # waited for the claim to lapse, then fetched
        assert (await f.get(h)) is not None  # and filled the fleet itself
        from aiolayercache.fleet._entries import claim_tag

        assert await f.read_tag(claim_tag(h)) is None  # the dead claim's tag is gone too


async def test_a_claim_from_the_far_future_is_not_believed(fleet: Registry) -> None:
    import time

    layer = random.layer(2 * 1024 * 1024, seed=47)
    h = await layer.digest()
    async with Client() as client:
        f = RegistryCache(f"{fleet.host}/layer-cache", client=client, claim_ttl=10)
        await put_claim(f, h, 10 * 365 * 86400)  # hostile, or a clock years ahead
        started = time.monotonic()
        with anyio.fail_after(30):
            await read_all(await (await f.put(layer)).compressed())
        assert time.monotonic() - started < 3
        await f.flush()
        assert await f.get(h) is not None


async def test_a_live_claimer_renews_its_claim_while_it_fills(fleet: Registry) -> None:
    from aiolayercache.fleet._entries import claim_tag, parse_claim

    layer = random.layer(2 * 1024 * 1024, seed=48)
    h = await layer.digest()
    async with Client() as client:
        f = RegistryCache(f"{fleet.host}/layer-cache", client=client, claim_ttl=0.9)
        stream = await (await f.put(layer)).compressed()
        first = await f.read_tag(claim_tag(h))
        assert first is not None
        await anyio.sleep(1.2)  # a slow reader: several renewals go by
        renewed = await f.read_tag(claim_tag(h))
        assert renewed is not None and renewed != first
        claim = parse_claim(renewed)
        assert claim is not None and claim.live
        await read_all(stream)
        await f.flush()
        assert await f.read_tag(claim_tag(h)) is None  # released once the entry is in
        assert await f.get(h) is not None


async def test_a_fleet_in_read_only_maintenance_is_left_alone_after_one_refusal(
    origin: FaultProxy, published: Published, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _need_registry()
    ro = start_registry(
        tmp_path / "ro-work",
        tmp_path / "ro-data",
        extra={"storage": {"maintenance": {"readonly": {"enabled": True}}}},
    )
    try:
        with running_proxy(ro.host) as fpx:
            async with Client() as client:
                f = RegistryCache(f"{fpx.address}/layer-cache", client=client)
                got = await pull_checked(
                    tmp_path, "maint", f"{origin.address}/test/big:v1", f, client, published
                )
                assert len(got) == 3
                assert f.write_errors >= 1 and f.read_errors == 0
                # Refused once (405), the fleet is asked to take nothing more for a while.
                fpx.reset()
                await pull_checked(
                    tmp_path, "maint2", f"{origin.address}/test/small:v1", f, client, published
                )
            writes = [k for k in fpx.stats.requests if not k.startswith(("GET", "HEAD"))]
            assert writes == [], fpx.stats.requests
        assert len(fleet_warnings(caplog)) == 1
    finally:
        ro.stop()
