"""`pull --cache-max-size` (and its variable), and options after the `cache` actions."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from aiolayercache import layout, random, validate

from .test_bounded import entry_sizes
from .test_cli import run

MiB = 1024 * 1024


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """An OCI layout of three images, about 4.5 MiB of layers in all."""
    src = tmp_path / "src"

    async def make() -> None:
        for i in range(3):
            img = random.image(700 * 1024, 2, seed=300 + i)
            await layout.write(src, img, ref_name=f"img{i}", oci=True)

    anyio.run(make)
    return src


@pytest.mark.parametrize("how", ["option", "env"])
def test_pull_keeps_the_cache_within_its_bound(how: str, source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ["pull", "-q", "--cache-dir", str(cache)]
    env = {}
    if how == "option":
        args += ["--cache-max-size", "2M"]
    else:
        env["AIOLAYERCACHE_CACHE_MAX_SIZE"] = "2M"
    srcs = [f"oci:{source}:img{i}" for i in range(3)]
    out = run(*args, *srcs, str(tmp_path / "out"), env=env)
    assert out.returncode == 0, out.stderr
    assert "cache entries evicted" in out.stdout + out.stderr
    assert 0 < sum(entry_sizes(cache).values()) <= 2 * MiB

    async def check() -> None:
        for i in range(3):
            await validate.image(await layout.image(tmp_path / "out", f"img{i}"))

    anyio.run(check)


@pytest.mark.parametrize("bad", ["lots", "0"])
def test_a_bad_bound_is_a_usage_error(bad: str, tmp_path: Path) -> None:
    out = run("pull", "oci:/nonexistent", str(tmp_path / "o"),
              env={"AIOLAYERCACHE_CACHE_MAX_SIZE": bad})  # fmt: skip
    assert out.returncode == 2, out
    assert "AIOLAYERCACHE_CACHE_MAX_SIZE" in out.stderr


@pytest.mark.parametrize("action", [["ls"], ["du"], ["verify"], ["prune", "--max-size", "1G"]])
@pytest.mark.parametrize("where", ["before", "after"])
def test_every_cache_action_takes_cache_dir_before_or_after_it(
    action: list[str], where: str, source: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assert run("pull", "-q", "--cache-dir", str(cache), f"oci:{source}:img0",
               str(tmp_path / "o")).returncode == 0  # fmt: skip
    opts = ["--cache-dir", str(cache), "--debug"]
    argv = ["cache", *opts, *action] if where == "before" else ["cache", *action, *opts]
    out = run(*argv)
    assert out.returncode == 0, out.stderr
    if action == ["ls"]:
        assert len(out.stdout.splitlines()) == len(entry_sizes(cache)) > 0
    if action == ["du"]:
        assert str(cache) in out.stdout and " 0 entries" not in out.stdout


def test_cache_rm_takes_cache_dir_after_it(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert run("pull", "-q", "--cache-dir", str(cache), f"oci:{source}:img0",
               str(tmp_path / "o")).returncode == 0  # fmt: skip
    name = sorted(entry_sizes(cache))[0]
    out = run("cache", "rm", name, "--cache-dir", str(cache))
    assert out.returncode == 0, out.stderr
    assert name not in entry_sizes(cache)
