"""``pull --fleet`` and ``copy --fleet``: two machines (two cache dirs) sharing one fleet."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import Published
from .registry import FaultProxy, Registry
from .test_cli import run


def tiers(out: str) -> tuple[int, int, int, int]:
    m = re.search(
        r"(\d+) layers \((\d+) from the local cache, (\d+) from the fleet, (\d+) from the origin\)",
        out,
    )
    assert m, out
    return int(m[1]), int(m[2]), int(m[3]), int(m[4])


def origin_blobs(px: FaultProxy) -> int:
    return sum(n for k, n in px.stats.requests.items() if k.startswith("GET ") and "/blobs/" in k)


def test_pull_with_a_fleet_tells_local_fleet_and_origin_apart(
    fleet: Registry, origin: FaultProxy, tmp_path: Path
) -> None:
    ref = f"{origin.address}/test/big:v1"
    repo = f"{fleet.host}/layer-cache"
    first = run(
        "pull",
        "-q",
        "--fleet",
        repo,
        "--cache-dir",
        str(tmp_path / "c1"),
        ref,
        str(tmp_path / "o1"),
    )
    assert first.returncode == 0, first.stderr
    assert tiers(first.stdout + first.stderr) == (2, 0, 0, 2)
    served = origin_blobs(origin)
    assert served == 3  # two layers and the config, once

    # A second machine, named by the environment: everything from the fleet.
    origin.reset()
    second = run(
        "pull",
        "-q",
        "--cache-dir",
        str(tmp_path / "c2"),
        ref,
        str(tmp_path / "o2"),
        env={"AIOLAYERCACHE_FLEET": repo},
    )
    assert second.returncode == 0, second.stderr
    assert tiers(second.stdout + second.stderr) == (2, 0, 2, 0)
    assert origin_blobs(origin) == 0

    # The same machine again: its local cache, filled from the fleet, serves it.
    third = run(
        "pull",
        "-q",
        "--cache-dir",
        str(tmp_path / "c2"),
        "--fleet",
        repo,
        ref,
        str(tmp_path / "o3"),
    )
    assert third.returncode == 0, third.stderr
    assert tiers(third.stdout + third.stderr) == (2, 2, 0, 0)


def test_pull_with_a_fleet_that_is_down_succeeds_with_one_warning(
    origin: FaultProxy, tmp_path: Path
) -> None:
    from .registry import free_port

    ref = f"{origin.address}/test/small:v1"
    out = run(
        "pull",
        "-q",
        "--fleet",
        f"127.0.0.1:{free_port()}/layer-cache",
        "--cache-dir",
        str(tmp_path / "c"),
        ref,
        str(tmp_path / "o"),
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert tiers(out.stdout + out.stderr) == (3, 0, 0, 3)
    assert out.stderr.count("cannot be read") == 1, out.stderr


@pytest.mark.parametrize(
    "bad", ["127.0.0.1:5000/cache@sha256:" + "a" * 64, "127.0.0.1:5000/c:v1", "UPPER/x"]
)
def test_fleet_must_name_a_repository(bad: str, tmp_path: Path) -> None:
    out = run("pull", "--fleet", bad, "127.0.0.1:1/x:y", str(tmp_path / "o"))
    assert out.returncode == 2, out
    assert "--fleet" in out.stderr


def test_cache_ls_fleet_lists_the_fleet_entries(
    fleet: Registry, origin: FaultProxy, published: Published, tmp_path: Path
) -> None:
    import anyio

    repo = f"{fleet.host}/layer-cache"
    ref = f"{origin.address}/test/small:v1"
    assert (
        run(
            "pull",
            "-q",
            "--fleet",
            repo,
            "--cache-dir",
            str(tmp_path / "c"),
            ref,
            str(tmp_path / "o"),
        ).returncode
        == 0
    )
    out = run("cache", "ls", "--fleet", repo)
    assert out.returncode == 0, out.stderr
    m = anyio.run(published.small.manifest)
    want = {str(d.digest): d.size for d in [*m.layers, m.config]}
    got = {}
    for line in out.stdout.splitlines():
        digest, size, kind = line.split()
        got[digest] = int(size)
        assert kind == ("config" if digest == str(m.config.digest) else "compressed")
    assert got == want
