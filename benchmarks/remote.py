"""Benchmark: one big blob from a loopback registry, read by curl and by our client.

Debian's ``docker-registry`` (distribution 2.8, filesystem storage in a temp
directory) is started on loopback and one random image is pushed to it: one
layer, a gzip'd tar of ``--size-mib`` MiB of random bytes (so the blob is
about that big). The image is then dropped from memory. In each of ``--runs``
rounds the blob is read, in this order:

a   by ``curl -s -o /dev/null URL``: the registry's speed to a reader that
    does nothing (the process is timed, start-up included);
b   by ``remote.Client`` in a fresh Python process, drained to nowhere (the
    client verifies digest and size as it streams);
c   through ``cache.image(img, FilesystemCache(dir))`` in a fresh Python
    process, cold (a fresh directory; durability "full": the entry is
    fsync'd before its rename, and the directory after it);
d   by ``curl -s -o FILE URL`` into a new file beside c's directories, then
    ``sync FILE`` (a second process; both timed): a durable download, the
    least that c must also do.

In b and c only the stream is timed, from opening the layer's compressed
stream to its end: the child opens the image (and the cache) untimed, says
it is ready, and streams when the parent says go; it reports the time and
its peak RSS as JSON on stdout. The children never held the image, so their
peak RSS is the client's own; it is read from ``VmHWM`` (see
``peak_rss_mib``: on Linux a child's ``ru_maxrss`` starts at its parent's
peak). Before each scenario dirty pages are written back and memory is
primed (see ``settle``). Medians over the rounds are printed as a markdown
table, and written to ``benchmarks/results/remote.json``.

Run: ``python benchmarks/remote.py [--size-mib N] [--runs N] [--dir PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from aiolayercache import Hash, cache, remote
from aiolayercache.cache import FilesystemCache
from aiolayercache.streams import drain
from benchmarks.common import filesystem_of

MIB = 1 << 20
MB = 1_000_000
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "remote.json"
READY, GO = "ready", "go"
REPO = "bench/big"
TAG = "v1"

SCENARIOS: dict[str, str] = {
    "a": "curl -o /dev/null",
    "b": "remote.Client, drained (verified)",
    "c": "cache.image(FilesystemCache) cold, durability=full",
    "d": "curl -o FILE && sync FILE",
}
AIMS = {"b/a": 0.8, "c/d": 0.9, "rss_c_mib": 100.0}


def rss_mib(maxrss: int) -> float:
    """``ru_maxrss`` in MiB (it is KiB on Linux, bytes on macOS)."""
    return maxrss / MIB if sys.platform == "darwin" else maxrss / 1024


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB: ``VmHWM`` on Linux, else ``ru_maxrss``.

    On Linux ``ru_maxrss`` is no good in a child: exec keeps the high-water
    mark of the address space it replaces, which for a child of this
    benchmark is a copy of the parent's (that held the image and primes
    memory). ``VmHWM`` counts the child's own address space only.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# --- the child: scenarios b and c, in a process of their own ---------------------------


async def child(kind: str, ref: str, cache_dir: str | None) -> dict[str, Any]:
    """Read the image's one layer by ``remote.Client``, through the cache when ``c``."""
    async with remote.Client() as client:
        img = await client.image(ref)
        fs: FilesystemCache | None = None
        if kind == "c":
            assert cache_dir is not None
            fs = FilesystemCache(cache_dir)
            img = cache.image(img, fs)
        layer = (await img.layers())[0]
        # Set up (untimed); the parent settles memory now, then says go (see run_child).
        print(READY, flush=True)
        if sys.stdin.readline().strip() != GO:
            raise SystemExit("no go from the parent")
        before = resource.getrusage(resource.RUSAGE_SELF)
        rss_before = peak_rss_mib()
        t0 = time.perf_counter()
        n = await drain(await layer.compressed())
        elapsed = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "kind": kind,
        "seconds": elapsed,
        "bytes": n,
        "digest": str(await layer.digest()),
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(),
        "ru_maxrss_mib": rss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "write_errors": fs.write_errors if fs is not None else None,
    }


def run_child(
    kind: str, ref: str, cache_dir: str | None, before: Callable[[], None]
) -> dict[str, Any]:
    """Run the child for ``kind``; call ``before`` between its set-up and its timed stream.

    The child process starts, opens the image (and the cache) and says it is
    ready; only then is memory settled, so the timed stream follows the
    priming by milliseconds instead of an interpreter start-up.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--ref", ref]
    if cache_dir is not None:
        cmd += ["--cache-dir", cache_dir]
    with subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        if proc.stdout.readline().strip() == READY:
            before()
            proc.stdin.write(GO + "\n")
            proc.stdin.flush()
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind}: child failed ({proc.returncode}):\n{err[-4000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


# --- the parent --------------------------------------------------------------------------


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(cmds: list[list[str]]) -> tuple[float, float, list[str]]:
    """Run ``cmds`` one after the other: (seconds, CPU seconds of the processes, stdouts)."""
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    outs = []
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        outs.append(proc.stdout)
    return time.perf_counter() - t0, children_cpu() - cpu0, outs


def settle(prime: int = 0, directory: str | None = None) -> None:
    """Untimed, right before each measurement: write back dirty pages, then prime memory.

    As in ``tee.py``: dirty pages of one scenario would otherwise be written
    back during the next. And on VMs with free-page reporting (virtio-balloon)
    pages freed a few seconds earlier go back to the host, and the first touch
    of them again costs several times more: on the 2-CPU VM this was written
    on, writing 256 MiB into the page cache took 0.06 s of kernel time, or at
    random 0.2-0.75 s. So ``prime`` bytes of memory are touched and freed,
    and a file of ``prime`` bytes is written in ``directory`` and deleted
    (never written back): the page cache allocations that follow (c's entry,
    d's file) then reuse warm pages; touching anonymous memory alone does not
    do it reliably. It is done before every scenario, since all of them
    allocate; the children (b, c) are primed after their start-up, right
    before their timed stream.
    """
    os.sync()
    if not prime:
        return
    touched = bytearray(b"\x01") * prime
    del touched
    if directory is not None:
        block = b"\x01" * MIB
        fd, path = tempfile.mkstemp(prefix="prime-", suffix=".tmp", dir=directory)
        try:
            for _ in range(0, prime, MIB):
                os.write(fd, block)
        finally:
            os.close(fd)
            os.unlink(path)


async def push(size: int) -> tuple[Any, str, str, int]:
    """Start the registry in a temp dir and push the image: (registry, host, digest, bytes)."""
    sys.path.insert(0, str(ROOT))
    from aiolayercache import random as random_images
    from tests.registry import push_image, start_registry

    work = Path(tempfile.mkdtemp(prefix="remote-bench-registry-"))
    reg = start_registry(work, work / "data")
    try:
        img = random_images.image(size, 1)
        layer = (await img.layers())[0]
        digest = str(await layer.digest())
        blob_bytes = await layer.size()
        await push_image(reg.host, REPO, TAG, img)
        del img, layer
    except BaseException:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
        raise
    return reg, reg.host, digest, blob_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=256, help="random bytes in the layer (256)")
    p.add_argument("--runs", type=int, default=3, help="rounds of a, b, c, d (3)")
    p.add_argument(
        "--dir",
        default=tempfile.gettempdir(),
        help="where c's cache directories and d's files are made (default: the system temp dir)",
    )
    p.add_argument(
        "--no-prime",
        action="store_true",
        help="do not prime memory and page cache (2x the blob) before each scenario (settle)",
    )
    p.add_argument("--json", type=Path, default=RESULTS, help=f"results file ({RESULTS})")
    # The child mode (b, c), run by the benchmark itself.
    p.add_argument("--child", choices=["b", "c"], help=argparse.SUPPRESS)
    p.add_argument("--ref", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size_mib < 1 or args.runs < 1:
        p.error("--size-mib and --runs must be at least 1")
    return args


def measure(args: argparse.Namespace, host: str, digest: str, blob_bytes: int) -> dict[str, Any]:
    ref = f"{host}/{REPO}:{TAG}"
    url = f"http://{host}/v2/{REPO}/blobs/{digest}"
    curl = ["curl", "-s", "-S", "-f", "-w", "%{size_download}"]
    times: dict[str, list[float]] = {k: [] for k in SCENARIOS}
    cpu: dict[str, list[float]] = {k: [] for k in SCENARIOS}
    rss: dict[str, list[float]] = {"b": [], "c": []}
    rss_before: dict[str, list[float]] = {"b": [], "c": []}
    maxrss: dict[str, list[float]] = {"b": [], "c": []}
    prime = 0 if args.no_prime else 2 * blob_bytes
    entry_name = Hash.parse(digest).filename

    def prepare() -> None:
        settle(prime, args.base)

    def check(key: str, n: int) -> None:
        if n != blob_bytes:
            raise RuntimeError(f"{key}: read {n} bytes, want {blob_bytes}")

    def record_child(key: str, r: dict[str, Any]) -> None:
        check(key, r["bytes"])
        if r["digest"] != digest:
            raise RuntimeError(f"{key}: read layer {r['digest']}, want {digest}")
        times[key].append(r["seconds"])
        cpu[key].append(r["cpu_s"])
        rss[key].append(r["peak_rss_mib"])
        rss_before[key].append(r["rss_before_mib"])
        maxrss[key].append(r["ru_maxrss_mib"])

    for run in range(args.runs):
        cold = tempfile.mkdtemp(prefix="remote-cache-", dir=args.base)
        files = tempfile.mkdtemp(prefix="remote-curl-", dir=args.base)
        if os.stat(cold).st_dev != os.stat(files).st_dev:
            raise RuntimeError(f"{cold} and {files} are on different filesystems")
        try:
            prepare()
            s, c, outs = timed([[*curl, "-o", os.devnull, url]])
            check("a", int(outs[0]))
            times["a"].append(s)
            cpu["a"].append(c)

            record_child("b", run_child("b", ref, None, prepare))

            r = run_child("c", ref, cold, prepare)
            if r["write_errors"]:
                raise RuntimeError(f"c: {r['write_errors']} cache write errors")
            st = os.stat(os.path.join(cold, entry_name))
            check("c (cache entry)", st.st_size)
            record_child("c", r)

            prepare()
            target = os.path.join(files, "blob")
            s, c, outs = timed([[*curl, "-o", target, url], ["sync", target]])
            check("d", int(outs[0]))
            check("d (file)", os.path.getsize(target))
            times["d"].append(s)
            cpu["d"].append(c)
        finally:
            shutil.rmtree(cold, ignore_errors=True)
            shutil.rmtree(files, ignore_errors=True)
        done = ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items())
        mem = ", ".join(f"{k} {v[-1]:.0f} MiB" for k, v in rss.items())
        print(f"run {run + 1}/{args.runs}: {done}; peak RSS {mem}", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    mbps = {k: blob_bytes / med[k] / MB for k in SCENARIOS}
    return {
        "size_mib": args.size_mib,
        "blob_bytes": blob_bytes,
        "digest": digest,
        "runs": args.runs,
        "dir": args.base,
        "filesystem": args.filesystem,
        "memory_primed": not args.no_prime,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "scenarios": {
            k: {
                "what": SCENARIOS[k],
                "seconds": times[k],
                "median_s": med[k],
                "mb_per_s": mbps[k],
                "cpu_s": cpu[k],
                "median_cpu_s": statistics.median(cpu[k]),
                "peak_rss_mib": rss.get(k),
                "max_peak_rss_mib": max(rss[k]) if k in rss else None,
                "rss_before_stream_mib": rss_before.get(k),
                "ru_maxrss_mib": maxrss.get(k),
            }
            for k in SCENARIOS
        },
        "ratios": {
            "b/a (throughput)": mbps["b"] / mbps["a"],
            "c/d (throughput)": mbps["c"] / mbps["d"],
        },
        "peak_rss_c_mib": max(rss["c"]),
        "peak_rss_b_mib": max(rss["b"]),
        "aims": AIMS,
    }


def report(r: dict[str, Any]) -> str:
    sc = r["scenarios"]
    ratios = r["ratios"]
    lines = [
        f"## remote benchmark: {r['size_mib']} MiB random layer ({r['blob_bytes']} bytes "
        f"gzip'd) from a loopback docker-registry, median of {r['runs']} runs",
        "",
        f"files of c and d: {r['dir']} ({r['filesystem']}); Python {r['python']}, "
        f"{r['cpus']} CPUs; MB = 10^6 bytes; a and d time whole curl (and sync) processes, "
        "b and c the stream only (open to end) in a fresh process; "
        + ("memory and page cache primed" if r["memory_primed"] else "memory NOT primed")
        + " before each scenario (see settle())",
        "",
        "| scenario | what | median s | MB/s | CPU s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for k, s in sc.items():
        peak = "-" if s["max_peak_rss_mib"] is None else f"{s['max_peak_rss_mib']:.0f}"
        lines.append(
            f"| {k} | {s['what']} | {s['median_s']:.3f} | {s['mb_per_s']:.0f} | "
            f"{s['median_cpu_s']:.2f} | {peak} |"
        )
    b_a = ratios["b/a (throughput)"]
    c_d = ratios["c/d (throughput)"]
    rss_c = r["peak_rss_c_mib"]

    def ok(good: bool) -> str:
        return "yes" if good else "**no**"

    lines += [
        "",
        "| ratio | value | aim | met |",
        "|---|---:|---:|---|",
        f"| b/a (throughput) | {b_a:.2f} | >= {AIMS['b/a']} | {ok(b_a >= AIMS['b/a'])} |",
        f"| c/d (throughput) | {c_d:.2f} | >= {AIMS['c/d']} | {ok(c_d >= AIMS['c/d'])} |",
        f"| peak RSS of c (MiB) | {rss_c:.0f} | < {AIMS['rss_c_mib']:.0f} | "
        f"{ok(rss_c < AIMS['rss_c_mib'])} |",
        "",
        f"peak RSS is the child's VmHWM, worst over the runs (b: {r['peak_rss_b_mib']:.0f} MiB); "
        f"before the stream opened it was {max(sc['c']['rss_before_stream_mib']):.0f} MiB in c "
        "(interpreter, imports, manifest and config). CPU s: of the child during the stream "
        "(b, c), of the curl and sync processes (a, d).",
    ]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        result = anyio.run(child, args.child, args.ref, args.cache_dir, backend="asyncio")
        print(json.dumps(result), flush=True)
        return
    if shutil.which("curl") is None or shutil.which("sync") is None:
        sys.exit("remote.py needs curl and sync on PATH")
    args.base = os.path.realpath(args.dir)
    os.makedirs(args.base, exist_ok=True)
    args.filesystem = filesystem_of(args.base)
    size = args.size_mib * MIB
    t0 = time.perf_counter()
    reg, host, digest, blob_bytes = asyncio.run(push(size))
    gc.collect()
    try:
        print(
            f"pushed a {args.size_mib} MiB random layer to {host}/{REPO}:{TAG}: {blob_bytes} "
            f"bytes gzip'd, {digest} ({time.perf_counter() - t0:.1f} s, not timed)",
            flush=True,
        )
        print(f"files of c and d under {args.base} ({args.filesystem})", flush=True)
        result = measure(args, host, digest, blob_bytes)
    finally:
        reg.stop()
        shutil.rmtree(reg.root.parent, ignore_errors=True)
    print()
    print(report(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    run()
