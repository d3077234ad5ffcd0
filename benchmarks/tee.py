"""Benchmark: the cost of reading a layer through ``cache.image(FilesystemCache)``.

One random layer (a gzip'd tar of ``--size-mib`` MiB of random bytes, held in
memory) is read, in each of ``--runs`` rounds:

a   straight from its source, wrapped in a ``VerifyingStream`` (digest and size
    checked): what any careful reader pays;
b   through ``cache.image(img, FilesystemCache(dir))`` into a fresh directory
    (cold; durability "full", so the entry and the directory are fsync'd);
b'  the same with ``durability="fast"`` (no fsync), on another fresh directory;
c   through a new ``cache.image(img, FilesystemCache(dir))`` on b's directory
    (warm; the entry is hashed again as it streams);
d   b's cache file hashed with hashlib in a plain blocking loop (1 MiB reads):
    the limit of any verified read of that file.

The warm file is in the page cache for both c and d. Beside a, b, b' and c, a
task in the same event loop sleeps 1 ms in a loop and records its worst
lateness (event-loop stall). Medians over the rounds are printed as a markdown
table, and written to ``benchmarks/results/tee.json``.

Run: ``python benchmarks/tee.py [--size-mib N] [--runs N] [--dir PATH]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from aiolayercache import cache
from aiolayercache import random as random_layers
from aiolayercache.cache import FilesystemCache
from aiolayercache.streams import VerifyingStream, drain
from benchmarks.common import filesystem_of

MIB = 1 << 20
MB = 1_000_000
TICK = 0.001  # the stall monitor's sleep
READ_CHUNK = MIB  # the blocking loop's read size (d)
RESULTS = Path(__file__).resolve().parent / "results" / "tee.json"

SCENARIOS: dict[str, str] = {
    "a": "source, digest checked (VerifyingStream)",
    "b": "cache.image(FilesystemCache) cold, durability=full",
    "b'": "cache.image(FilesystemCache) cold, durability=fast",
    "c": "cache.image(FilesystemCache) warm",
    "d": "cached file, hashlib in a plain blocking loop",
}
AIMS = {"b/a": 1.2, "c/d": 0.8, "stall_ms": 20.0}


class StallMonitor:
    """Sleeps ``TICK`` in a loop and keeps the worst lateness of its wake-ups."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.ticks = 0

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            t0 = time.monotonic()
            await anyio.sleep(TICK)
            late = time.monotonic() - t0 - TICK
            self.ticks += 1
            if late > self.worst:
                self.worst = late


async def measure(read: Callable[[], Awaitable[int]]) -> tuple[float, int, float]:
    """Time ``read()`` with a stall monitor beside it: (seconds, bytes, worst stall in s)."""
    monitor = StallMonitor()
    async with anyio.create_task_group() as tg:
        await tg.start(monitor.run)
        t0 = time.perf_counter()
        n = await read()
        elapsed = time.perf_counter() - t0
        tg.cancel_scope.cancel()
    return elapsed, n, monitor.worst


def hash_file(path: str) -> tuple[float, int, str]:
    """(d): hash ``path`` with hashlib in a plain blocking loop: (seconds, bytes, hex)."""
    t0 = time.perf_counter()
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_CHUNK):
            n += len(chunk)
            h.update(chunk)
    hexdigest = h.hexdigest()
    return time.perf_counter() - t0, n, hexdigest


def settle(prime: int = 0) -> None:
    """Untimed, before each measurement: write back dirty pages, then touch ``prime`` bytes.

    Dirty pages left by one scenario would otherwise be written back during
    the next. Touching memory (then freeing it) matters on VMs with free-page
    reporting (virtio-balloon): pages freed a few seconds earlier go back to
    the host, and the first write into them again costs about ten times more
    (a 256 MiB write into the page cache takes ~600 ms instead of ~60 ms),
    which would land, at random, in the cold writes (b, b').
    """
    os.sync()
    if prime:
        touched = bytearray(b"\x01") * prime
        del touched


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=256, help="random bytes in the layer (256)")
    p.add_argument("--runs", type=int, default=3, help="rounds of a, b, b', c, d (3)")
    p.add_argument(
        "--dir",
        default=tempfile.gettempdir(),
        help="where the cache directories are made (default: the system temp dir)",
    )
    p.add_argument(
        "--no-prime",
        action="store_true",
        help="do not touch 2x the layer size of memory before each cold write (see settle)",
    )
    p.add_argument("--json", type=Path, default=RESULTS, help=f"results file ({RESULTS})")
    args = p.parse_args(argv)
    if args.size_mib < 1 or args.runs < 1:
        p.error("--size-mib and --runs must be at least 1")
    return args


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def rss_mib(maxrss: int) -> float:
    """``ru_maxrss`` in MiB (it is KiB on Linux, bytes on macOS)."""
    return maxrss / MIB if sys.platform == "darwin" else maxrss / 1024


async def main(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * MIB
    t0 = time.perf_counter()
    img = random_layers.image(size, 1)
    plain = (await img.layers())[0]
    digest = await plain.digest()
    blob_size = await plain.size()
    build_s = time.perf_counter() - t0
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"built a {args.size_mib} MiB random layer: {blob_size} bytes gzip'd, {digest} "
        f"({build_s:.1f} s, not timed)",
        flush=True,
    )
    base: str = args.base
    print(f"cache directories under {base} ({args.filesystem})", flush=True)

    times: dict[str, list[float]] = {k: [] for k in SCENARIOS}
    stalls: dict[str, list[float]] = {k: [] for k in SCENARIOS if k != "d"}

    async def read_plain() -> int:
        stream = await plain.compressed()
        return await drain(VerifyingStream(stream, digest, blob_size))

    def read_cached(path: str, durability: Literal["full", "fast"]) -> Callable[[], Awaitable[int]]:
        async def read() -> int:
            fs = FilesystemCache(path, durability=durability)
            layer = (await cache.image(img, fs).layers())[0]
            return await drain(await layer.compressed())

        return read

    def record(key: str, result: tuple[float, int, float]) -> None:
        elapsed, n, stall = result
        if n != blob_size:
            raise RuntimeError(f"{key}: read {n} bytes, want {blob_size}")
        times[key].append(elapsed)
        stalls[key].append(stall)

    prime = 0 if args.no_prime else 2 * size
    for run in range(args.runs):
        cold = tempfile.mkdtemp(prefix="tee-full-", dir=base)
        fast = tempfile.mkdtemp(prefix="tee-fast-", dir=base)
        try:
            settle()
            record("a", await measure(read_plain))
            settle(prime)
            record("b", await measure(read_cached(cold, "full")))
            settle(prime)
            record("b'", await measure(read_cached(fast, "fast")))
            settle()
            record("c", await measure(read_cached(cold, "full")))
            settle()
            entry = os.path.join(cold, digest.filename)
            d_s, d_n, d_hex = hash_file(entry)
            if d_n != blob_size or d_hex != digest.hex:
                raise RuntimeError(f"d: cached file {entry} does not match {digest}")
            times["d"].append(d_s)
        finally:
            shutil.rmtree(cold, ignore_errors=True)
            shutil.rmtree(fast, ignore_errors=True)
        done = ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
        print(f"run {run + 1}/{args.runs}: {done}", flush=True)

    med = {k: median(v) for k, v in times.items()}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "size_mib": args.size_mib,
        "blob_bytes": blob_size,
        "runs": args.runs,
        "dir": base,
        "filesystem": args.filesystem,
        "memory_primed": not args.no_prime,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "scenarios": {
            k: {
                "what": SCENARIOS[k],
                "seconds": times[k],
                "median_s": med[k],
                "mb_per_s": blob_size / med[k] / MB,
                "stall_ms": [s * 1000 for s in stalls[k]] if k in stalls else None,
                "worst_stall_ms": max(stalls[k]) * 1000 if k in stalls else None,
            }
            for k in SCENARIOS
        },
        "ratios": {
            "b/a (time)": med["b"] / med["a"],
            "b'/a (time)": med["b'"] / med["a"],
            "c/d (throughput)": med["d"] / med["c"],
        },
        "worst_stall_ms": max(max(v) for v in stalls.values()) * 1000,
        "peak_rss_mib": rss_mib(rss_kib),
        "peak_rss_after_build_mib": rss_mib(rss_built),
        "aims": AIMS,
    }


def report(r: dict[str, Any]) -> str:
    sc = r["scenarios"]
    ratios = r["ratios"]
    lines = [
        f"## tee benchmark: {r['size_mib']} MiB random layer ({r['blob_bytes']} bytes gzip'd), "
        f"median of {r['runs']} runs",
        "",
        f"cache dir: {r['dir']} ({r['filesystem']}); Python {r['python']}, {r['cpus']} CPUs; "
        "MB = 10^6 bytes; the warm file is in the page cache for c and d; "
        + ("memory primed" if r["memory_primed"] else "memory NOT primed")
        + " before b and b' (see settle())",
        "",
        "| scenario | what | median s | MB/s | worst stall ms |",
        "|---|---|---:|---:|---:|",
    ]
    for k, s in sc.items():
        stall = "-" if s["worst_stall_ms"] is None else f"{s['worst_stall_ms']:.1f}"
        lines.append(f"| {k} | {s['what']} | {s['median_s']:.3f} | {s['mb_per_s']:.0f} | {stall} |")
    b_a = ratios["b/a (time)"]
    bp_a = ratios["b'/a (time)"]
    c_d = ratios["c/d (throughput)"]
    stall = r["worst_stall_ms"]

    def ok(good: bool) -> str:
        return "yes" if good else "**no**"

    lines += [
        "",
        "| ratio | value | aim | met |",
        "|---|---:|---:|---|",
        f"| b/a (time) | {b_a:.2f} | <= {AIMS['b/a']} | {ok(b_a <= AIMS['b/a'])} |",
        f"| b'/a (time) | {bp_a:.2f} | - | - |",
        f"| c/d (throughput) | {c_d:.2f} | >= {AIMS['c/d']} | {ok(c_d >= AIMS['c/d'])} |",
        f"| worst stall (ms) | {stall:.1f} | < {AIMS['stall_ms']:.0f} | "
        f"{ok(stall < AIMS['stall_ms'])} |",
        "",
        f"peak RSS: {r['peak_rss_mib']:.0f} MiB (ru_maxrss at the end; it was already "
        f"{r['peak_rss_after_build_mib']:.0f} MiB after building the layer in memory"
        + (", and priming touches 2x the layer size" if r["memory_primed"] else "")
        + ")",
    ]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.base = os.path.realpath(args.dir)
    os.makedirs(args.base, exist_ok=True)
    args.filesystem = filesystem_of(args.base)
    result = anyio.run(main, args, backend="asyncio")
    print()
    print(report(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    run()
