"""The benchmark suite: aiolayercache beside skopeo, against a loopback registry.

``python -m benchmarks`` (or ``make bench``) starts Debian's ``docker-registry``
on loopback with temp storage, publishes the images it needs (random bytes,
gzip'd: incompressible, so no one can cheat by compressing; see
``images.py``), and runs each scenario ``--runs`` times, the contenders of a
scenario alternating (their order rotates from run to run). It prints a
markdown table of medians and ratios with each target and whether it is met,
writes everything to ``benchmarks/results/suite.json``, and (on a full run)
the table, with date, machine and command, into ``docs/BENCHMARKS.md``.

Ours is timed two ways. *In-process* (what a user who ``await``s the library
pays): a fresh child interpreter imports the library, then times the pull
alone (``worker.py``), which also gives its peak RSS. *CLI*: the whole
``python -m aiolayercache pull SRC DEST --cache-dir DIR`` process. The peer,
``skopeo copy``, is timed as a whole process. Before every measurement,
untimed, dirty pages are written back and memory is touched (``settle``).

Scenarios:

1  cold, big: a 4 x 64 MiB image to a new OCI layout, empty cache; also the
   peak RSS of each contender, and docker-registry-client-async as a Python
   peer (``peers.py``, ``peer_drca.py``; "not installed" when it is not);
2  warm cache, new destination: every layer already in our cache; the peer
   is skopeo's cold copy;
3  warm, existing destination: the same image again into the same layout
   (each contender its own), against skopeo doing the same, and the CLI
   against ``python -c "import aiohttp"`` (the floor the dependency sets);
4  many small layers: 40 x 256 KiB, cold;
5  multi-platform index: 8 platforms x 2 layers, all platforms, cold and
   warm (new layout), against ``skopeo copy --all`` (cold);
6  fan-in: 32 pulls at once in one process (one Client, one cache), 4 of
   each of 8 images sharing a 64 MiB base layer, each into its own layout,
   through a counting proxy: blob bytes it forwarded / unique blob bytes,
   and the wall time / one pull's; also 8 pulls (each image once);
7  latency: an index of 16 children (2 layers of 64 KiB each) behind a
   proxy that delays every request by 20 ms: ``cache.prefetch`` wall / a
   sequential walk doing the same requests one at a time;
8  memory: peak RSS pulling an image of one 1 GiB layer straight from the
   registry (no proxy: it buffers bodies), and during scenario 6 at 1, 8
   and 32 pulls; ours in-process is the child's ``VmHWM``; CLI and skopeo
   are measured by GNU time (``%M``);
9  ``benchmarks/tee.py`` (the cost of reading through the cache, and warm
   reads), run as it is, and CLI start-up: ``aiolayercache --help``;
10 ``benchmarks/fleet.py`` (machines sharing a fleet tier: origin bytes per
   unique byte, a cold machine with a warm fleet, the fleet tier's cost),
   run as it is (``--quick``: 1 and 4 machines, a 16 MiB base);
11 many images at once (``many.py``): 32 images (a shared 16 MiB base + 3 x
   2 MiB each) into one layout, ours in-process (``asyncio.gather``, one
   Client, one cache) and as one CLI process (``-j 8``), against 8 skopeo
   processes at a time: wall, CPU, peak RSS, blob bytes fetched / unique.

"Flat" in 8 is read as: peak RSS at 32 pulls at most 1.25 x that at one
pull. Each contender's median wall time, CPU time and peak RSS are listed
under the table, with the load average as each group started: the machine
may be shared, and a group that ran loaded should be run again.

``--quick`` shrinks every size (and makes one run the default) for
development; ``--only 1,5-7`` runs some scenarios; ``--render FILE`` prints
(and writes to the docs) the report of a saved ``suite.json``.
"""

from __future__ import annotations

import argparse
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio

from benchmarks import images, peers
from benchmarks.common import filesystem_of
from benchmarks.worker import GO, READY

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.registry import FaultProxy, start_registry  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "suite.json"
DOCS = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- suite table: begin -->", "<!-- suite table: end -->"
KIB, MIB = 1 << 10, 1 << 20
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
SCENARIOS = [str(i) for i in range(1, 12)]
GNU_TIME = "/usr/bin/time"
NOISY = 0.25  # (max - min) / median above this (and over 10 ms) marks samples as noisy
FLAT = 1.25  # "flat as concurrency grows": peak RSS at the most pulls / at one pull


@dataclass(frozen=True)
class Sizes:
    big_layers: int = 4
    big_mib: int = 64
    small_layers: int = 40
    small_kib: int = 256
    index_layers: int = 2
    index_mib: int = 8
    fan_images: int = 8
    fan_pulls: int = 32
    fan_base_mib: int = 64
    fan_top_kib: int = 1024
    lat_children: int = 16
    lat_layers: int = 2
    lat_kib: int = 64
    lat_delay_s: float = 0.020
    huge_mib: int = 1024
    tee_mib: int = 256
    startup_runs: int = 10
    many_images: int = 32
    many_base_mib: int = 16
    many_own_layers: int = 3
    many_own_kib: int = 2048
    many_jobs: int = 8


QUICK = Sizes(
    big_mib=8,
    index_mib=1,
    fan_base_mib=8,
    fan_top_kib=256,
    huge_mib=64,
    tee_mib=32,
    startup_runs=3,
    many_base_mib=4,
    many_own_kib=256,
)


@dataclass
class Row:
    """One line of the table: a measure, ours beside the peer, the value and its target."""

    scenario: str
    what: str
    ours: str
    peer: str
    value: str
    target: str
    met: bool | None  # None: reported, no target

    def cells(self) -> list[str]:
        met = "-" if self.met is None else ("yes" if self.met else "**no**")
        return [self.scenario, self.what, self.ours, self.peer, self.value, self.target, met]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """(max - min) / median; 0 when the difference is under 10 ms (timer and exec jitter)."""
    if len(xs) < 2 or median(xs) <= 0 or max(xs) - min(xs) < 0.010:
        return 0.0
    return (max(xs) - min(xs)) / median(xs)


def secs(x: float) -> str:
    return f"{x:.3f} s"


def mib(x: float) -> str:
    return f"{x:.0f} MiB"


def settle(prime: int = 0) -> None:
    """Untimed, right before each measurement: write back dirty pages, then touch ``prime`` bytes.

    As in ``tee.py`` and ``remote.py``: dirty pages of one contender would
    otherwise be written back during the next; and on VMs with free-page
    reporting the first touch of memory freed a few seconds earlier costs
    several times more, which would land at random in whoever runs next.
    """
    os.sync()
    if prime:
        touched = bytearray(b"\x01") * prime
        del touched


def check_layout(dest: Path, blobs: dict[str, int]) -> None:
    """``dest`` is an OCI layout holding every blob of ``blobs`` with its size (cheap check).

    Layers only: skopeo rewrites a Docker config when it converts it to OCI.
    """
    if not (dest / "index.json").is_file() or not (dest / "oci-layout").is_file():
        raise RuntimeError(f"{dest}: no OCI layout there")
    for digest, size in blobs.items():
        path = dest / "blobs" / "sha256" / digest.split(":", 1)[1]
        if not path.is_file() or path.stat().st_size != size:
            raise RuntimeError(f"{dest}: blob {digest} missing or of the wrong size")


def machine() -> dict[str, Any]:
    mem = "?"
    model = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "skopeo": version(["skopeo", "--version"]),
        "registry": version(["docker-registry", "--version"]),
    }


def revision() -> str:
    """The commit measured, and whether the library's sources had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "?"
    return f"{head or '?'}{' with uncommitted changes in src/' if dirty else ''}"


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


Sample = dict[str, Any]  # "seconds", and "cpu_s" / "peak_rss_mib" when known; extras
Contender = Callable[[], Sample]


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def med(samples: list[Sample], key: str = "seconds") -> float:
    return median([float(s[key]) for s in samples])


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes: Sizes = args.sizes
        self.runs: int = args.runs
        self.base = Path(tempfile.mkdtemp(prefix="aiolayercache-suite-", dir=args.dir))
        self.blobdir = self.base / "built"
        self.rows: list[Row] = []
        self.data: dict[str, Any] = {}
        self.contenders: list[dict[str, Any]] = []
        self.noisy: list[str] = []
        self.python = sys.executable
        self.registry = start_registry(self.base / "registry", self.base / "registry" / "data")
        self.host = self.registry.host

    def close(self) -> None:
        self.registry.stop()
        if not self.args.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    # --- helpers -------------------------------------------------------------------------

    def tmp(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.base))

    def publish(self, push: Callable[[images.Pusher], Any]) -> None:
        async def go() -> None:
            async with images.Pusher(self.host) as p:
                await push(p)

        anyio.run(go, backend="asyncio")
        shutil.rmtree(self.blobdir, ignore_errors=True)  # the registry holds them now

    def single_image(self, repo: str, layers: int, layer_bytes: int) -> tuple[str, dict[str, int]]:
        """Build and push a Docker image of ``layers`` random layers: (ref, layer sizes)."""
        img = images.make_image(
            [images.make_layer(self.blobdir, layer_bytes) for _ in range(layers)]
        )
        self.publish(lambda p: p.image(repo, "v1", img))
        return f"{self.host}/{repo}:v1", img.layer_sizes()

    def worker(self, job: dict[str, Any], prime: int) -> Sample:
        """Run ``job`` in a fresh interpreter (``worker.py``); settle between its import and go."""
        cmd = [self.python, "-m", "benchmarks.worker", json.dumps(job)]
        with subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            if proc.stdout.readline().strip() == READY:
                settle(prime)
                proc.stdin.write(GO + "\n")
                proc.stdin.flush()
            out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"worker {job['kind']} failed ({proc.returncode}):\n{err[-4000:]}")
        result: Sample = json.loads(out.strip().splitlines()[-1])
        return result

    def process(self, cmd: list[str], prime: int, *, rss: bool = False) -> Sample:
        """Time ``cmd`` as a whole process; with ``rss``, GNU time gives its peak RSS and the
        bytes it wrote to files (``%O``: blocks of 512 bytes, the process tree's)."""
        settle(prime)
        rss_file = self.base / "time.out"
        if rss:
            cmd = [GNU_TIME, "-f", "%M %O", "-o", str(rss_file), *cmd]
        cpu0 = children_cpu()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        sample: Sample = {"seconds": elapsed, "cpu_s": children_cpu() - cpu0}
        if rss:
            peak_kib, blocks = rss_file.read_text().split()[-2:]
            sample["peak_rss_mib"] = int(peak_kib) / 1024
            sample["written_mib"] = int(blocks) * 512 / MIB
        return sample

    def pull_job(self, ref: str, dest: Path, cache: Path, *, index: bool) -> dict[str, Any]:
        return {
            "kind": "pull",
            "ref": ref,
            "dest": str(dest),
            "cache": str(cache),
            "index": index,
            "name": ref.rsplit(":", 1)[1],
        }

    def cli_cmd(self, ref: str, dest: Path, cache: Path, *, index: bool) -> list[str]:
        cmd = [self.python, "-m", "aiolayercache", "pull", ref, str(dest)]
        cmd += ["--cache-dir", str(cache)]
        return [*cmd, "--all-platforms"] if index else cmd

    def skopeo_cmd(self, ref: str, dest: Path, *, index: bool) -> list[str]:
        cmd = ["skopeo", "copy", "--quiet", "--src-tls-verify=false"]
        if index:
            cmd.append("--all")
        return [*cmd, f"docker://{ref}", f"oci:{dest}:{ref.rsplit(':', 1)[1]}"]

    def pull(
        self,
        who: str,
        ref: str,
        layers: dict[str, int],
        prime: int,
        *,
        index: bool = False,
        cache: Path | None = None,
        dest: Path | None = None,
        rss: bool = False,
    ) -> Contender:
        """A pull by ``who`` (ours, cli or skopeo): into ``dest`` (kept) or a new layout, through
        ``cache`` (kept) or a new one; the layout is checked after, new directories removed."""

        def go() -> Sample:
            work = self.tmp(f"{who}-")
            out = dest or work / "oci"
            try:
                if who == "ours":
                    job = self.pull_job(ref, out, cache or work / "cache", index=index)
                    sample = self.worker(job, prime)
                elif who == "cli":
                    cmd = self.cli_cmd(ref, out, cache or work / "cache", index=index)
                    sample = self.process(cmd, prime, rss=rss)
                else:
                    sample = self.process(self.skopeo_cmd(ref, out, index=index), prime, rss=rss)
                check_layout(out, layers)
            finally:
                shutil.rmtree(work)
            return sample

        return go

    def alternate(self, group: str, contenders: dict[str, Contender]) -> dict[str, list[Sample]]:
        """Run each contender ``self.runs`` times, alternating, the order rotating per run."""
        load = loadavg()
        print(f"  [{group}] load average {load}", flush=True)
        samples: dict[str, list[Sample]] = {k: [] for k in contenders}
        keys = list(contenders)
        for run in range(self.runs):
            k = run % len(keys)
            for key in keys[k:] + keys[:k]:
                samples[key].append(contenders[key]())
            done = ", ".join(f"{key} {v[-1]['seconds']:.3f}s" for key, v in samples.items())
            print(f"  [{group}] run {run + 1}/{self.runs}: {done}", flush=True)
        for key, v in samples.items():
            xs = [s["seconds"] for s in v]
            if spread(xs) > NOISY:
                self.noisy.append(f"{group}: {key} ({', '.join(f'{x:.3f}' for x in xs)} s)")
            cpu = [s["cpu_s"] for s in v if s.get("cpu_s") is not None]
            rss = [s["peak_rss_mib"] for s in v if s.get("peak_rss_mib") is not None]
            self.contenders.append(
                {
                    "group": group,
                    "contender": key,
                    "median_s": median(xs),
                    "median_cpu_s": median(cpu) if cpu else None,
                    "peak_rss_mib": max(rss) if rss else None,
                    "seconds": xs,
                }
            )
        self.data[group] = {"load_average_before": load, "samples": samples}
        return samples

    def ratio_row(
        self,
        scenario: str,
        what: str,
        ours: list[Sample],
        peer: list[Sample],
        target: float | None,
        peer_what: str = "skopeo",
    ) -> None:
        a, b = med(ours), med(peer)
        self.rows.append(
            Row(
                scenario,
                what,
                secs(a),
                f"{peer_what} {secs(b)}",
                f"{a / b:.2f}",
                "report" if target is None else f"<= {target}",
                None if target is None else a / b <= target,
            )
        )

    # --- scenarios 1-3: a big image ---------------------------------------------------------

    def scenarios_1_3(self, which: set[str]) -> None:
        sz = self.sizes
        what = f"{sz.big_layers} x {sz.big_mib} MiB"
        print(f"scenarios {', '.join(sorted(which))}: {what} image", flush=True)
        ref, layers = self.single_image("bench/big", sz.big_layers, sz.big_mib * MIB)
        prime = min(2 * sum(layers.values()), 1 << 30)
        c: dict[str, Contender] = {}
        if "1" in which:
            c["ours"] = self.pull("ours", ref, layers, prime)
            c["ours CLI"] = self.pull("cli", ref, layers, prime, rss=True)
        if which & {"1", "2"}:
            c["skopeo"] = self.pull("skopeo", ref, layers, prime, rss=True)
        if "1" in which and (drca := peers.drca(self, ref, layers, prime)) is not None:
            c[peers.DRCA] = drca
        if which & {"2", "3"}:
            warm = self.tmp("warm-cache-")
            self.pull("ours", ref, layers, 0, cache=warm)()  # fills it, untimed
        if "2" in which:
            c["ours warm"] = self.pull("ours", ref, layers, prime, cache=warm)
            c["ours CLI warm"] = self.pull("cli", ref, layers, prime, cache=warm)
        if "3" in which:
            dests = {k: self.tmp(f"existing-{k}-") / "oci" for k in ("ours", "cli", "skopeo")}
            for who, d in dests.items():  # the first copy into each, untimed
                self.pull(who, ref, layers, 0, cache=warm, dest=d)()
            c["ours again"] = self.pull("ours", ref, layers, prime, cache=warm, dest=dests["ours"])
            c["ours CLI again"] = self.pull(
                "cli", ref, layers, prime, cache=warm, dest=dests["cli"]
            )
            c["skopeo again"] = self.pull("skopeo", ref, layers, prime, dest=dests["skopeo"])
            c[peers.FLOOR] = peers.floor(self, prime)
        s = self.alternate("1-3 big image", c)
        if "1" in which:
            self.ratio_row("1", f"cold, {what}: in-process", s["ours"], s["skopeo"], 0.85)
            self.ratio_row("1", f"cold, {what}: CLI process", s["ours CLI"], s["skopeo"], 1.1)
            peers.rows_1(self, s, what)
        if "2" in which:
            label = "warm cache, new layout (peer: skopeo cold)"
            self.ratio_row("2", f"{label}: in-process", s["ours warm"], s["skopeo"], 0.2)
            self.ratio_row("2", f"{label}: CLI process", s["ours CLI warm"], s["skopeo"], 0.5)
        if "3" in which:
            label, peer = "warm, existing layout, again", "skopeo again"
            again = s["skopeo again"]
            self.ratio_row("3", f"{label}: in-process", s["ours again"], again, 1.0, peer)
            self.ratio_row("3", f"{label}: CLI process", s["ours CLI again"], again, None, peer)
            self.ratio_row(
                "3",
                f"{label}: CLI process / {peers.FLOOR} (the floor)",
                s["ours CLI again"],
                s[peers.FLOOR],
                1.5,
                "import aiohttp",
            )

    def scenario_4(self) -> None:
        sz = self.sizes
        what = f"{sz.small_layers} x {sz.small_kib} KiB"
        print(f"scenario 4: {what} image", flush=True)
        ref, layers = self.single_image("bench/small", sz.small_layers, sz.small_kib * KIB)
        prime = min(2 * sum(layers.values()), 1 << 30)
        c = {
            "ours": self.pull("ours", ref, layers, prime),
            "ours CLI": self.pull("cli", ref, layers, prime),
            "skopeo": self.pull("skopeo", ref, layers, prime),
        }
        s = self.alternate("4 small layers", c)
        self.ratio_row("4", f"cold, {what}: in-process", s["ours"], s["skopeo"], 0.9)
        self.ratio_row("4", f"cold, {what}: CLI process", s["ours CLI"], s["skopeo"], 1.8)

    # --- scenario 5: an index -------------------------------------------------------------

    def scenario_5(self) -> None:
        sz = self.sizes
        what = f"{len(PLATFORMS)} platforms x {sz.index_layers} x {sz.index_mib} MiB"
        print(f"scenario 5: index of {what}", flush=True)
        children = [
            images.make_image(
                [
                    images.make_layer(self.blobdir, sz.index_mib * MIB)
                    for _ in range(sz.index_layers)
                ],
                oci=True,
                platform=plat,
            )
            for plat in PLATFORMS
        ]
        ii = images.make_index(children)
        self.publish(lambda p: p.index("bench/multi", "v1", ii))
        ref = f"{self.host}/bench/multi:v1"
        layers = ii.layer_sizes()
        prime = min(2 * sum(layers.values()), 1 << 30)
        warm = self.tmp("warm-cache-")
        self.pull("ours", ref, layers, 0, index=True, cache=warm)()  # fills it, untimed
        c = {
            "ours": self.pull("ours", ref, layers, prime, index=True),
            "ours CLI": self.pull("cli", ref, layers, prime, index=True),
            "skopeo": self.pull("skopeo", ref, layers, prime, index=True),
            "ours warm": self.pull("ours", ref, layers, prime, index=True, cache=warm),
            "ours CLI warm": self.pull("cli", ref, layers, prime, index=True, cache=warm),
        }
        s = self.alternate("5 index", c)
        self.ratio_row("5", f"index, {what}, cold: in-process", s["ours"], s["skopeo"], 0.85)
        self.ratio_row("5", "index cold: CLI process", s["ours CLI"], s["skopeo"], 1.3)
        label = "index, warm cache, new layout (peer: skopeo cold)"
        self.ratio_row("5", f"{label}: in-process", s["ours warm"], s["skopeo"], None)
        self.ratio_row("5", f"{label}: CLI process", s["ours CLI warm"], s["skopeo"], None)

    # --- scenario 6 (and 8's fan-in part): fan-in -------------------------------------------

    def scenario_6(self, rows_6: bool, rows_8: bool) -> None:
        sz = self.sizes
        print(
            f"scenario 6: {sz.fan_pulls} pulls of {sz.fan_images} images sharing a "
            f"{sz.fan_base_mib} MiB base layer",
            flush=True,
        )
        base = images.make_layer(self.blobdir, sz.fan_base_mib * MIB)
        imgs = [
            images.make_image([base, images.make_layer(self.blobdir, sz.fan_top_kib * KIB)])
            for _ in range(sz.fan_images)
        ]

        async def push(p: images.Pusher) -> None:
            for i, img in enumerate(imgs):
                await p.image("bench/fan", f"f{i}", img)

        self.publish(push)
        counts = sorted({1, sz.fan_images, sz.fan_pulls})
        proxy = FaultProxy(self.host).start()
        try:
            refs = [f"{proxy.address}/bench/fan:f{i}" for i in range(sz.fan_images)]

            def fan(count: int, bounded: bool = False) -> Contender:
                def go() -> Sample:
                    work = self.tmp(f"fan{count}-")
                    try:
                        picks = [i % len(refs) for i in range(count)]
                        pulls = [(refs[i], str(work / f"oci-{n}")) for n, i in enumerate(picks)]
                        unique: dict[str, int] = {}
                        for i in set(picks):
                            unique.update(imgs[i].blob_sizes())
                        proxy.reset()
                        job = {"kind": "fanin", "cache": str(work / "cache"), "pulls": pulls}
                        job["name"] = "v1"
                        if bounded:  # issue 15: the cache bounded at half the unique bytes
                            job["max_bytes"] = sum(unique.values()) // 2
                        r = self.worker(job, min(2 * sum(unique.values()), 1 << 30))
                        for i, (_, dest) in zip(picks, pulls, strict=True):
                            check_layout(Path(dest), imgs[i].layer_sizes())
                        st = proxy.stats
                        r["blob_bytes"] = st.blob_bytes
                        r["unique_blob_bytes"] = sum(unique.values())
                        r["manifest_bytes"] = st.manifest_bytes
                        r["requests"] = sum(st.requests.values())
                        r["repeated_blob_gets"] = {
                            path.rsplit("/", 1)[1]: n
                            for path, n in st.requests.items()
                            if n > 1 and "/blobs/" in path and path.startswith("GET ")
                        }
                    finally:
                        shutil.rmtree(work)
                    return r

                return go

            contenders = {f"{c} pulls": fan(c) for c in counts}
            contenders[f"{sz.fan_pulls} pulls, bounded"] = fan(sz.fan_pulls, bounded=True)
            s = self.alternate("6 fan-in", contenders)
        finally:
            proxy.stop()
        one, many = s["1 pulls"], s[f"{sz.fan_pulls} pulls"]
        if rows_6:
            ratios = [r["blob_bytes"] / r["unique_blob_bytes"] for r in many]
            worst = max(ratios, key=lambda x: abs(x - 1))
            repeated = max(sum(r["repeated_blob_gets"].values()) for r in many)
            self.rows.append(
                Row(
                    "6",
                    f"fan-in, {sz.fan_pulls} pulls of {sz.fan_images} images: "
                    "blob bytes through the proxy / unique blob bytes",
                    f"{many[0]['blob_bytes'] / MIB:.3f} MiB ({repeated} GETs repeated)",
                    f"unique {many[0]['unique_blob_bytes'] / MIB:.3f} MiB",
                    f"{worst:.5f}",
                    "= 1.00",
                    all(r["blob_bytes"] == r["unique_blob_bytes"] for r in many),
                )
            )
            bounded = s[f"{sz.fan_pulls} pulls, bounded"]
            wall = med(bounded) / med(many)
            refetch = max(r["blob_bytes"] / r["unique_blob_bytes"] for r in bounded)
            self.rows += [
                Row(
                    "6",
                    f"fan-in, {sz.fan_pulls} pulls, cache bounded at half the unique bytes: "
                    "wall / unbounded",
                    secs(med(bounded)),
                    f"unbounded {secs(med(many))}",
                    f"{wall:.2f}",
                    "<= 1.3",
                    wall <= 1.3,
                ),
                Row(
                    "6",
                    "the same: blob bytes through the proxy / unique blob bytes",
                    f"{bounded[0]['blob_bytes'] / MIB:.1f} MiB",
                    f"unique {bounded[0]['unique_blob_bytes'] / MIB:.1f} MiB",
                    f"{refetch:.2f}",
                    "<= 2.5",
                    refetch <= 2.5,
                ),
            ]
            a, b = med(many), med(one)
            self.rows.append(
                Row(
                    "6",
                    f"fan-in: wall of {sz.fan_pulls} pulls / one pull's",
                    secs(a),
                    f"one pull {secs(b)}",
                    f"{a / b:.2f}",
                    f"report ({a / (sz.fan_pulls * b):.2f} of {sz.fan_pulls} x one)",
                    None,
                )
            )
        if rows_8:
            peaks = {c: max(r["peak_rss_mib"] for r in s[f"{c} pulls"]) for c in counts}
            flat = peaks[sz.fan_pulls] / peaks[1]
            self.rows.append(
                Row(
                    "8",
                    "peak RSS, fan-in at " + "/".join(str(c) for c in counts) + " pulls",
                    "/".join(f"{peaks[c]:.0f}" for c in counts) + " MiB",
                    "-",
                    f"{flat:.2f}",
                    f"flat: {sz.fan_pulls} / 1 <= {FLAT}",
                    flat <= FLAT,
                )
            )

    # --- scenario 7: latency --------------------------------------------------------------

    def scenario_7(self) -> None:
        sz = self.sizes
        ms = sz.lat_delay_s * 1000
        print(f"scenario 7: index of {sz.lat_children} children, +{ms:.0f} ms", flush=True)
        children = [
            images.make_image(
                [images.make_layer(self.blobdir, sz.lat_kib * KIB) for _ in range(sz.lat_layers)],
                oci=True,
                platform=PLATFORMS[i % len(PLATFORMS)],
            )
            for i in range(sz.lat_children)
        ]
        ii = images.make_index(children)
        self.publish(lambda p: p.index("bench/lat", "v1", ii))
        proxy = FaultProxy(self.host).start()
        try:
            ref = f"{proxy.address}/bench/lat:v1"

            def walk(kind: str) -> Contender:
                def go() -> Sample:
                    work = self.tmp(f"{kind}-")
                    try:
                        proxy.reset()
                        proxy.add("", "delay", sz.lat_delay_s, times=1 << 30, method=None)
                        r = self.worker({"kind": kind, "ref": ref, "cache": str(work)}, 0)
                        r["requests"] = sum(proxy.stats.requests.values())
                        if r["layers"] != sz.lat_children * sz.lat_layers:
                            raise RuntimeError(f"{kind}: read {r['layers']} layers")
                    finally:
                        shutil.rmtree(work)
                    return r

                return go

            s = self.alternate("7 latency", {"prefetch": walk("prefetch"), "walk": walk("walk")})
        finally:
            proxy.stop()
        n = med(s["walk"], "requests")
        self.ratio_row(
            "7",
            f"latency: index of {sz.lat_children} x {sz.lat_layers} layers, +{ms:.0f} ms per "
            f"request ({n:.0f} requests): cache.prefetch / sequential walk",
            s["prefetch"],
            s["walk"],
            0.2,
            "sequential",
        )

    # --- scenario 8: one huge layer -----------------------------------------------------

    def scenario_8(self) -> None:
        sz = self.sizes
        print(f"scenario 8: one {sz.huge_mib} MiB layer", flush=True)
        ref, layers = self.single_image("bench/huge", 1, sz.huge_mib * MIB)
        prime = min(2 * sum(layers.values()), 1 << 30)
        c = {
            "ours": self.pull("ours", ref, layers, prime),
            "ours CLI": self.pull("cli", ref, layers, prime, rss=True),
            "skopeo": self.pull("skopeo", ref, layers, prime, rss=True),
        }
        s = self.alternate("8 huge layer", c)
        peak = {k: max(x["peak_rss_mib"] for x in v) for k, v in s.items()}
        after_import = max(x["rss_before_mib"] for x in s["ours"])
        what = f"one {sz.huge_mib} MiB layer, cold"
        self.rows.append(
            Row(
                "8",
                f"peak RSS, {what}: in-process ({after_import:.0f} MiB of it after import)",
                mib(peak["ours"]),
                f"skopeo {mib(peak['skopeo'])}",
                f"{peak['ours']:.0f}",
                "<= 64 MiB",
                peak["ours"] <= 64,
            )
        )
        self.rows.append(
            Row(
                "8",
                f"peak RSS, {what}: CLI process",
                mib(peak["ours CLI"]),
                f"skopeo {mib(peak['skopeo'])}",
                f"{peak['ours CLI']:.0f}",
                "report",
                None,
            )
        )
        self.ratio_row("8", f"time, {what}: in-process", s["ours"], s["skopeo"], None)

    # --- scenario 10: fleet.py (machines sharing a fleet tier) --------------------------------

    def scenario_10(self) -> None:
        quick = self.sizes.tee_mib < 256
        machines, base = ("1,4", 16) if quick else ("1,4,8", 64)
        print(f"scenario 10: fleet.py (machines {machines}, {base} MiB base)", flush=True)
        out = self.args.json.parent / "fleet.json"
        cmd = [self.python, str(ROOT / "benchmarks" / "fleet.py"), "--runs", str(self.runs)]
        cmd += ["--machines", machines, "--base-mib", str(base), "--dir", str(self.base)]
        cmd += ["--json", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"fleet.py failed:\n{proc.stderr[-4000:]}")
        k = json.loads(out.read_text())["key_figures"]
        self.data["10 fleet.py"] = k
        m = int(k["machines"])
        self.rows += [
            Row("10", f"fleet: origin bytes / unique, up to {m} machines one after another",
                f"{k['staggered']:.3f}", "-", f"{k['staggered']:.3f}", "= 1.00",
                k["staggered"] <= 1.0005),
            Row("10", f"fleet: origin bytes / unique, up to {m} machines at once",
                f"{k['simultaneous']:.3f}", "-", f"{k['simultaneous']:.3f}", "<= 1.5",
                k["simultaneous"] <= 1.5),
            Row("10", "fleet: far origin alone / a cold machine with a warm fleet (time)",
                secs(k["warm_s"]), f"far {secs(k['far_s'])}", f"{k['speedup']:.2f}", ">= 4",
                k["speedup"] >= 4),
            Row("10", "fleet: tiered(local, cold fleet) / local cache alone, loopback origin",
                secs(k["tiered_s"]), f"local {secs(k['local_s'])}", f"{k['overhead']:.2f}",
                "<= 1.15", k["overhead"] <= 1.15),
            Row("10", "fleet: the same, the puller's own CPU", "-", "-",
                f"{k['cpu_overhead']:.2f}", "-", None),
        ]  # fmt: skip

    # --- scenario 9: tee.py and start-up --------------------------------------------------

    def scenario_9(self) -> None:
        sz = self.sizes
        print(f"scenario 9: tee.py ({sz.tee_mib} MiB) and CLI start-up", flush=True)
        tee_json = self.args.json.parent / "tee.json"
        cmd = [self.python, str(ROOT / "benchmarks" / "tee.py"), "--size-mib", str(sz.tee_mib)]
        cmd += ["--runs", str(self.runs), "--dir", str(self.base), "--json", str(tee_json)]
        load = loadavg()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"tee.py failed:\n{proc.stderr[-4000:]}")
        tee = json.loads(tee_json.read_text())
        self.data["9 tee.py"] = {"load_average_before": load, "result": tee}
        sc, ratios, aims = tee["scenarios"], tee["ratios"], tee["aims"]
        b_a, c_d, stall = ratios["b/a (time)"], ratios["c/d (throughput)"], tee["worst_stall_ms"]
        self.rows += [
            Row(
                "9",
                f"tee.py, {sz.tee_mib} MiB layer: cold read through the cache / plain "
                "verified read (time)",
                secs(sc["b"]["median_s"]),
                f"plain {secs(sc['a']['median_s'])}",
                f"{b_a:.2f}",
                f"<= {aims['b/a']}",
                b_a <= aims["b/a"],
            ),
            Row(
                "9",
                "tee.py: warm read through the cache / hashlib loop (throughput)",
                secs(sc["c"]["median_s"]),
                f"hashlib {secs(sc['d']['median_s'])}",
                f"{c_d:.2f}",
                f">= {aims['c/d']}",
                c_d >= aims["c/d"],
            ),
            Row(
                "9",
                "tee.py: worst event-loop stall",
                f"{stall:.1f} ms",
                "-",
                f"{stall:.1f}",
                f"< {aims['stall_ms']:.0f} ms",
                stall < aims["stall_ms"],
            ),
        ]
        console = str(Path(self.python).parent / "aiolayercache")
        cmds = {
            "aiolayercache --help": [console, "--help"],
            "python -m aiolayercache --help": [self.python, "-m", "aiolayercache", "--help"],
            "python -c pass": [self.python, "-c", "pass"],
            "skopeo --help": ["skopeo", "--help"],
        }
        for c in cmds.values():  # untimed: byte code and binaries into the page cache
            self.process(c, 0)
        saved, self.runs = self.runs, sz.startup_runs
        try:
            s = self.alternate(
                "9 start-up", {k: (lambda c=c: self.process(c, 0)) for k, c in cmds.items()}
            )
        finally:
            self.runs = saved
        a, ref = med(s["aiolayercache --help"]), med(s["python -c pass"])
        self.rows.append(
            Row(
                "9",
                "CLI start-up: `aiolayercache --help`, whole process",
                secs(a),
                f"python -c pass {secs(ref)}",
                f"{a:.3f}",
                "<= 0.35 s",
                a <= 0.35,
            )
        )

    # --- all -------------------------------------------------------------------------------

    def run(self, only: set[str]) -> None:
        if only & {"1", "2", "3"}:
            self.scenarios_1_3(only & {"1", "2", "3"})
        if "4" in only:
            self.scenario_4()
        if "5" in only:
            self.scenario_5()
        if only & {"6", "8"}:
            self.scenario_6("6" in only, "8" in only)
        if "7" in only:
            self.scenario_7()
        if "8" in only:
            self.scenario_8()
        if "9" in only:
            self.scenario_9()
        if "10" in only:
            self.scenario_10()
        if "11" in only:
            from benchmarks.many import scenario_11

            scenario_11(self)


def table(rows: list[Row]) -> str:
    head = ["#", "scenario", "ours", "peer / reference", "value", "target", "met"]
    rows = sorted(rows, key=lambda r: int(r.scenario))
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def contenders_table(contenders: list[dict[str, Any]]) -> str:
    lines = [
        "| group | contender | median s | median CPU s | peak RSS MiB | runs (s) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for c in contenders:
        cpu = "-" if c["median_cpu_s"] is None else f"{c['median_cpu_s']:.2f}"
        rss = "-" if c["peak_rss_mib"] is None else f"{c['peak_rss_mib']:.0f}"
        runs = ", ".join(f"{x:.3f}" for x in c["seconds"])
        lines.append(
            f"| {c['group']} | {c['contender']} | {c['median_s']:.3f} | {cpu} | {rss} | {runs} |"
        )
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    rows = [Row(**r) for r in result["rows"]]
    met = [r for r in rows if r.met is not None]
    missed = [r for r in met if not r.met]
    lines = [
        f"## aiolayercache benchmark suite, {result['date']}",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM, {m['kernel']}, "
        f"Python {m['python']}, {m['skopeo']}, {m['registry']}; files on "
        f"{result['filesystem']}; load average {result['load_before']} before, "
        f"{result['load_after']} after.",
        "",
        f"Commit {result['revision']}. Command: `{result['command']}` ({result['runs']} run"
        + ("s" if result["runs"] != 1 else "")
        + (", --quick sizes" if result["quick"] else "")
        + "). Times are medians; ratios are ours / peer (below 1: we are faster). "
        "In-process: the pull alone in a fresh interpreter after import; CLI and skopeo: "
        "the whole process. Peak RSS: the worst run.",
        "",
        table(rows),
        "",
        f"Targets met: {len(met) - len(missed)} of {len(met)}"
        + (f" (missed: {', '.join(sorted({r.scenario for r in missed}))})." if missed else "."),
        "",
        "Every contender (CPU: the timed part of an in-process run, the whole process "
        "otherwise; peak RSS: VmHWM in-process, GNU time's for processes, where measured):",
        "",
        contenders_table(result["contenders"]),
    ]
    loads = [
        f"{group} {v['load_average_before'].split()[0]}"
        for group, v in result["scenarios"].items()
        if isinstance(v, dict) and "load_average_before" in v
    ]
    if loads:
        lines += ["", "1-minute load average as each group started: " + ", ".join(loads) + "."]
    if result["noisy"]:
        lines += ["", f"Noisy samples (spread over {NOISY:.0%} of the median and 10 ms):"]
        lines += [f"- {n}" for n in result["noisy"]]
    return "\n".join(lines)


def write_docs(path: Path, text: str) -> None:
    block = f"{BEGIN}\n{text}\n{END}"
    if path.exists():
        old = path.read_text()
        if BEGIN in old and END in old:
            head, _, rest = old.partition(BEGIN)
            _, _, tail = rest.partition(END)
            path.write_text(head + block + tail)
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Benchmarks\n\n"
        "Written by `python -m benchmarks` (`make bench`); see `benchmarks/suite.py` for "
        "what each scenario does. The table between the markers is replaced on each full "
        "run; the text outside them is kept.\n\n" + block + "\n"
    )


def parse_only(text: str) -> set[str]:
    out: set[str] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(str(i) for i in range(int(a), int(b) + 1))
        elif part:
            out.add(part)
    bad = out - set(SCENARIOS)
    if bad:
        raise argparse.ArgumentTypeError(
            f"no scenario {', '.join(sorted(bad))} (1-{len(SCENARIOS)})"
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="aiolayercache beside skopeo against a loopback registry (see "
        "benchmarks/suite.py).",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 1 run: for development")
    p.add_argument("--runs", type=int, default=None, help="runs per scenario (3; --quick: 1)")
    p.add_argument(
        "--only", type=parse_only, default=set(SCENARIOS), help="scenarios, e.g. 1,5-7 (all)"
    )
    p.add_argument("--dir", default=None, help="where the temp files go (the system temp dir)")
    p.add_argument("--json", type=Path, default=RESULTS, help=f"results file ({RESULTS})")
    p.add_argument(
        "--docs",
        type=Path,
        default=None,
        help=f"write the table into this file (default: {DOCS} on a full run, else none)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: print the report of a results file (and write --docs)",
    )
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    args.sizes = QUICK if args.quick else Sizes()
    full = not args.quick and args.only == set(SCENARIOS)
    if args.docs is None and full:
        args.docs = DOCS
    return args


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render is not None:
        text = report(json.loads(args.render.read_text()))
        print(text)
        if args.docs is not None:
            write_docs(args.docs, text)
            print(f"wrote {args.docs}")
        return
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    rss = sorted(args.only & {"1", "8", "11"}, key=int)
    if rss and not os.path.exists(GNU_TIME):
        raise SystemExit(f"scenarios {', '.join(rss)} need GNU time at {GNU_TIME}")
    # Our modules as an installed wheel has them: byte-compiled. (Where
    # PYTHONDONTWRITEBYTECODE is set, as here, an editable install never writes
    # .pyc files, and every process would compile our source again: 30-60 ms.)
    import aiolayercache

    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", os.path.dirname(aiolayercache.__file__)],
        check=False,
        stdout=subprocess.DEVNULL,
    )
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = loadavg()
    rev = revision()  # at the start: others may change the tree while this runs
    suite = Suite(args)
    try:
        suite.run(args.only)
    finally:
        suite.close()
    command = "python -m benchmarks" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    result = {
        "date": started,
        "revision": rev,
        "machine": machine(),
        "filesystem": filesystem_of(str(suite.base.parent)),
        "load_before": load_before,
        "load_after": loadavg(),
        "command": command,
        "runs": args.runs,
        "quick": args.quick,
        "sizes": asdict(args.sizes),
        "rows": [asdict(r) for r in suite.rows],
        "contenders": suite.contenders,
        "noisy": suite.noisy,
        "scenarios": suite.data,
    }
    text = report(result)
    print()
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    if args.docs is not None:
        write_docs(args.docs, text)
        print(f"wrote {args.docs}")
