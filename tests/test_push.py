"""Pushing to the real registry: remote.write, write_layer, tag, delete; mounts; faults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aiolayercache import cache, layout, random, validate
from aiolayercache.cache import FilesystemCache
from aiolayercache.remote import (
    Client,
    Credentials,
    PushStats,
    Reference,
    RemoteError,
    RetryPolicy,
    UnauthorizedError,
)

from .conftest import USERS, Published
from .registry import FaultProxy, Registry, TokenServer, running_proxy

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(backoff=0.01, max_backoff=0.05)


def blob_gets(px: FaultProxy) -> int:
    return sum(n for k, n in px.stats.requests.items() if k.startswith("GET ") and "/blobs/" in k)


def uploads(px: FaultProxy) -> int:
    return sum(n for k, n in px.stats.requests.items() if k.split(" ")[0] in ("PUT", "PATCH"))


def skopeo_inspect(ref: str) -> dict[str, object]:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


async def test_push_an_image_and_read_it_back(registry: Registry, tmp_path: Path) -> None:
    img = random.image(2 * 1024 * 1024, 3, seed=50)  # one layer over the one-PUT size
    ref = f"{registry.host}/push/one:v1"
    stats = PushStats()
    async with Client() as c:
        digest = await c.write(ref, img, stats=stats)
        assert digest == await img.digest()
        back = await c.image(ref)
        assert await back.digest() == digest
        assert await back.raw_manifest() == await img.raw_manifest()
        await validate.image(back)
    assert (stats.blobs_pushed, stats.blobs_skipped, stats.manifests) == (4, 0, 1)
    assert skopeo_inspect(ref)["schemaVersion"] == 2
    copied = subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{tmp_path}/o:x"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert copied.returncode == 0, copied.stderr


async def test_push_again_skips_every_blob(registry: Registry) -> None:
    img = random.image(64 * 1024, 2, seed=51)
    ref = f"{registry.host}/push/again:v1"
    async with Client() as c:
        await c.write(ref, img)
        stats = PushStats()
        await c.write(ref, img, stats=stats)
    assert (stats.blobs_pushed, stats.blobs_skipped) == (0, 3)


async def test_push_a_whole_index(registry: Registry) -> None:
    ii = random.index(64 * 1024, 2, 3, seed=52)
    ref = f"{registry.host}/push/multi:v1"
    async with Client() as c:
        digest = await c.write(ref, ii)
        assert digest == await ii.digest()
        back = await c.index(ref)
        await validate.index(back)
        assert await back.raw_manifest() == await ii.raw_manifest()
    raw = skopeo_inspect(ref)
    assert len(raw["manifests"]) == 3  # type: ignore[arg-type]


async def test_copy_between_repositories_mounts_every_blob(
    proxy: FaultProxy, published: Published, tmp_path: Path
) -> None:
    src = f"{proxy.address}/test/big:v1"
    dst = f"{proxy.address}/push/mounted:v1"
    stats = PushStats()
    async with Client() as c:
        img = cache.image(await c.image(src), FilesystemCache(tmp_path))
        await c.write(dst, img, stats=stats)
        assert await (await c.image(dst)).digest() == await published.big.digest()
    assert (stats.blobs_mounted, stats.blobs_pushed, stats.bytes_pushed) == (3, 0, 0)
    assert blob_gets(proxy) == 1, "only the config was read (to list the layers); no layer"


async def test_tag_and_delete(registry: Registry) -> None:
    img = random.image(32 * 1024, 1, seed=53)
    ref = f"{registry.host}/push/tagged:v1"
    async with Client() as c:
        digest = await c.write(ref, img)
        await c.tag(ref, "v2")
        assert (await c.get(f"{registry.host}/push/tagged:v2")).digest == digest
        await c.delete(f"{registry.host}/push/tagged@{digest}")
        with pytest.raises(RemoteError) as info:
            await c.get(f"{registry.host}/push/tagged@{digest}")
        assert info.value.status == 404


async def test_write_layer(registry: Registry) -> None:
    layer = random.layer(128 * 1024, seed=54)
    async with Client() as c:
        await c.write_layer(f"{registry.host}/push/layers", layer)
        h = await layer.digest()
        # The blob is there: a HEAD says so.
        resp = await c.request(
            Reference.parse(f"{registry.host}/push/layers"),
            "HEAD",
            f"/v2/push/layers/blobs/{h}",
            what="head",
        )
        resp.release()
        assert resp.status == 200


async def test_a_push_without_push_rights_is_unauthorized_naming_the_repo(
    basic_registry: Registry,
) -> None:
    img = random.image(16 * 1024, 1, seed=56)
    async with Client(docker_config=False, retry=FAST) as c:
        with pytest.raises(UnauthorizedError) as info:
            await c.write(f"{basic_registry.host}/push/secret:v1", img)
    msg = str(info.value)
    assert "push/secret" in msg
    user, pw = next(iter(USERS.items()))
    assert pw not in msg
    async with Client(credentials=Credentials(username=user, password=pw), retry=FAST) as c:
        assert await c.write(f"{basic_registry.host}/push/secret:v1", img) == await img.digest()


@pytest.mark.parametrize("fault", ["status", "drop_upload"])
@pytest.mark.parametrize("method", ["PATCH", "PUT"])
async def test_faults_during_upload_retry_in_a_new_session(
    proxy: FaultProxy, fault: str, method: str
) -> None:
    img = random.image(6 * 1024 * 1024, 1, seed=57)  # streamed: POST, PATCH, PUT
    ref = f"{proxy.address}/push/faulty-{fault}-{method.lower()}:v1"
    arg = (503, {}) if fault == "status" else 1_000_000
    proxy.add("/blobs/uploads/", fault, arg, times=1, method=method)
    async with Client(retry=FAST) as c:
        assert await c.write(ref, img) == await img.digest()
        await validate.image(await c.image(ref))
    sent = {
        m: sum(n for k, n in proxy.stats.requests.items() if k.startswith(f"{m} "))
        for m in ("POST", "PATCH", "PUT", "DELETE")
    }
    if method == "PATCH":
        # A streamed body cannot be sent again: the session is cancelled, a new one starts.
        assert sent["POST"] == 3 and sent["PATCH"] == 2 and sent["DELETE"] == 1, sent
    else:
        # A PUT of bytes (the config) is sent again as it is.
        assert sent["PUT"] == 2 + 1 + 1, sent  # two blobs' PUTs, one again, the manifest


async def test_a_blob_the_registry_stores_otherwise_fails_typed_and_no_manifest_lands(
    proxy: FaultProxy,
) -> None:
    img = random.image(64 * 1024, 1, seed=58)
    ref = f"{proxy.address}/push/wrong:v1"
    proxy.add("/blobs/uploads/", "status", (400, {}, "DIGEST_INVALID"), times=10, method="PUT")
    async with Client(retry=FAST) as c:
        with pytest.raises(RemoteError) as info:
            await c.write(ref, img)
        assert info.value.status == 400
        with pytest.raises(RemoteError) as missing:
            await c.get(ref)
        assert missing.value.status == 404, "no manifest points at a missing blob"


async def test_push_from_a_layout_keeps_digests(registry: Registry, tmp_path: Path) -> None:
    img = random.image(64 * 1024, 2, seed=59)
    await layout.write(tmp_path / "l", img, ref_name="v1")
    src = await layout.image(tmp_path / "l", "v1")
    async with Client() as c:
        assert await c.write(f"{registry.host}/push/fromlayout:v1", src) == await img.digest()


async def test_push_with_bearer_tokens_asks_for_push_scope_and_survives_a_401_mid_upload(
    token_registry: Registry, token_server: TokenServer
) -> None:
    """Token auth: the scope asked for includes push; a 401 on the streamed PATCH (a token
    that expired mid-upload) cancels that session and the push completes in a new one."""
    user, pw = next(iter(USERS.items()))
    creds = Credentials(username=user, password=pw)
    img = random.image(6 * 1024 * 1024, 1, seed=60)
    with running_proxy(token_registry.host) as px:
        challenge = {"WWW-Authenticate": f'Bearer realm="{token_server.realm}"'}
        px.add("/blobs/uploads/", "status", (401, challenge, "UNAUTHORIZED"), method="PATCH")
        ref = f"{px.address}/push/tokens:v1"
        async with Client(credentials=creds, docker_config=False, retry=FAST) as c:
            assert await c.write(ref, img) == await img.digest()
            await validate.image(await c.image(ref))
            scopes = [k[1] for k in c.tokens]
        assert "repository:push/tokens:pull,push" in scopes
        deletes = sum(n for k, n in px.stats.requests.items() if k.startswith("DELETE "))
        assert deletes == 1, "the session the 401 cut short was cancelled"


_BIG_PUSH_KID = r"""
import hashlib, json, os, sys, zlib
import anyio
from aiolayercache import Hash, partial
from aiolayercache.remote import Client
from aiolayercache.streams import BytesStream, FileStream

path, ref, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
# A gzip member of stored (level 0) blocks: the blob is as big as the random bytes in it.
diff, blob = hashlib.sha256(), hashlib.sha256()
z = zlib.compressobj(0, zlib.DEFLATED, 31)
with open(path, "wb") as f:
    for _ in range(size // (1 << 20)):
        chunk = os.urandom(1 << 20)
        diff.update(chunk)
        for part in (z.compress(chunk),):
            blob.update(part)
            f.write(part)
    tail = z.flush()
    blob.update(tail)
    f.write(tail)
layer_size = os.path.getsize(path)
config = json.dumps({"architecture": "amd64", "os": "linux",
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff.hexdigest()]}}).encode()
manifest = json.dumps({"schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "size": len(config), "digest": str(Hash.of(config))},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "size": layer_size, "digest": "sha256:" + blob.hexdigest()}]}).encode()

async def open_blob(desc):
    if desc.size == len(config):
        return BytesStream(config)
    return await FileStream.open(path)

def hwm_kib():
    # VmHWM, not ru_maxrss: the latter is kept across exec, so it would start at the
    # size of whatever process forked this one (pytest, hundreds of MiB).
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

async def main():
    img = partial.image(manifest, open_blob)
    before = hwm_kib()
    async with Client() as c:
        await c.write(ref, img)
    print(f"RESULT {layer_size} {before} {hwm_kib()}")

anyio.run(main)
"""


def test_pushing_a_512_mib_layer_keeps_memory_flat(registry: Registry, tmp_path: Path) -> None:
    """The layer streams from its file in one PATCH: peak RSS stays in the pull's budget
    (docs/BENCHMARKS.md: a pull of 4 x 64 MiB peaks near 90 MiB)."""
    kid = tmp_path / "kid.py"
    kid.write_text(_BIG_PUSH_KID)
    out = subprocess.run(
        [
            sys.executable,
            str(kid),
            str(tmp_path / "layer.gz"),
            f"{registry.host}/push/big:v1",
            str(512 << 20),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    size, before, peak = out.stdout.split("RESULT ")[1].split()
    assert int(size) > 512 << 20
    assert int(peak) < 100 * 1024, f"peak RSS {int(peak) // 1024} MiB (before the push: {before})"
