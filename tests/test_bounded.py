"""A bounded FilesystemCache: LRU eviction while processes run, and stats()."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from aiolayercache import cache, layout, random, validate
from aiolayercache.cache import CacheStats, FilesystemCache, MemoryCache, tiered
from aiolayercache.streams import read_all

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def entry_sizes(d: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    if not d.exists():
        return out
    for p in d.iterdir():
        if p.name.startswith("sha256:") and p.is_file():
            try:
                out[p.name] = p.stat().st_size
            except FileNotFoundError:
                pass
    return out


async def test_a_bounded_cache_stays_within_its_bound_during_a_pull(tmp_path: Path) -> None:
    bound = 3 * MiB
    images = [random.image(512 * 1024, 3, seed=100 + i) for i in range(4)]  # ~6 MiB unique
    fs = FilesystemCache(tmp_path / "c", max_bytes=bound)
    biggest = 0
    worst = 0
    done = anyio.Event()

    async def sample() -> None:
        nonlocal worst
        while not done.is_set():
            worst = max(worst, sum(entry_sizes(tmp_path / "c").values()))
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        for i, img in enumerate(images):
            await layout.write(tmp_path / f"out{i}", cache.image(img, fs))
            m = await img.manifest()
            # What one image's pull fills at once (its layers and config, in parallel).
            biggest = max(biggest, sum(d.size for d in [*m.layers, m.config]))
        done.set()
    for i in range(4):
        await validate.image(await layout.image(tmp_path / f"out{i}"))
    total = sum(entry_sizes(tmp_path / "c").values())
    assert total <= bound
    # + the entries being filled (committed, not yet counted in) at that moment
    assert worst <= bound + biggest, (worst, bound, biggest)
    s = fs.stats()
    assert s.evictions > 0 and s.write_errors == 0
    # The least recently used went: what is left is the last image's layers and config.
    last = await images[-1].manifest()
    kept = set(entry_sizes(tmp_path / "c"))
    assert {f"{d.digest}" for d in last.layers} <= kept, kept
    first = await images[0].manifest()
    assert not {f"{d.digest}" for d in first.layers} & kept


async def test_stats_count_what_the_cache_did(tmp_path: Path) -> None:
    img = random.image(300 * 1024, 2, seed=110)
    fs = FilesystemCache(tmp_path / "c")
    assert fs.stats() == CacheStats()
    await layout.write(tmp_path / "a", cache.image(img, fs))  # cold: misses, writes
    s = fs.stats()
    committed = sum(entry_sizes(tmp_path / "c").values())
    assert s.bytes_written == committed and s.hits == 0 and s.misses >= 3
    lookups = s.hits + s.misses
    await layout.write(tmp_path / "b", cache.image(img, fs))  # warm: hits, serves
    s2 = fs.stats()
    assert s2.bytes_written == committed  # nothing new
    assert s2.hits >= 3 and s2.hits + s2.misses > lookups
    assert s2.bytes_served >= committed
    m = MemoryCache()
    await layout.write(tmp_path / "m", cache.image(img, m))
    assert m.stats().bytes_written == m.total_bytes and m.stats().hits == 0
    t = tiered(m, fs)
    await layout.write(tmp_path / "t", cache.image(img, t))
    ts = t.stats()
    assert ts.hits >= 3 and ts.misses == 0


async def test_an_entry_bigger_than_the_bound_stays_only_until_the_next_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    img = random.image(2 * MiB, 2, seed=111)
    fs = FilesystemCache(tmp_path / "c", max_bytes=MiB)
    with caplog.at_level(logging.WARNING, logger="aiolayercache.cache"):
        # Eight pulls at once of one image: each big layer is fetched once and shared.
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(layout.write, tmp_path / f"out{i}", cache.image(img, fs))
    for i in range(8):
        await validate.image(await layout.image(tmp_path / f"out{i}"))
    assert (
        fs.stats().bytes_written
        <= sum(d.size for d in [*(await img.manifest()).layers, (await img.manifest()).config]) * 2
    )  # not once per pull (8x): the waiters read the filler's entry
    left = entry_sizes(tmp_path / "c")
    assert len([n for n, size in left.items() if size > MiB]) <= 1, left
    big = [r for r in caplog.records if "bigger than the cache's bound" in r.getMessage()]
    assert len(big) == 1


async def test_a_reader_of_an_entry_another_process_evicts_gets_the_right_bytes(
    tmp_path: Path,
) -> None:
    layer = random.layer(3 * MiB, seed=112)
    want = await read_all(await layer.compressed())
    fs = FilesystemCache(tmp_path / "c")
    await read_all(await (await fs.put(layer)).compressed())
    stream = await (await fs.get(await layer.digest())).compressed()
    got = [await stream.receive()]
    # Another process, bounded at 1 MiB, commits an entry: ours is least recently used.
    script = textwrap.dedent(
        """
        import sys, anyio
        from aiolayercache import random
        from aiolayercache.cache import FilesystemCache
        from aiolayercache.streams import read_all

        async def main(d):
            fs = FilesystemCache(d, max_bytes=1024 * 1024)
            x = random.layer(200 * 1024, seed=113)
            await read_all(await (await fs.put(x)).compressed())
            print(fs.stats().evictions)

        anyio.run(main, sys.argv[1])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "c")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert int(out.stdout.strip()) >= 1
    assert f"{await layer.digest()}" not in entry_sizes(tmp_path / "c")  # evicted
    async with stream:
        async for chunk in stream:
            got.append(chunk)
    assert b"".join(got) == want


def test_four_processes_with_different_bounds_share_one_directory(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, anyio
        from aiolayercache import cache, layout, random, validate
        from aiolayercache.cache import FilesystemCache

        async def main(d, bound, out, first):
            fs = FilesystemCache(d, max_bytes=int(bound))
            for i in range(int(first), int(first) + 4):  # overlapping with the neighbours
                img = random.image(400 * 1024, 2, seed=200 + i)
                await layout.write(f"{out}/{i}", cache.image(img, fs))
                await validate.image(await layout.image(f"{out}/{i}"))
            print(fs.stats().evictions)

        anyio.run(main, *sys.argv[1:])
        """
    )
    bounds = [1 * MiB, 2 * MiB, 3 * MiB, 2 * MiB]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                script,
                str(tmp_path / "c"),
                str(b),
                str(tmp_path / f"p{k}"),
                str(k * 2),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k, b in enumerate(bounds)
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    total = sum(entry_sizes(tmp_path / "c").values())
    assert total <= max(bounds), total
    usage = (tmp_path / "c" / ".aiolayercache" / "usage").read_text().strip()
    assert abs(int(usage) - total) <= max(bounds)  # the shared total tracks the directory
    assert not os.listdir(tmp_path / "c" / ".aiolayercache" / "tmp")


@pytest.mark.parametrize("trap", ["symlink", "directory", "fifo"])
async def test_a_booby_trapped_usage_file_never_fails_a_pull_nor_the_bound(
    trap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "c" / ".aiolayercache"
    state.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("42\n")
    usage = state / "usage"
    if trap == "symlink":
        usage.symlink_to(outside)
    elif trap == "directory":
        usage.mkdir()
    else:
        os.mkfifo(usage)
    fs = FilesystemCache(tmp_path / "c", max_bytes=MiB)
    with anyio.fail_after(60):
        for i in range(3):
            img = random.image(300 * 1024, 2, seed=120 + i)
            await layout.write(tmp_path / f"out{i}", cache.image(img, fs))
            await validate.image(await layout.image(tmp_path / f"out{i}"))
    assert sum(entry_sizes(tmp_path / "c").values()) <= MiB
    assert outside.read_text() == "42\n"  # nothing written through the link
    assert fs.stats().evictions > 0
    assert [r for r in caplog.records if "counts on its own" in r.getMessage()]
