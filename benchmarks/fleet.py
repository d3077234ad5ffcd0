"""Benchmark: the fleet tier (issue 13), machines sharing a cache in a near registry.

K = 8 images share one base layer (64 MiB of random bytes, gzip'd) and each
has 1 or 2 own layers (``base / 16`` each: 4 MiB by default); the layers are
made with ``aiolayercache.random`` and pushed to an *origin* registry. The
origin is reached through a *far link*: a proxy (``FarProxy``, a
``tests.registry.FaultProxy`` subclass that streams instead of buffering)
which adds 20 ms to every request and paces every body it forwards through
one shared 50 MB/s token bucket (all connections together, as one link).
The *fleet* is a second ``docker-registry`` on loopback, not throttled,
fresh (empty) for every measurement.

A *machine* is a separate process (``fleet.py --machine JOB``) with its own
``FilesystemCache`` directory and its own ``remote.Client``: it prints
``ready`` after its imports, waits for ``go``, then pulls the K images into a
new OCI layout through ``tiered(FilesystemCache(dir), RegistryCache(fleet))``
(or the local cache alone) with one ``layout.write_all``, and prints its time
and the fleet's counters.

Measured, medians over ``--runs`` (each run: fresh fleet, fresh caches):

1  M = 1, 4, 8 machines, staggered (one after another) and simultaneous
   (all M get ``go`` at once): origin blob bytes (counted at the far proxy:
   GET .../blobs/ response bytes it sent) / unique blob bytes of the K
   images; fleet bytes (counted at a pass-through proxy in front of the
   fleet: blob upload bodies, and GET blob bodies served); wall time.
   Targets: 1.00 staggered, at most 1.5 simultaneous.
2  a cold machine with a warm fleet (the one the staggered M = 8 filled;
   reached directly, no proxy) against a cold machine pulling from the far
   origin with its local cache alone. Target: at least 4 x faster.
3  the fleet tier's overhead: origin on loopback (no proxy), a cold machine
   with ``tiered(local, fleet)`` on a cold fleet (so it uploads every entry
   as it reads) against a cold machine with the local cache alone (order
   alternating). Target: at most 1.15 x.

Run: ``python benchmarks/fleet.py [--runs 3] [--base-mib 64] [--machines 1,4,8]``
(``--base-mib 8 --runs 1`` is a quick smoke run). Prints a markdown table and
writes ``benchmarks/results/fleet.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiolayercache import cache, layout, random, remote  # noqa: E402
from aiolayercache.cache import FilesystemCache  # noqa: E402
from aiolayercache.fleet import RegistryCache  # noqa: E402
from aiolayercache.streams import read_all  # noqa: E402
from benchmarks import images  # noqa: E402
from tests.registry import FaultProxy, Registry, start_registry  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fleet.json"
MIB = 1 << 20
IMAGES = 8
FLEET_REPO = "layer-cache"
READY, GO = "ready", "go"
PIECE = 64 * 1024
# Response headers a proxy does not pass on as they are (it frames the body itself).
HOP = ("content-length", "transfer-encoding", "connection", "keep-alive", "date")


# --- the far link ------------------------------------------------------------------------


class Link:
    """One shared pipe: bytes leave it at ``rate`` bytes/s in total, first come first served."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._free_at = 0.0

    async def pass_bytes(self, n: int) -> None:
        if not self.rate:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._free_at = max(self._free_at, now) + n / self.rate
        wait = self._free_at - now
        if wait > 0:
            await asyncio.sleep(wait)


class FarProxy(FaultProxy):
    """A streaming reverse proxy: ``delay`` s added to each request, bodies paced by ``rate``.

    ``FaultProxy.handle`` reads each body whole before answering (it has to,
    to break it); this one streams both ways in 64 KiB pieces through one
    :class:`Link` shared by all connections, so M machines share 50 MB/s as
    they would share a WAN link. It counts what ``FaultProxy`` counts
    (``stats.requests``; ``stats.blob_bytes``: GET .../blobs/ response bytes
    sent) and ``upload_bytes`` (request bodies of blob uploads). With no rate
    and no delay it is a pass-through counter (the fleet's).
    """

    def __init__(self, upstream: str, *, rate: float | None = None, delay: float = 0.0) -> None:
        super().__init__(upstream)
        self.link = Link(rate)
        self.delay = delay
        self.upload_bytes = 0

    def reset(self) -> None:
        super().reset()
        self.upload_bytes = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
            self._session = aiohttp.ClientSession(auto_decompress=False, timeout=timeout)
        self.stats.requests[f"{request.method} {request.path}"] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        # Host is kept: the registry builds upload Locations from it (they come back here).
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "connection")
        }
        upload = "/blobs/uploads/" in request.path
        data: bytes | AsyncIterator[bytes] | None = None
        if request.body_exists:
            if request.content_length is not None and request.content_length <= 4 * MIB:
                body = await request.read()
                await self.link.pass_bytes(len(body))
                if upload:
                    self.upload_bytes += len(body)
                data = body
            else:
                data = self._request_body(request, upload)
        async with self._session.request(
            request.method,
            f"http://{self.upstream}{request.path_qs}",
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            resp = web.StreamResponse(status=up.status, headers=out)
            if up.content_length is not None:
                resp.content_length = up.content_length
            elif request.method != "HEAD" and up.status not in (204, 304):
                resp.enable_chunked_encoding()
            await resp.prepare(request)
            blob_get = request.method == "GET" and "/blobs/" in request.path
            if request.method != "HEAD":
                async for piece in up.content.iter_chunked(PIECE):
                    await self.link.pass_bytes(len(piece))
                    await resp.write(piece)
                    if blob_get:
                        self.stats.blob_bytes += len(piece)
            await resp.write_eof()
            return resp

    async def _request_body(self, request: web.Request, upload: bool) -> AsyncIterator[bytes]:
        async for piece in request.content.iter_chunked(PIECE):
            await self.link.pass_bytes(len(piece))
            if upload:
                self.upload_bytes += len(piece)
            yield piece


# --- a machine (a child process) ---------------------------------------------------------


async def machine_pull(job: dict[str, Any]) -> dict[str, Any]:
    async with remote.Client() as client:
        local = FilesystemCache(job["cache"])
        fleet = None
        c: cache.Cache = local
        if job.get("fleet"):
            fleet = RegistryCache(job["fleet"], client=client)
            c = cache.tiered(local, fleet)
        imgs = [
            (cache.image(await client.image(ref), c), f"img{i}")
            for i, ref in enumerate(job["refs"])
        ]
        await layout.write_all(job["dest"], imgs)
        if fleet is not None:
            await fleet.flush()  # the uploads that finish behind the reads count too
    out: dict[str, Any] = {}
    if fleet is not None:
        out["write_errors"] = fleet.write_errors
        out["read_errors"] = fleet.read_errors
        out["claim_waits"] = fleet.claims.waits if fleet.claims is not None else 0
    return out


def machine_main(raw: str) -> None:
    job = json.loads(raw)
    print(READY, flush=True)
    if sys.stdin.readline().strip() != GO:
        raise SystemExit("no go from the parent")
    t0 = time.perf_counter()
    c0 = time.process_time()
    extra = anyio.run(machine_pull, job, backend="asyncio")
    cpu = time.process_time() - c0
    print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": cpu, **extra}), flush=True)


class Machine:
    """A started machine process, waiting for ``go``."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--machine", json.dumps(job)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != READY:
            self.proc.kill()
            raise RuntimeError(f"machine did not start: {line!r}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(GO + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if self.proc.wait(600) != 0 or not line:
            raise RuntimeError(f"machine failed (exit {self.proc.returncode})")
        return dict(json.loads(line))


# --- the benchmark -----------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = Path(tempfile.mkdtemp(prefix="aiolayercache-bench-fleet-", dir=args.dir))
        self.origin = start_registry(self.base / "origin", self.base / "origin" / "data")
        self.far = FarProxy(self.origin.host, rate=args.rate_mb * 1e6, delay=args.delay_ms / 1e3)
        self.far.start()
        self.n = 0
        self.unique = 0
        self.sizes: dict[str, int] = {}
        self.refs_far: list[str] = []
        self.refs_near: list[str] = []

    def close(self) -> None:
        self.far.stop()
        self.origin.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def tmp(self, prefix: str) -> Path:
        self.n += 1
        return self.base / f"{prefix}{self.n}"

    def publish(self) -> None:
        """The K images, their layers made by ``aiolayercache.random``, pushed to the origin."""
        blobdir = self.base / "built"
        blobdir.mkdir()

        async def made(size: int) -> images.Layer:
            layer = random.layer(size)
            blob = await read_all(await layer.compressed())
            digest = await layer.digest()
            path = blobdir / digest.hex
            path.write_bytes(blob)
            return images.Layer(str(digest), str(await layer.diff_id()), len(blob), path)

        async def go() -> None:
            base_mib = self.args.base_mib
            own = max(1, base_mib // 16) * MIB
            shared = await made(base_mib * MIB)
            built = []
            for k in range(IMAGES):
                mine = [await made(own) for _ in range(1 + k % 2)]
                built.append(images.make_image([shared, *mine]))
            blobs: dict[str, int] = {}
            async with images.Pusher(self.origin.host) as p:
                for k, img in enumerate(built):
                    await p.image(f"app{k}", "v1", img)
                    blobs.update(img.blob_sizes())
            self.sizes = blobs
            self.unique = sum(blobs.values())

        anyio.run(go)
        shutil.rmtree(blobdir)
        self.refs_far = [f"{self.far.address}/app{k}:v1" for k in range(IMAGES)]
        self.refs_near = [f"{self.origin.host}/app{k}:v1" for k in range(IMAGES)]

    def fleet(self) -> Registry:
        d = self.tmp("fleet")
        return start_registry(d, d / "data")

    def job(self, refs: list[str], fleet: str | None) -> dict[str, Any]:
        return {
            "refs": refs,
            "cache": str(self.tmp("cache")),
            "dest": str(self.tmp("layout")),
            "fleet": f"{fleet}/{FLEET_REPO}" if fleet else None,
        }

    def one(self, refs: list[str], fleet: str | None) -> float:
        m = Machine(self.job(refs, fleet))
        m.go()
        r = m.result()
        self.last_cpu = float(r["cpu"])  # the puller's own CPU seconds (user + system)
        return float(r["seconds"])

    def machines(self, count: int, simultaneous: bool) -> dict[str, Any]:
        """``count`` machines on a fresh fleet, through the far origin and a counting proxy."""
        fleet = self.fleet()
        counter = FarProxy(fleet.host).start()
        self.far.reset()
        ms: list[Machine] = []
        try:
            for _ in range(count):
                ms.append(Machine(self.job(self.refs_far, counter.address)))
            t0 = time.perf_counter()
            if simultaneous:
                for m in ms:
                    m.go()
                results = [m.result() for m in ms]
            else:
                results = []
                for m in ms:
                    m.go()
                    results.append(m.result())
            wall = time.perf_counter() - t0
            return {
                "wall_s": wall,
                "machine_s": [r["seconds"] for r in results],
                "origin_bytes": self.far.stats.blob_bytes,
                "origin_ratio": self.far.stats.blob_bytes / self.unique,
                "fleet_up": counter.upload_bytes,
                "fleet_served": counter.stats.blob_bytes,
                "claim_waits": sum(r["claim_waits"] for r in results),
                "write_errors": sum(r["write_errors"] for r in results),
                "read_errors": sum(r["read_errors"] for r in results),
                "fleet_for_warm": fleet,
            }
        except BaseException:
            fleet.stop()
            raise
        finally:
            for m in ms:
                if m.proc.poll() is None:
                    m.proc.kill()
                    m.proc.wait()
            counter.stop()

    def run_once(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {"staggered": {}, "simultaneous": {}}
        warm: Registry | None = None
        biggest = max(self.args.machines)
        for count in self.args.machines:
            for mode in ("staggered", "simultaneous"):
                if count == 1 and mode == "simultaneous":
                    out[mode][count] = out["staggered"][count]  # the same thing
                    continue
                r = self.machines(count, mode == "simultaneous")
                fleet = r.pop("fleet_for_warm")
                if mode == "staggered" and count == biggest:
                    warm = fleet
                else:
                    fleet.stop()
                out[mode][count] = r
                print(
                    f"  run {i + 1}: {count} {mode}: origin/unique {r['origin_ratio']:.3f}, "
                    f"wall {r['wall_s']:.2f} s",
                    file=sys.stderr,
                )
        assert warm is not None
        try:
            self.far.reset()
            out["far_alone_s"] = self.one(self.refs_far, None)
            out["warm_fleet_s"] = self.one(self.refs_far, warm.host)
        finally:
            warm.stop()
        # The fleet tier's overhead, origin on loopback; order alternating between runs.
        for name in ("local_s", "tiered_s")[:: 1 if i % 2 == 0 else -1]:
            if name == "local_s":
                out[name] = self.one(self.refs_near, None)
            else:
                fleet = self.fleet()
                try:
                    out[name] = self.one(self.refs_near, fleet.host)
                finally:
                    fleet.stop()
            out[name.replace("_s", "_cpu")] = self.last_cpu
        print(
            f"  run {i + 1}: far alone {out['far_alone_s']:.2f} s, warm fleet "
            f"{out['warm_fleet_s']:.2f} s; loopback local {out['local_s']:.2f} s, "
            f"tiered {out['tiered_s']:.2f} s",
            file=sys.stderr,
        )
        return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    b = Bench(args)
    try:
        b.publish()
        runs = [b.run_once(i) for i in range(args.runs)]
        unique = b.unique
    finally:
        b.close()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "base_mib": args.base_mib,
        "images": IMAGES,
        "rate_mb_s": args.rate_mb,
        "delay_ms": args.delay_ms,
        "unique_bytes": unique,
        "runs": runs,
    }


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def key_figures(r: dict[str, Any]) -> dict[str, float]:
    """The figures the issue sets targets for (medians over runs; the worst machine count)."""
    runs = r["runs"]
    counts = sorted({int(c) for c in runs[0]["staggered"]})

    def worst(mode: str) -> float:
        return max(med([run[mode][c]["origin_ratio"] for run in runs]) for c in counts)

    return {
        "machines": float(max(counts)),
        "staggered": worst("staggered"),
        "simultaneous": worst("simultaneous"),
        "far_s": med([x["far_alone_s"] for x in runs]),
        "warm_s": med([x["warm_fleet_s"] for x in runs]),
        "speedup": med([x["far_alone_s"] / x["warm_fleet_s"] for x in runs]),
        "local_s": med([x["local_s"] for x in runs]),
        "tiered_s": med([x["tiered_s"] for x in runs]),
        "overhead": med([x["tiered_s"] / x["local_s"] for x in runs]),
        "cpu_overhead": med([x["tiered_cpu"] / x["local_cpu"] for x in runs]),
    }


def report(r: dict[str, Any]) -> str:
    runs = r["runs"]
    n = len(runs)
    counts = sorted({int(c) for c in runs[0]["staggered"]})

    def col(mode: str, count: int, key: str) -> float:
        return med([run[mode][count][key] for run in runs])

    own = max(1, r["base_mib"] // 16)
    lines = [
        f"## fleet benchmark, medians of {n} runs ({r['machine']})",
        "",
        f"{r['images']} images: a {r['base_mib']} MiB base shared + 1-2 own layers of {own} MiB "
        f"each; unique blob bytes {r['unique_bytes'] / MIB:.1f} MiB. Far origin: "
        f"{r['rate_mb_s']:g} MB/s shared, +{r['delay_ms']:g} ms per request. "
        "Fleet: a loopback registry, fresh each measurement.",
        "",
        "| machines | origin / unique, staggered (target 1.00) | origin / unique, simultaneous "
        "(target <= 1.5) | fleet MiB up / served, staggered | fleet MiB up / served, "
        "simultaneous | wall s, staggered | wall s, simultaneous | claim waits, simultaneous |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in counts:
        lines.append(
            f"| {c} | {col('staggered', c, 'origin_ratio'):.3f} | "
            f"{col('simultaneous', c, 'origin_ratio'):.3f} | "
            f"{col('staggered', c, 'fleet_up') / MIB:.1f} / "
            f"{col('staggered', c, 'fleet_served') / MIB:.1f} | "
            f"{col('simultaneous', c, 'fleet_up') / MIB:.1f} / "
            f"{col('simultaneous', c, 'fleet_served') / MIB:.1f} | "
            f"{col('staggered', c, 'wall_s'):.2f} | {col('simultaneous', c, 'wall_s'):.2f} | "
            f"{col('simultaneous', c, 'claim_waits'):g} |"
        )
    far, warm = med([x["far_alone_s"] for x in runs]), med([x["warm_fleet_s"] for x in runs])
    loc, tie = med([x["local_s"] for x in runs]), med([x["tiered_s"] for x in runs])
    speedups = [x["far_alone_s"] / x["warm_fleet_s"] for x in runs]
    overheads = [x["tiered_s"] / x["local_s"] for x in runs]
    lc, tc = med([x["local_cpu"] for x in runs]), med([x["tiered_cpu"] for x in runs])
    cpu_ratios = [x["tiered_cpu"] / x["local_cpu"] for x in runs]
    errors = sum(
        v["write_errors"] + v["read_errors"] for x in runs for m in ("staggered", "simultaneous")
        for v in x[m].values()
    )  # fmt: skip
    lines += [
        "",
        "| one cold machine, all 8 images | s | ratio (median of per-run ratios) | target |",
        "|---|---:|---:|---|",
        f"| far origin, local cache alone | {far:.2f} | | |",
        f"| far origin, warm fleet | {warm:.2f} | far / warm fleet = {med(speedups):.2f} "
        f"(runs {', '.join(f'{s:.2f}' for s in speedups)}) | >= 4 |",
        f"| loopback origin, local cache alone | {loc:.2f} | | |",
        f"| loopback origin, tiered(local, cold fleet) | {tie:.2f} | tiered / local = "
        f"{med(overheads):.2f} (runs {', '.join(f'{s:.2f}' for s in overheads)}) | <= 1.15 |",
        f"| the same, the puller's own CPU s (user + system) | {lc:.2f} / {tc:.2f} | "
        f"tiered / local = {med(cpu_ratios):.2f} | (what the client adds) |",
        "",
        f"Fleet write and read errors over all machines: {errors}.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--base-mib", type=int, default=64, help="the shared base layer (MiB)")
    p.add_argument("--machines", default="1,4,8", help="machine counts, comma-separated")
    p.add_argument("--rate-mb", type=float, default=50.0, help="far link, MB/s (10^6 bytes)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="far link, added per request")
    p.add_argument("--dir", default=None, help="where the temp dirs go (default: system temp)")
    p.add_argument("--json", default=None, help=f"results file (default {RESULTS})")
    p.add_argument("--machine", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.machines = [int(x) for x in str(args.machines).split(",")]
    return args


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.machine is not None:
        machine_main(args.machine)
        return
    t0 = time.perf_counter()
    r = main(args)
    r["total_s"] = time.perf_counter() - t0
    r["key_figures"] = key_figures(r)
    print(report(r))
    out = Path(args.json) if args.json else RESULTS
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    run()
