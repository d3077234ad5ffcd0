"""The command line, run as a user runs it: a subprocess against the real loopback registry."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aiolayercache import Hash, Manifest

from .conftest import Published, entries, temps
from .registry import FaultProxy, Registry

CLI = [sys.executable, "-m", "aiolayercache"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e.pop("AIOLAYERCACHE_CACHE_DIR", None)
    e.pop("AIOLAYERCACHE_FLEET", None)
    e.update(env or {})
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=e, check=False
    )


def summary(out: str) -> dict[str, float]:
    m = re.search(
        r"(\d+) images?, (\d+) layers \((\d+) cache hits\), ([\d.]+) (\w+) fetched, "
        r"([\d.]+) (\w+) from cache",
        out,
    )
    assert m, out
    unit = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
    return {
        "images": int(m.group(1)),
        "layers": int(m.group(2)),
        "hits": int(m.group(3)),
        "fetched": float(m.group(4)) * unit[m.group(5)],
        "cached": float(m.group(6)) * unit[m.group(7)],
    }


def layer_bytes(img: object) -> int:
    blobs = img._blobs.blobs  # type: ignore[attr-defined]
    return sum(len(v) for v in blobs.values() if not v.startswith(b"{"))


def test_help_reads_well() -> None:
    out = run("--help")
    assert out.returncode == 0
    assert "pull" in out.stdout and "cache" in out.stdout
    pull = run("pull", "--help")
    assert pull.returncode == 0
    for flag in ["--format", "--cache-dir", "--no-cache", "--platform", "--all-platforms", "-j"]:
        assert flag in pull.stdout
    assert "docker-archive:FILE" in pull.stdout
    cache = run("cache", "--help")
    for action in ["ls", "du", "verify", "prune", "rm"]:
        assert action in cache.stdout


def test_usage_errors_exit_2() -> None:
    assert run().returncode == 2
    assert run("pull").returncode == 2
    bad = run("pull", "UPPER/Case:x", "/tmp/nowhere-aiolayercache")
    assert bad.returncode == 2
    assert "invalid reference" in bad.stderr and "Traceback" not in bad.stderr
    assert run("cache", "prune").returncode == 2
    assert run("cache", "rm", "sha256:nothex").returncode == 2


def test_pull_cold_then_warm_into_layouts(
    registry: Registry, published: Published, tmp_path: Path
) -> None:
    ref = f"{registry.host}/test/small:v1"
    cache_dir = tmp_path / "cache"
    cold = run("pull", ref, str(tmp_path / "out1"), "--cache-dir", str(cache_dir))
    assert cold.returncode == 0, cold.stderr
    s = summary(cold.stdout)
    want = layer_bytes(published.small)
    assert s == {
        "images": 1,
        "layers": 3,
        "hits": 0,
        "fetched": pytest.approx(want, rel=0.01),
        "cached": 0,
    }
    assert "Traceback" not in cold.stderr
    assert len(entries(cache_dir)) == 3
    name = f"{registry.host}/test/small:v1"
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci:{tmp_path / 'out1'}:{name}"],
        capture_output=True,
        text=True,
        check=True,
    )
    # Written with OCI media types (as skopeo does): same layers, a new manifest digest.
    layers = [str(d.digest) for d in (Manifest.parse(published.small._raw)).layers]  # type: ignore[attr-defined]
    assert json.loads(inspect.stdout)["Layers"] == layers
    # Warm: a new destination, every layer from the cache.
    warm = run("pull", ref, str(tmp_path / "out2"), "--cache-dir", str(cache_dir), "--quiet")
    assert warm.returncode == 0, warm.stderr
    w = summary(warm.stdout)
    assert w["hits"] == 3 and w["fetched"] == 0
    assert w["cached"] == pytest.approx(want, rel=0.01)
    assert warm.stderr == ""  # --quiet: nothing but the summary
    assert temps(cache_dir) == []


def test_pull_many_sources_into_a_tarball_read_by_skopeo(
    registry: Registry, published: Published, tmp_path: Path
) -> None:
    out = tmp_path / "images.tar"
    env = {"AIOLAYERCACHE_CACHE_DIR": str(tmp_path / "c")}
    r = run(
        "pull",
        f"{registry.host}/test/small:v1",
        f"{registry.host}/test/oci:v1",
        str(out),
        "--format",
        "tarball",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert summary(r.stdout)["images"] == 2
    assert entries(tmp_path / "c")  # the env var chose the cache dir
    copy = subprocess.run(
        [
            "skopeo",
            "copy",
            f"docker-archive:{out}:{registry.host}/test/oci:v1",
            f"oci:{tmp_path / 'back'}:x",
        ],
        capture_output=True,
        text=True,
    )
    assert copy.returncode == 0, copy.stderr
    assert "fetched" in r.stderr  # not a terminal: plain log lines


def test_pull_platform_and_sources_from_disk(
    registry: Registry, published: Published, tmp_path: Path
) -> None:
    ref = f"{registry.host}/test/multi:v1"
    r = run("pull", ref, str(tmp_path / "arm"), "--platform", "linux/arm64", "--no-cache")
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "arm" / "index.json").read_text())
    (desc,) = index["manifests"]
    arm = published.multi._blobs.manifests  # type: ignore[attr-defined]
    assert Hash.parse(desc["digest"]) in arm
    # The layout we wrote is a source too, and so is a tarball.
    again = run("pull", f"oci:{tmp_path / 'arm'}", str(tmp_path / "copy.tar"), "--no-cache")
    assert again.returncode == 0, again.stderr
    back = run(
        "pull", f"docker-archive:{tmp_path / 'copy.tar'}", str(tmp_path / "back"), "--no-cache"
    )
    assert back.returncode == 0, back.stderr
    allp = run("pull", ref, str(tmp_path / "all"), "--all-platforms", "--no-cache")
    assert allp.returncode == 0, allp.stderr
    assert summary(allp.stdout)["layers"] == 8


def test_failed_pull_exits_1_naming_the_source(registry: Registry, tmp_path: Path) -> None:
    src = f"{registry.host}/test/small:nope"
    r = run("pull", src, str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 1
    assert src in r.stderr and "404" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "index.json").exists()


def test_sigint_mid_pull_leaves_no_temp_file_and_no_broken_destination(
    proxy: FaultProxy, published: Published, tmp_path: Path
) -> None:
    proxy.add("/blobs/sha256:", "throttle", 0.05, times=100)
    cache_dir, dest = tmp_path / "cache", tmp_path / "dest"
    env = dict(os.environ)
    env.pop("AIOLAYERCACHE_CACHE_DIR", None)
    p = subprocess.Popen(
        [*CLI, "pull", f"{proxy.address}/test/big:v1", str(dest), "--cache-dir", str(cache_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not temps(cache_dir):
            time.sleep(0.02)
        assert temps(cache_dir), "the pull never started filling the cache"
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert temps(cache_dir) == []
    assert entries(cache_dir) == []  # the big layers were not finished
    leftovers = [str(x) for x in dest.rglob("*.tmp")] if dest.exists() else []
    assert leftovers == []
    assert not (dest / "index.json").exists()  # index.json comes last, so none yet
    # And the message says exactly that (it used to say nothing was left behind).
    assert "no index.json yet" in err and "nothing half-written" not in err, err


def test_cache_ls_du_verify_rm(registry: Registry, published: Published, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    r = run(
        "pull", f"{registry.host}/test/small:v1", str(tmp_path / "o"), "--cache-dir", str(cache_dir)
    )
    assert r.returncode == 0, r.stderr
    ls = run("cache", "--cache-dir", str(cache_dir), "ls")
    lines = ls.stdout.strip().splitlines()
    assert len(lines) == len(entries(cache_dir, configs=True)) == 4
    du = run("cache", "--cache-dir", str(cache_dir), "du")
    total = sum((cache_dir / n).stat().st_size for n in entries(cache_dir, configs=True))
    assert du.stdout.split()[0] == str(total)
    # Corrupt one entry by hand: verify finds it and removes it.
    victim = cache_dir / entries(cache_dir)[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    v = run("cache", "--cache-dir", str(cache_dir), "verify")
    assert v.returncode == 0
    assert f"removed {victim.name}" in v.stdout
    assert "3 entries verified, 1 removed" in v.stdout
    assert not victim.exists()
    gone = entries(cache_dir)[0]
    rm = run("cache", "--cache-dir", str(cache_dir), "rm", gone)
    assert rm.returncode == 0 and not (cache_dir / gone).exists()
    assert run("cache", "--cache-dir", str(cache_dir), "rm", gone).returncode == 1
    prune = run("cache", "--cache-dir", str(cache_dir), "prune", "--max-size", "0")
    assert prune.returncode == 0
    assert entries(cache_dir, configs=True) == []


def test_source_syntax_is_skopeos() -> None:
    from aiolayercache.cli import UsageError
    from aiolayercache.cli._sources import parse_source

    src = parse_source("oci:./images:docker.io/library/alpine:3.20")
    assert (src.kind, src.path, src.ref) == ("oci", "./images", "docker.io/library/alpine:3.20")
    assert parse_source("oci:/x").ref is None
    assert parse_source("docker-archive:/a/b.tar").path == "/a/b.tar"
    assert parse_source("docker://alpine:3.20").ref == "alpine:3.20"
    with pytest.raises(UsageError):
        parse_source("oci:")
