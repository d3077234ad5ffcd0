"""Issue 16's additions to scenarios 1 and 3: memory peaks, a Python peer, the start-up floor.

Scenario 1 (cold, 4 x 64 MiB, every layer in flight at once) also reports the
peak RSS of ours in-process (``VmHWM``) and of the CLI and skopeo processes
(GNU time), and times docker-registry-client-async as a peer: ``peer_drca.py``,
its ``get_blob_to_disk`` with 6 blobs at once, digest-checked, no cache, no
fsync, timed as a whole process. The peer runs on the interpreter of
``.venv/peers`` (``make bench`` installs the ``bench`` extra there), else on the
suite's own when the package imports there; otherwise, or when a first,
untimed pull against the loopback registry fails, it is left out and reported
"not installed" with the reason. The suite installs nothing itself.

Scenario 3 (the same image again into the same layout) also times
``python -c "import aiohttp"`` on the suite's interpreter: the part of the
CLI's whole-process time that is the dependency's, not ours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.suite import Contender, Sample, Suite

ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = ROOT / ".venv" / "peers"
SCRIPT = Path(__file__).with_name("peer_drca.py")
DRCA = "docker-registry-client-async (6 jobs)"
DRCA_JOBS = 6
FLOOR = "python -c 'import aiohttp'"


def drca_python(own: str) -> tuple[str | None, str]:
    """An interpreter that imports docker_registry_client_async, or None and why not."""
    for py in (str(PEERS_VENV / "bin" / "python"), own):
        if not os.path.exists(py):
            continue
        probe = [py, "-c", "import docker_registry_client_async"]
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return py, ""
    return None, "not importable from .venv/peers or the suite's venv; `make bench` installs it"


def drca(suite: Suite, ref: str, blobs: dict[str, int], prime: int) -> Contender | None:
    """The peer's pull of ``ref`` (checked: every blob of ``blobs`` with its size), or None."""
    py, why = drca_python(suite.python)

    def go() -> Sample:
        work = suite.tmp("drca-")
        try:
            assert py is not None
            cmd = [py, str(SCRIPT), ref, str(work / "out"), "--jobs", str(DRCA_JOBS)]
            sample = suite.process(cmd, prime, rss=True)
            for digest, size in blobs.items():
                path = work / "out" / "blobs" / "sha256" / digest.split(":", 1)[1]
                if not path.is_file() or path.stat().st_size != size:
                    raise RuntimeError(f"{DRCA}: blob {digest} missing or of the wrong size")
        finally:
            shutil.rmtree(work)
        return sample

    if py is not None:
        try:
            go()  # untimed: does it work against this registry?
        except RuntimeError as exc:
            last = [line for line in str(exc).splitlines() if line.strip()][-1]
            py, why = None, f"it failed against the loopback registry: {last[-300:]}"
    if py is None:
        print(f"  {DRCA}: not installed ({why})", flush=True)
        suite.data["1 peer"] = {"docker-registry-client-async": f"not installed: {why}"}
        return None
    return go


def rows_1(suite: Suite, s: dict[str, list[Sample]], what: str) -> None:
    """Scenario 1's peak RSS rows and the ratio to the Python peer (issue 16)."""
    from benchmarks.suite import Row, med, mib, secs

    peak = {k: max(x["peak_rss_mib"] for x in v) for k, v in s.items() if "peak_rss_mib" in v[0]}
    peers = f"skopeo {mib(peak['skopeo'])}"
    if DRCA in peak:
        peers += f", docker-registry-client-async {mib(peak[DRCA])}"
    for key, who, limit in (("ours", "in-process", 48), ("ours CLI", "CLI process", 56)):
        suite.rows.append(
            Row("1", f"peak RSS, cold {what} (all layers in flight): {who}", mib(peak[key]),
                peers, f"{peak[key]:.0f}", f"<= {limit} MiB", peak[key] <= limit)
        )  # fmt: skip
    label = f"cold {what}: CLI process / {DRCA}"
    if DRCA in s:
        suite.ratio_row("1", label, s["ours CLI"], s[DRCA], 1.0, DRCA)
    else:
        suite.rows.append(
            Row("1", label, secs(med(s["ours CLI"])), f"{DRCA}: not installed", "-",
                "<= 1.0", None)
        )  # fmt: skip


def floor(suite: Suite, prime: int) -> Contender:
    """``python -c "import aiohttp"``, timed as a whole process."""
    return lambda: suite.process([suite.python, "-c", "import aiohttp"], prime)
