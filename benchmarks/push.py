"""Benchmark: pushing, ours against skopeo, in one run on one loopback registry.

A  push of a 4 x 64 MiB Docker image from an OCI layout (written by skopeo from
   the registry) into a new repository: ours in-process (``Client.write`` of
   ``layout.image``), ours as a command (``aiolayercache copy oci:… REF``,
   when the command exists) and ``skopeo copy oci:… docker://…``.
B  registry-to-registry copy of an 8-platform index (each child 2 x 4 MiB
   layers) into a new repository of the same registry: ours in-process
   (``Client.write`` of ``Client.index``: blobs mounted), ours as a command
   (``copy --all-platforms``) and ``skopeo copy --all``.

Every run pushes into a fresh repository (so nothing is skipped by HEAD; the
registry's storage dedupes bytes, as it would for any client). Contenders
alternate, their order rotating from run to run; medians and ratios to
skopeo are printed as a markdown table and written to
``benchmarks/results/push.json``. Targets (issue 12): in-process at most
0.9 x skopeo, the command at most 1.2 x.

Run: ``python benchmarks/push.py [--runs 5] [--layer-mib 64] [--dir PATH]``.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiolayercache import layout
from aiolayercache.remote import Client
from benchmarks import images
from tests.registry import start_registry

RESULTS = Path(__file__).resolve().parent / "results" / "push.json"
PLATFORMS = [
    "linux/amd64",
    "linux/arm64/v8",
    "linux/arm/v7",
    "linux/arm/v6",
    "linux/386",
    "linux/ppc64le",
    "linux/s390x",
    "linux/riscv64",
]


# skopeo remembers where it saw each blob and mounts from there; each of its runs starts
# without that memory, as ours (a layout source knows no registry) does.
BLOB_INFO_CACHES = [
    Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb"),
    Path.home() / ".local/share/containers/cache/blob-info-cache-v1.boltdb",
    Path.home() / ".local/share/containers/cache/blob-info-cache-v1.sqlite",
    Path("/var/lib/containers/cache/blob-info-cache-v1.sqlite"),
]


def forget_skopeo_blob_locations() -> None:
    for p in BLOB_INFO_CACHES:
        p.unlink(missing_ok=True)


def run_cmd(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr[-2000:]}")


def has_copy_command() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "aiolayercache", "copy", "--help"], capture_output=True, check=False
    )
    return out.returncode == 0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = Path(tempfile.mkdtemp(prefix="aiolayercache-bench-push-", dir=args.dir))
        self.registry = start_registry(self.base / "registry", self.base / "registry" / "data")
        self.host = self.registry.host
        self.n = 0
        self.cli = has_copy_command()

    def close(self) -> None:
        self.registry.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def fresh(self, name: str) -> str:
        self.n += 1
        return f"{self.host}/dst{self.n}/{name}:v1"

    def publish(self) -> None:
        mib = self.args.layer_mib << 20
        blobdir = self.base / "built"
        big = images.make_image([images.make_layer(blobdir, mib) for _ in range(4)])
        children = [
            images.make_image(
                [images.make_layer(blobdir, 4 << 20) for _ in range(2)], oci=True, platform=p
            )
            for p in PLATFORMS
        ]
        multi = images.make_index(children)

        async def go() -> None:
            async with images.Pusher(self.host) as p:
                await p.image("src/big", "v1", big)
                await p.index("src/multi", "v1", multi)

        anyio.run(go)
        shutil.rmtree(blobdir)
        self.layout = self.base / "layout"
        run_cmd(
            [
                "skopeo",
                "copy",
                "--src-tls-verify=false",
                f"docker://{self.host}/src/big:v1",
                f"oci:{self.layout}:v1",
            ]
        )

    # --- contenders -------------------------------------------------------------------

    def a_ours(self) -> float:
        dst = self.fresh("big")

        async def go() -> float:
            img = await layout.image(self.layout, "v1")
            async with Client() as c:
                t0 = time.perf_counter()
                await c.write(dst, img)
                return time.perf_counter() - t0

        return anyio.run(go)

    def a_cli(self) -> float:
        t0 = time.perf_counter()
        run_cmd(
            [sys.executable, "-m", "aiolayercache", "copy", "-q", "--no-cache",
             f"oci:{self.layout}:v1", self.fresh("big")]
        )  # fmt: skip
        return time.perf_counter() - t0

    def a_skopeo(self) -> float:
        forget_skopeo_blob_locations()
        t0 = time.perf_counter()
        run_cmd(
            ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{self.layout}:v1",
             f"docker://{self.fresh('big')}"]
        )  # fmt: skip
        return time.perf_counter() - t0

    def b_ours(self) -> float:
        src, dst = f"{self.host}/src/multi:v1", self.fresh("multi")

        async def go() -> float:
            async with Client() as c:
                t0 = time.perf_counter()
                await c.write(dst, await c.index(src))
                return time.perf_counter() - t0

        return anyio.run(go)

    def b_cli(self) -> float:
        t0 = time.perf_counter()
        run_cmd(
            [sys.executable, "-m", "aiolayercache", "copy", "-q", "--no-cache",
             "--all-platforms", f"{self.host}/src/multi:v1", self.fresh("multi")]
        )  # fmt: skip
        return time.perf_counter() - t0

    def b_skopeo(self) -> float:
        forget_skopeo_blob_locations()
        t0 = time.perf_counter()
        run_cmd(
            ["skopeo", "copy", "-q", "--all", "--src-tls-verify=false",
             "--dest-tls-verify=false", f"docker://{self.host}/src/multi:v1",
             f"docker://{self.fresh('multi')}"]
        )  # fmt: skip
        return time.perf_counter() - t0

    def measure(self, contenders: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
        times: dict[str, list[float]] = {k: [] for k in contenders}
        names = list(contenders)
        for i in range(self.args.runs):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                os.sync()
                times[name].append(contenders[name]())
        return times


def main(args: argparse.Namespace) -> dict[str, Any]:
    b = Bench(args)
    try:
        b.publish()
        a = {"ours": b.a_ours, "skopeo": b.a_skopeo}
        bb = {"ours": b.b_ours, "skopeo": b.b_skopeo}
        if b.cli:
            a["cli"] = b.a_cli
            bb["cli"] = b.b_cli
        result = {"A": b.measure(a), "B": b.measure(bb)}
    finally:
        b.close()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "layer_mib": args.layer_mib,
        "runs": result,
        "median_s": {s: {k: statistics.median(v) for k, v in r.items()} for s, r in result.items()},
    }


def report(r: dict[str, Any]) -> str:
    what = {
        "A": f"push 4 x {r['layer_mib']} MiB from an OCI layout",
        "B": "copy an 8-platform index between repositories",
    }
    lines = [
        f"## push benchmark, medians of {len(r['runs']['A']['ours'])} runs ({r['machine']})",
        "",
        "| scenario | ours in-process s | ours CLI s | skopeo s | in-process / skopeo "
        "(<= 0.9) | CLI / skopeo (<= 1.2) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s, m in r["median_s"].items():
        sk = m["skopeo"]
        cli = m.get("cli")
        lines.append(
            f"| {s}: {what[s]} | {m['ours']:.3f} | "
            + (f"{cli:.3f}" if cli is not None else "-")
            + f" | {sk:.3f} | {m['ours'] / sk:.2f} | "
            + (f"{cli / sk:.2f}" if cli is not None else "-")
            + " |"
        )
    return "\n".join(lines)


def run() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--layer-mib", type=int, default=64)
    p.add_argument("--dir", default=None, help="where the temp dirs go (default: system temp)")
    args = p.parse_args()
    r = main(args)
    print(report(r))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    run()
