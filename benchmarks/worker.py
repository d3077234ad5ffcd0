"""The suite's child process: one in-process measurement of the library, in a fresh interpreter.

``python -m benchmarks.worker JOB`` (``JOB`` is JSON) imports the library
(and anyio's asyncio backend, which anyio imports lazily on first use: 15-20
ms that a program already running anyio has paid), prints ``ready``, waits
for ``go`` on stdin (the parent settles memory in between), then times the
job alone: what a user who ``await``s the library pays, after import. It
prints one JSON line: the seconds, the CPU seconds, its peak RSS (``VmHWM``:
the child's own address space; ``ru_maxrss`` would start at the parent's
peak, see ``peak_rss_mib``), the peak before the timed part, and the MiB the
timed part wrote to storage (``write_bytes`` of /proc/self/io).

Jobs (``kind``):

pull      ``ref`` to a new or existing OCI layout ``dest`` through
          ``FilesystemCache(cache)``: ``layout.write_all(dest,
          [(await mutate.to_oci(cache.image(await c.image(ref), fs)), name)])``,
          or ``cache.image_index(await c.index(ref), fs)`` when ``index``;
fanin     ``pulls`` (pairs of ref and dest) at once, one ``remote.Client``
          and one ``FilesystemCache`` for all, each a pull as above;
many      ``asyncio.gather`` over ``pulls`` (pairs of ref and ref name), one
          ``remote.Client`` and one ``FilesystemCache``, each pull a
          ``layout.write_all`` of its image into the same layout ``dest``;
prefetch  ``cache.prefetch(await c.index(ref), fs)``;
walk      the same work one request at a time: the index, then per child its
          manifest, config and each layer (read through the cache), in turn.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

import anyio
import anyio._backends._asyncio  # imported now, not in the timed part

from aiolayercache import cache, layout, mutate, remote
from aiolayercache.cache import FilesystemCache, LayerNotFoundError
from aiolayercache.streams import drain

READY, GO = "ready", "go"


def written_mib() -> float | None:
    """What this process has written to storage so far (``write_bytes`` of /proc/self/io)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1]) / (1 << 20)
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB: ``VmHWM`` on Linux, else ``ru_maxrss``.

    On Linux a child's ``ru_maxrss`` starts at the high-water mark of the
    address space that exec replaced: the parent's, shared by vfork.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


async def _target(c: remote.Client, fs: FilesystemCache, ref: str, index: bool) -> Any:
    if index:
        return await mutate.to_oci(cache.image_index(await c.index(ref), fs))
    return await mutate.to_oci(cache.image(await c.image(ref), fs))


async def pull(job: dict[str, Any]) -> dict[str, Any]:
    async with remote.Client() as c:
        fs = FilesystemCache(job["cache"])
        t = await _target(c, fs, job["ref"], job.get("index", False))
        await layout.write_all(job["dest"], [(t, job.get("name"))])
    return {}


async def fanin(job: dict[str, Any]) -> dict[str, Any]:
    seconds: list[float] = []
    async with remote.Client() as c:
        fs = FilesystemCache(job["cache"], max_bytes=job.get("max_bytes"))

        async def one(ref: str, dest: str) -> None:
            t0 = time.perf_counter()
            t = await _target(c, fs, ref, False)
            await layout.write_all(dest, [(t, job.get("name"))])
            seconds.append(time.perf_counter() - t0)

        async with anyio.create_task_group() as tg:
            for ref, dest in job["pulls"]:
                tg.start_soon(one, ref, dest)
    return {"pull_seconds": sorted(seconds)}


async def many(job: dict[str, Any]) -> dict[str, Any]:
    async with remote.Client() as c:
        fs = FilesystemCache(job["cache"])

        async def one(ref: str, name: str) -> None:
            t = await _target(c, fs, ref, False)
            await layout.write_all(job["dest"], [(t, name)])

        await asyncio.gather(*(one(ref, name) for ref, name in job["pulls"]))
    return {}


async def prefetch(job: dict[str, Any]) -> dict[str, Any]:
    async with remote.Client() as c:
        fs = FilesystemCache(job["cache"])
        stats = await cache.prefetch(await c.index(job["ref"]), fs)
    return {"layers": stats.layers, "bytes": stats.bytes_fetched}


async def walk(job: dict[str, Any]) -> dict[str, Any]:
    layers = n = 0
    async with remote.Client() as c:
        fs = FilesystemCache(job["cache"])
        ii = await c.index(job["ref"])
        for d in (await ii.index_manifest()).manifests:
            img = await ii.image(d.digest)
            for layer in await img.layers():
                try:
                    await fs.get(await layer.digest())
                    continue
                except LayerNotFoundError:
                    pass
                layers += 1
                n += await drain(await (await fs.put(layer)).compressed())
    return {"layers": layers, "bytes": n}


JOBS = {"pull": pull, "fanin": fanin, "many": many, "prefetch": prefetch, "walk": walk}


def main() -> None:
    job = json.loads(sys.argv[1])
    run = JOBS[job["kind"]]
    print(READY, flush=True)
    if sys.stdin.readline().strip() != GO:
        raise SystemExit("no go from the parent")
    before = peak_rss_mib()
    written = written_mib()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    extra = anyio.run(run, job, backend="asyncio")
    elapsed = time.perf_counter() - t0
    out = {
        "seconds": elapsed,
        "cpu_s": time.process_time() - cpu0,
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_mib": before,
        **extra,
    }
    now = written_mib()
    if written is not None and now is not None:
        out["written_mib"] = now - written
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
