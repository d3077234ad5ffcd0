"""Scenario 11 of the suite: many different images at once (issue 16).

32 distinct images, each one shared base layer (16 MiB) and 3 layers of its own
(2 MiB each), random and gzip'd (``images.py``), each in its own repository
(``bench/many-00`` ...; the base is mounted across them) of a ``docker-registry``
of the scenario's own, started with its access log on, so the blob bytes each
contender fetched are counted by the registry itself (GET ``.../blobs/...``
response sizes; manifests apart). A proxy in the suite's process would relay
0.2-0.7 GiB per run in Python on the same CPUs, and tax skopeo, which fetches
the base 32 times, three times as much as us.

Contenders, alternated per run, each with a new DEST (and, for ours, an empty
cache) every run:

ours            a fresh interpreter (``worker.py``, job ``many``) that, after
                import, times ``asyncio.gather`` over the 32 pulls with one
                ``remote.Client`` and one ``FilesystemCache``, each pull a
                ``layout.write_all`` of its image into the same layout;
ours CLI        one process: ``aiolayercache pull IMG1 ... IMG32 DEST -j 8
                --cache-dir CACHE``;
skopeo -P 8     ``xargs -P 8 -L 1 skopeo copy``: 8 processes at a time over the
                same 32 images, its best case. Each image gets its own layout
                (``DEST/many-00`` ...): skopeo reads ``index.json`` when it
                starts and writes it back when it ends, with no lock, so
                processes writing one layout at once fail to read it
                (``EOF``) or drop one another's images
                (``skopeo_shares_a_layout`` shows it, untimed). skopeo has no
                cache: each process fetches and writes the base again.

Each reports wall time, CPU seconds (ours: the timed part, all threads; the
others: the whole process tree, from the suite's ``RUSAGE_CHILDREN``), peak RSS
(ours: ``VmHWM``; the others: GNU time's, which for ``xargs`` is the largest
single skopeo of the 8 running at once), blob bytes fetched / unique blob
bytes of the 32 images, and bytes written to storage / unique blob bytes
(ours: ``write_bytes`` of /proc/self/io in the timed part; the others: GNU
time's ``%O``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from benchmarks import images
from tests.registry import start_registry

if TYPE_CHECKING:
    from benchmarks.suite import Contender, Sample, Suite

KIB, MIB = 1 << 10, 1 << 20
REPO = "bench/many"
GET_BLOB = re.compile(r'"GET (/v2/\S+/blobs/sha256:[0-9a-f]{64})\S* HTTP/[\d.]+" (\d{3}) (\d+)')


class AccessLog:
    """Blob bytes a registry sent, read from its access log (Apache combined format)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def settle(self) -> int:
        """The log's size once it stops growing (a line is written after its response)."""
        size, still = -1, 0
        for _ in range(60):
            now = self.path.stat().st_size
            still = still + 1 if now == size else 0
            if still >= 2:
                break
            size = now
            time.sleep(0.05)
        return size

    def mark(self) -> None:
        self.offset = self.settle()

    def blob_gets(self) -> tuple[int, int]:
        """(bytes, requests) of blob GETs answered 200 or 206 since ``mark``."""
        end = self.settle()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read(end - self.offset).decode(errors="replace")
        total = n = 0
        for m in GET_BLOB.finditer(text):
            if m.group(2) in ("200", "206"):
                total += int(m.group(3))
                n += 1
        return total, n


def build(suite: Suite, host: str) -> list[images.BuiltImage]:
    """Make the images and push them to ``host``: one repository each, the base mounted."""
    sz = suite.sizes
    base = images.make_layer(suite.blobdir, sz.many_base_mib * MIB)
    imgs = [
        images.make_image(
            [base]
            + [
                images.make_layer(suite.blobdir, sz.many_own_kib * KIB)
                for _ in range(sz.many_own_layers)
            ]
        )
        for _ in range(sz.many_images)
    ]

    async def push() -> None:
        async with images.Pusher(host) as p:
            for i, img in enumerate(imgs):
                if i:  # the base is in the first repository: mount it, as a registry allows
                    url = f"{p.base}/v2/{REPO}-{i:02d}/blobs/uploads/"
                    params = {"mount": base.digest, "from": f"{REPO}-00"}
                    async with p.session.post(url, params=params) as r:
                        if r.status != 201:
                            raise RuntimeError(f"mount of the base refused: {r.status}")
                await p.image(f"{REPO}-{i:02d}", "v1", img)

    anyio.run(push, backend="asyncio")
    shutil.rmtree(suite.blobdir, ignore_errors=True)
    return imgs


def check_images(dest: Path, count: int, layers: dict[str, int]) -> None:
    """``dest`` is a layout with every blob of ``layers`` and ``count`` images in its index."""
    from benchmarks.suite import check_layout

    check_layout(dest, layers)
    listed = len(json.loads((dest / "index.json").read_text()).get("manifests", []))
    if listed != count:
        raise RuntimeError(f"{dest}: index.json lists {listed} images, not {count}")


def skopeo_cmd(args: Path, jobs: int) -> list[str]:
    """``xargs`` running ``skopeo copy`` on each line of ``args`` (a pair), ``jobs`` at once."""
    xargs = ["xargs", "-a", str(args), "-P", str(jobs), "-L", "1"]
    return [*xargs, "skopeo", "copy", "--quiet", "--src-tls-verify=false"]


def skopeo_shares_a_layout(suite: Suite, refs: list[str], jobs: int) -> str:
    """What happens when skopeo copies ``refs`` into ONE layout, ``jobs`` processes at a
    time (once, untimed; the scenario prints it and keeps it in the results)."""
    work = suite.tmp("many-skopeo-shared-")
    try:
        args = work / "args"
        args.write_text("".join(f"docker://{r} oci:{work / 'oci'}:{tag(r)}\n" for r in refs))
        proc = subprocess.run(skopeo_cmd(args, jobs), capture_output=True, text=True)
        failed = proc.stderr.count("level=fatal")
        try:
            index = json.loads((work / "oci" / "index.json").read_text())
            listed = f"{len(index.get('manifests', []))} of {len(refs)} images listed"
        except (OSError, ValueError) as exc:
            listed = f"index.json unreadable ({exc})"
        why = proc.stderr.strip().splitlines()[-1][-160:] if failed else ""
        return f"{failed} of {len(refs)} copies failed, {listed}" + (f"; {why}" if why else "")
    finally:
        shutil.rmtree(work)


def tag(ref: str) -> str:
    """A ref name for ``ref`` in a layout: its repository's last part (many-00 ...)."""
    return ref.rsplit("/", 1)[1].split(":", 1)[0]


def scenario_11(suite: Suite) -> None:
    sz = suite.sizes
    n, jobs = sz.many_images, sz.many_jobs
    own = f"{sz.many_own_kib / 1024:g} MiB"
    what = f"{n} images ({sz.many_base_mib} MiB base + {sz.many_own_layers} x {own} each)"
    print(f"scenario 11: many images at once, {what}", flush=True)
    work = suite.tmp("many-registry-")
    accesslog = {"log": {"level": "error", "accesslog": {"disabled": False}}}
    registry = start_registry(work, work / "data", extra=accesslog)
    try:
        imgs = build(suite, registry.host)
        refs = [f"{registry.host}/{REPO}-{i:02d}:v1" for i in range(n)]
        layers: dict[str, int] = {}
        unique: dict[str, int] = {}
        for img in imgs:
            layers.update(img.layer_sizes())
            unique.update(img.blob_sizes())
        prime = min(2 * sum(unique.values()), 1 << 30)
        log = AccessLog(work / "registry.log")
        shared = skopeo_shares_a_layout(suite, refs, jobs)
        print(f"  skopeo -P {jobs} into one layout (untimed): {shared}", flush=True)

        def measured(run: Any) -> Contender:
            def go() -> Sample:
                out = suite.tmp("many-")
                try:
                    log.mark()
                    sample: Sample = run(out)
                    sample["blob_bytes"], sample["blob_gets"] = log.blob_gets()
                    sample["unique_blob_bytes"] = sum(unique.values())
                finally:
                    shutil.rmtree(out)
                return sample

            return go

        def ours(out: Path) -> Sample:
            pulls = [(r, tag(r)) for r in refs]
            job = {"kind": "many", "pulls": pulls, "dest": str(out / "oci")}
            sample = suite.worker({**job, "cache": str(out / "cache")}, prime)
            check_images(out / "oci", n, layers)
            return sample

        def cli(out: Path) -> Sample:
            cmd = [suite.python, "-m", "aiolayercache", "pull", *refs, str(out / "oci")]
            cmd += ["--cache-dir", str(out / "cache"), "-j", str(jobs)]
            sample = suite.process(cmd, prime, rss=True)
            check_images(out / "oci", n, layers)
            return sample

        def skopeo(out: Path) -> Sample:
            (out / "oci").mkdir()  # skopeo makes the layout, not its parent
            dests = [out / "oci" / tag(r) for r in refs]
            args = out / "args"
            args.write_text(
                "".join(f"docker://{r} oci:{d}:v1\n" for r, d in zip(refs, dests, strict=True))
            )
            sample = suite.process(skopeo_cmd(args, jobs), prime, rss=True)
            for img, d in zip(imgs, dests, strict=True):
                check_images(d, 1, img.layer_sizes())
            return sample

        peer = f"skopeo -P {jobs}"
        c = {"ours": measured(ours), "ours CLI": measured(cli), peer: measured(skopeo)}
        s = suite.alternate("11 many images", c)
    finally:
        registry.stop()
    suite.data["11 many images"]["skopeo_into_one_layout"] = shared
    rows(suite, s, what, peer)


def rows(suite: Suite, s: dict[str, list[Sample]], what: str, peer: str) -> None:
    from benchmarks.suite import Row, med, mib

    sz = suite.sizes
    label = f"many images at once, {what}"
    suite.ratio_row("11", f"{label}: in-process", s["ours"], s[peer], 0.4, peer)
    suite.ratio_row(
        "11", f"{label}: CLI process, -j {sz.many_jobs}", s["ours CLI"], s[peer], 0.45, peer
    )
    peak = {k: max(x["peak_rss_mib"] for x in v) for k, v in s.items()}
    theirs = f"{peer}: {mib(peak[peer])} each, {sz.many_jobs} at once"
    for key, who, limit in (("ours", "in-process", 64), ("ours CLI", "CLI process", 72)):
        suite.rows.append(
            Row("11", f"peak RSS, {sz.many_images} images at once: {who}", mib(peak[key]),
                theirs, f"{peak[key]:.0f}", f"<= {limit} MiB", peak[key] <= limit)
        )  # fmt: skip
    cpu = {k: med(v, "cpu_s") for k, v in s.items()}
    suite.rows.append(
        Row("11", f"CPU seconds (user + sys), {sz.many_images} images: in-process (the pull, "
            "after import) / CLI (whole process)", f"{cpu['ours']:.2f} / {cpu['ours CLI']:.2f} s",
            f"{peer} {cpu[peer]:.2f} s (all processes)",
            f"{cpu['ours'] / cpu[peer]:.2f} / {cpu['ours CLI'] / cpu[peer]:.2f}", "report", None)
    )  # fmt: skip
    ratio = {k: max(x["blob_bytes"] / x["unique_blob_bytes"] for x in v) for k, v in s.items()}
    unique = s["ours"][0]["unique_blob_bytes"] / MIB
    suite.rows.append(
        Row("11", f"blob bytes the registry sent / unique blob bytes ({unique:.1f} MiB): "
            "in-process / CLI (worst run)", f"{ratio['ours']:.3f} / {ratio['ours CLI']:.3f}",
            f"{peer} {ratio[peer]:.2f}", f"{max(ratio['ours'], ratio['ours CLI']):.3f}",
            "report", None)
    )  # fmt: skip
    wrote = {k: med(v, "written_mib") / unique for k, v in s.items()}
    suite.rows.append(
        Row("11", "MiB written to storage / unique blob MiB: in-process / CLI (cache and layout: "
            "2.00 is each byte twice)", f"{wrote['ours']:.2f} / {wrote['ours CLI']:.2f}",
            f"{peer} {wrote[peer]:.2f}", f"{wrote['ours']:.2f} / {wrote['ours CLI']:.2f}",
            "report", None)
    )  # fmt: skip
