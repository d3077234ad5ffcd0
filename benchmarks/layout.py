"""Benchmark: write a 4 x 64 MiB image from a warm cache into a new OCI layout, beside cp -r.

The image's layers are already in a ``FilesystemCache`` (proven), so ours is
``layout.write(new_dir, cache.image(img, fs))``: the config and manifest
from memory, each layer copied from its cache entry (``copy_file_range``,
trusting the cache's proof), fsync'd (durability "full") and renamed, and
``index.json`` last. The peer is ``cp -r`` of an equivalent layout (the one
ours wrote first), which neither verifies nor fsyncs. Both run ``--runs``
times, alternating, into fresh directories on the same filesystem; the table
shows medians and the ratio ours / cp (aim: at most 1.5).

Run: ``python benchmarks/layout.py [--layers 4] [--layer-mib 64] [--runs 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiolayercache import cache, layout, random, validate
from aiolayercache.cache import FilesystemCache

RESULTS = Path(__file__).resolve().parent / "results" / "layout.json"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="aiolayercache-bench-layout-", dir=args.dir))
    try:
        img = random.image(args.layer_mib * 1024 * 1024, args.layers)
        fs = FilesystemCache(base / "cache")
        await cache.prefetch(img, fs)  # warm: every layer proven in the cache
        src = base / "src-layout"
        await layout.write(src, cache.image(img, fs), ref_name="bench")
        await validate.image(await layout.image(src, "bench"))
        times: dict[str, list[float]] = {"ours": [], "ours_fast": [], "cp": []}
        for i in range(args.runs):
            os.sync()
            t0 = time.perf_counter()
            await layout.write(base / f"ours-{i}", cache.image(img, fs), ref_name="bench")
            times["ours"].append(time.perf_counter() - t0)
            os.sync()
            t0 = time.perf_counter()
            await layout.write(
                base / f"fast-{i}", cache.image(img, fs), ref_name="bench", durability="fast"
            )
            times["ours_fast"].append(time.perf_counter() - t0)
            os.sync()
            t0 = time.perf_counter()
            subprocess.run(["cp", "-r", str(src), str(base / f"cp-{i}")], check=True)
            times["cp"].append(time.perf_counter() - t0)
            for name in ("ours", "fast", "cp"):
                shutil.rmtree(base / f"{name}-{i}")
        await validate.image(await layout.image(src, "bench"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    size = args.layers * args.layer_mib * 1024 * 1024
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "bytes": size,
        "runs": times,
        "median_s": med,
        "ratio_ours_cp": med["ours"] / med["cp"],
        "ratio_fast_cp": med["ours_fast"] / med["cp"],
    }


def report(r: dict[str, Any]) -> str:
    mb = r["bytes"] / 1e6
    m = r["median_s"]
    ok = "yes" if r["ratio_ours_cp"] <= 1.5 else "**no**"
    return "\n".join(
        [
            f"## layout benchmark: {r['bytes'] >> 20} MiB image from a warm cache, "
            f"median of {len(r['runs']['ours'])} runs ({r['machine']})",
            "",
            "| what | median s | MB/s |",
            "|---|---:|---:|",
            f"| ours: layout.write from cache (durability full) | {m['ours']:.3f} | "
            f"{mb / m['ours']:.0f} |",
            f"| ours: durability fast | {m['ours_fast']:.3f} | {mb / m['ours_fast']:.0f} |",
            f"| cp -r of an equivalent layout (no fsync) | {m['cp']:.3f} | {mb / m['cp']:.0f} |",
            "",
            f"ratio ours/cp: {r['ratio_ours_cp']:.2f} (aim <= 1.5: {ok}); "
            f"fast/cp: {r['ratio_fast_cp']:.2f}",
        ]
    )


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--layer-mib", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dir", default=None, help="where the temp dirs go (default: system temp)")
    args = p.parse_args()
    r = anyio.run(main, args)
    print(report(r))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    run()
