"""The suite's Python peer: docker-registry-client-async pulling one image's blobs to disk.

``python benchmarks/peer_drca.py HOST/REPO:TAG DEST [--jobs 6]``, run by the suite
(scenario 1) with the interpreter of the venv that holds the package (``make bench``
installs the ``bench`` extra into ``.venv/peers``), timed as a whole process. It GETs
the manifest (plain HTTP: the registry is on loopback), then the config and every layer
with ``get_blob_to_disk`` into ``DEST/blobs/sha256/HEX`` through aiofiles, ``--jobs`` at a
time, and checks each blob's digest (which ``get_blob_to_disk`` computes as it writes)
and size against the manifest, as the package's own callers do. No cache, no fsync, no
layout: what the peer does when asked for an image's blobs.

Stand-alone on purpose: it imports nothing of aiolayercache or of the suite.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import aiofiles
from docker_registry_client_async import DockerRegistryClientAsync, FormattedSHA256, ImageName


async def pull(ref: str, dest: Path, jobs: int) -> int:
    name = ImageName.parse(ref)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    slots = asyncio.Semaphore(jobs)
    client = DockerRegistryClientAsync()
    try:
        manifest = (await client.get_manifest(name, protocol="http")).manifest
        (dest / "manifest.json").write_bytes(manifest.get_bytes())
        doc: dict[str, Any] = manifest.get_json()
        descs = [doc["config"], *doc["layers"]]

        async def one(desc: dict[str, Any]) -> int:
            digest = FormattedSHA256.parse(desc["digest"])
            async with slots, aiofiles.open(blobs / digest.sha256, "wb") as f:
                r = await client.get_blob_to_disk(name, digest, f, protocol="http")
            if r.digest != digest or r.size != desc["size"]:
                raise SystemExit(f"{digest}: got {r.digest}, {r.size} bytes")
            return int(r.size)

        sizes = await asyncio.gather(*(one(d) for d in descs))
    finally:
        await client.close()
    return sum(sizes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("ref")
    p.add_argument("dest", type=Path)
    p.add_argument("--jobs", type=int, default=6, help="blobs at once (6)")
    args = p.parse_args()
    asyncio.run(pull(args.ref, args.dest, args.jobs))


if __name__ == "__main__":
    main()
