"""Benchmark images: random layers built on disk, streaming, and pushed to a registry.

Each layer is a gzip'd tar of one file of random bytes (``os.urandom``), so
no one on the way (registry, HTTP, a writer) can make it smaller: gzip
(level 1, as ``aiolayercache.random`` uses) leaves it about 0.03 % bigger
than its contents. Layers are written to files in 4 MiB pieces, so a 1 GiB
layer never sits in memory; digest and diff_id are hashed on the way. Images
are Docker schema 2 (as most registries serve them); the children of an
index are OCI images, the index an OCI index. Blobs go up with a monolithic
PUT streamed from their files, manifests with a PUT each.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

PIECE = 4 << 20

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Layer:
    digest: str
    diff_id: str
    size: int
    path: Path


@dataclass
class BuiltImage:
    """An image's manifest and config (in memory) and its layers (files)."""

    manifest: bytes
    media_type: str
    config: bytes
    layers: list[Layer]
    platform: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    def blob_sizes(self) -> dict[str, int]:
        """Every blob of the image (config and layers), by digest."""
        out = {sha256(self.config): len(self.config)}
        out.update(self.layer_sizes())
        return out

    def layer_sizes(self) -> dict[str, int]:
        return {x.digest: x.size for x in self.layers}


@dataclass
class BuiltIndex:
    manifest: bytes
    children: list[BuiltImage]

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    def blob_sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.children:
            out.update(c.blob_sizes())
        return out

    def layer_sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.children:
            out.update(c.layer_sizes())
        return out


def make_layer(directory: Path, size: int) -> Layer:
    """A gzip'd tar of one file of ``size`` random bytes, written to a file in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    info = tarfile.TarInfo(os.urandom(8).hex())
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    tar_hash = hashlib.sha256()
    gz_hash = hashlib.sha256()
    gz = zlib.compressobj(1, zlib.DEFLATED, 31)
    path = directory / f"layer-{os.urandom(8).hex()}.tar.gz"
    total = 0
    with open(path, "wb") as f:

        def put(data: bytes) -> None:
            nonlocal total
            tar_hash.update(data)
            out = gz.compress(data)
            gz_hash.update(out)
            f.write(out)
            total += len(out)

        put(info.tobuf(format=tarfile.PAX_FORMAT))
        left = size
        while left:
            n = min(PIECE, left)
            put(os.urandom(n))
            left -= n
        put(b"\0" * ((-size) % 512 + 1024))  # padding, then the two end-of-archive blocks
        tail = gz.flush()
        gz_hash.update(tail)
        f.write(tail)
        total += len(tail)
    return Layer("sha256:" + gz_hash.hexdigest(), "sha256:" + tar_hash.hexdigest(), total, path)


def make_image(
    layers: list[Layer], *, oci: bool = False, platform: str = "linux/amd64"
) -> BuiltImage:
    """An image of ``layers`` (shared layers may appear in several images)."""
    os_, arch, *variant = platform.split("/")
    config: dict[str, object] = {
        "architecture": arch,
        "os": os_,
        "created": "1970-01-01T00:00:00Z",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in layers]},
        "history": [
            {"created": "1970-01-01T00:00:00Z", "created_by": f"benchmark layer {i}"}
            for i in range(len(layers))
        ],
    }
    plat = {"architecture": arch, "os": os_}
    if variant:
        config["variant"] = plat["variant"] = variant[0]
    raw_config = json.dumps(config, separators=(",", ":")).encode()
    media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
            "size": len(raw_config),
            "digest": sha256(raw_config),
        },
        "layers": [
            {"mediaType": OCI_LAYER if oci else DOCKER_LAYER, "size": x.size, "digest": x.digest}
            for x in layers
        ],
    }
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    return BuiltImage(raw, media_type, raw_config, layers, plat)


def make_index(children: list[BuiltImage]) -> BuiltIndex:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": c.media_type,
                "size": len(c.manifest),
                "digest": c.digest,
                "platform": c.platform,
            }
            for c in children
        ],
    }
    return BuiltIndex(json.dumps(doc, separators=(",", ":")).encode(), children)


class Pusher:
    """Pushes built images to the registry at ``host`` (plain HTTP, no auth)."""

    def __init__(self, host: str) -> None:
        self.base = f"http://{host}"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Pusher:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        self._session = aiohttp.ClientSession(timeout=timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    async def blob(self, repo: str, digest: str, data: bytes | Path) -> None:
        s = self.session
        async with s.head(f"{self.base}/v2/{repo}/blobs/{digest}") as r:
            if r.status == 200:
                return
        async with s.post(f"{self.base}/v2/{repo}/blobs/uploads/") as r:
            if r.status != 202:
                raise RuntimeError(f"upload of {digest} refused: {r.status} {await r.text()}")
            loc = r.headers["Location"]
        url = loc if loc.startswith("http") else self.base + loc
        sep = "&" if "?" in url else "?"
        headers = {"Content-Type": "application/octet-stream"}
        if isinstance(data, Path):
            headers["Content-Length"] = str(data.stat().st_size)
            with open(data, "rb") as f:
                async with s.put(f"{url}{sep}digest={digest}", data=f, headers=headers) as r:
                    status, text = r.status, await r.text()
        else:
            async with s.put(f"{url}{sep}digest={digest}", data=data, headers=headers) as r:
                status, text = r.status, await r.text()
        if status != 201:
            raise RuntimeError(f"upload of {digest} failed: {status} {text}")

    async def manifest(self, repo: str, ref: str, raw: bytes, media_type: str) -> None:
        async with self.session.put(
            f"{self.base}/v2/{repo}/manifests/{ref}", data=raw, headers={"Content-Type": media_type}
        ) as r:
            if r.status != 201:
                raise RuntimeError(f"manifest {repo}:{ref} refused: {r.status} {await r.text()}")

    async def image(self, repo: str, tag: str | None, img: BuiltImage) -> None:
        await self.blob(repo, sha256(img.config), img.config)
        for x in img.layers:
            await self.blob(repo, x.digest, x.path)
        await self.manifest(repo, tag or img.digest, img.manifest, img.media_type)

    async def index(self, repo: str, tag: str, ii: BuiltIndex) -> None:
        for c in ii.children:
            await self.image(repo, None, c)
        await self.manifest(repo, tag, ii.manifest, OCI_INDEX)
