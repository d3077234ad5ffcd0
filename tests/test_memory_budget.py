"""The loop's memory budget: accounting, back pressure, no deadlocks, and a real pull within it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from anyio import wait_all_tasks_blocked
from anyio.abc import ByteReceiveStream

from aiolayercache import Hash, cache, layout, random, validate
from aiolayercache._lane import Lane
from aiolayercache._memory_budget import MemoryBudget, memory_budget
from aiolayercache.cache import FilesystemCache
from aiolayercache.remote import Client, RetryPolicy
from aiolayercache.streams import CHUNK_SIZE, drain

from .conftest import entries
from .registry import Registry, push_image

pytestmark = pytest.mark.anyio

KIB = 1024


def chunk(n: int) -> bytes:
    return os.urandom(n)  # a distinct object each time


@pytest.fixture
async def budget() -> AsyncIterator[MemoryBudget]:
    """The loop's budget, its limit restored after the test."""
    b = memory_budget()
    limit = b.limit
    yield b
    b.limit = limit


class TestAccounting:
    async def test_a_chunk_is_charged_once_however_many_hold_it(self) -> None:
        b = MemoryBudget(100 * KIB)
        c = chunk(60 * KIB)
        for _ in range(3):  # a hash lane, a cache entry and a layout blob
            await b.acquire(c)
        assert b.charged == 60 * KIB
        b.release(c)
        b.release(c)
        assert b.charged == 60 * KIB
        b.release(c)
        assert (b.charged, b.high_water) == (0, 60 * KIB)

    async def test_a_holder_waits_while_over_the_limit_and_goes_on_when_released(self) -> None:
        b = MemoryBudget(100 * KIB)
        first, second = chunk(60 * KIB), chunk(60 * KIB)
        await b.acquire(first)
        done: list[str] = []

        async def take() -> None:
            await b.acquire(second)
            done.append("second")

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await wait_all_tasks_blocked()
            assert done == [] and b.waits == 1 and b.charged == 60 * KIB
            b.release(first)
        assert done == ["second"]
        assert b.charged == 60 * KIB and b.high_water == 60 * KIB  # never both at once
        b.release(second)

    async def test_a_release_from_a_pool_thread_wakes_the_waiter(self) -> None:
        b = MemoryBudget(100 * KIB)
        first, second = chunk(80 * KIB), chunk(80 * KIB)
        await b.acquire(first)
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.acquire, second)
            await wait_all_tasks_blocked()
            await anyio.to_thread.run_sync(b.release, first)
        assert b.charged == 80 * KIB
        b.release(second)

    async def test_a_chunk_bigger_than_the_limit_goes_when_nothing_else_is_charged(
        self,
    ) -> None:
        b = MemoryBudget(10 * KIB)
        big = chunk(50 * KIB)
        await b.acquire(big)
        assert b.charged == 50 * KIB
        b.release(big)
        assert b.charged == 0

    async def test_a_cancelled_waiter_charges_nothing(self) -> None:
        b = MemoryBudget(100 * KIB)
        first, second = chunk(80 * KIB), chunk(80 * KIB)
        await b.acquire(first)
        with anyio.move_on_after(0):  # cancelled at once: whether it waited or not
            await b.acquire(second)
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.acquire, second)
            await wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        assert b.charged == 80 * KIB
        b.release(first)
        assert b.charged == 0

    async def test_a_stream_reserves_holds_and_lets_go(self) -> None:
        b = MemoryBudget(100 * KIB)
        await b.reserve(64 * KIB)
        assert (b.charged, b.reserved) == (64 * KIB, 64 * KIB)
        c = chunk(40 * KIB)
        b.hold(c, 64 * KIB)  # what was read is smaller than the room asked for
        assert (b.charged, b.reserved) == (40 * KIB, 0)
        await b.acquire(c)  # a job takes it: free
        assert b.charged == 40 * KIB
        b.unhold(c)
        assert b.charged == 40 * KIB  # the job still has it
        b.release(c)
        assert b.charged == 0
        await b.reserve(10 * KIB)
        b.unreserve(10 * KIB)
        assert (b.charged, b.reserved) == (0, 0)

    async def test_waiters_go_ahead_when_only_streams_hold_chunks(self) -> None:
        # Streams whose consumers read no further keep their last chunk charged: with no
        # job holding anything nothing would ever free the budget, so a waiter goes ahead.
        b = MemoryBudget(100 * KIB)
        kept = [chunk(60 * KIB), chunk(60 * KIB)]
        for c in kept:
            await b.reserve(60 * KIB)
            b.hold(c, 60 * KIB)
        await b.reserve(60 * KIB)  # does not wait
        b.unreserve(60 * KIB)
        job = chunk(10 * KIB)
        await b.acquire(kept[0])  # now a job holds one of them: a newcomer waits for it
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.acquire, job)
            await wait_all_tasks_blocked()
            assert b.charged == 120 * KIB
            b.release(kept[0])
        b.release(job)
        for c in kept:
            b.unhold(c)
        assert b.charged == 0

    async def test_the_budget_is_one_per_loop(self) -> None:
        b = memory_budget()
        assert memory_budget() is b

        async def other() -> MemoryBudget:
            return memory_budget()

        elsewhere = await anyio.to_thread.run_sync(lambda: anyio.run(other))
        assert elsewhere is not b


class TestLanes:
    async def test_many_lanes_on_a_tiny_budget_all_finish_within_it(self) -> None:
        b = MemoryBudget(256 * KIB)
        data = [[chunk(64 * KIB) for _ in range(12)] for _ in range(40)]
        hashers = [hashlib.sha256() for _ in data]

        async def one(i: int) -> None:
            lane = Lane(b)
            for c in data[i]:
                await lane.submit(hashers[i].update, c)
            await lane.join()

        async with anyio.create_task_group() as tg:
            for i in range(len(data)):
                tg.start_soon(one, i)
        for h, cs in zip(hashers, data, strict=True):
            assert h.digest() == hashlib.sha256(b"".join(cs)).digest()
        assert b.charged == 0
        assert b.high_water <= b.limit
        assert b.waits > 0

    async def test_a_failing_job_raises_and_releases_what_was_queued(self) -> None:
        b = MemoryBudget(10 * 1024 * KIB)
        lane = Lane(b)

        def boom(c: bytes) -> None:
            raise ValueError("injected")

        for _ in range(8):
            try:
                await lane.submit(boom, chunk(64 * KIB))
            except ValueError:
                break
        with pytest.raises(ValueError, match="injected"):
            await lane.join()
        assert b.charged == 0

    async def test_closing_a_lane_drops_its_jobs_and_releases_them(self) -> None:
        b = MemoryBudget(10 * 1024 * KIB)
        lane = Lane(b)
        gate, started = threading.Event(), threading.Event()

        def slow(c: bytes) -> None:
            started.set()
            gate.wait(30)

        for _ in range(5):
            await lane.submit(slow, chunk(64 * KIB))
        await anyio.to_thread.run_sync(started.wait, 30)
        assert b.charged == 5 * 64 * KIB
        async with anyio.create_task_group() as tg:
            tg.start_soon(lane.close)
            await wait_all_tasks_blocked()
            gate.set()
        assert b.charged == 0


# --- real streams from the real registry --------------------------------------------------

FAST = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05, retry_after_cap=2.0, resumes=6)
LAYERS = 4
LAYER_BYTES = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def wide(registry: Registry) -> Iterator[str]:
    """An image of four ~3 MiB layers in the session's registry."""
    img = random.image(LAYER_BYTES, LAYERS, seed=16)
    anyio.run(push_image, registry.host, "test/membudget", "v1", img)
    yield f"{registry.host}/test/membudget:v1"


async def _blobs(c: Client, ref: str, fs: FilesystemCache) -> list[ByteReceiveStream]:
    img = cache.image(await c.image(ref), fs)
    return [await layer.compressed() for layer in await img.layers()]


async def test_a_concurrent_pull_stays_within_the_budget(
    wide: str, tmp_path: Path, budget: MemoryBudget
) -> None:
    budget.limit = 2 * CHUNK_SIZE
    budget.high_water = 0
    async with Client(retry=FAST, docker_config=False) as c:
        img = cache.image(await c.image(wide), FilesystemCache(tmp_path / "cache"))
        await layout.write(tmp_path / "oci", img)  # every layer in flight at once
    # Over the limit only by the chunks of streams let in while no job held anything
    # (at most one per stream in flight, and one more).
    assert budget.high_water <= max(budget.limit, LAYERS * CHUNK_SIZE) + CHUNK_SIZE
    assert budget.charged == 0
    await validate.image(await layout.image(tmp_path / "oci"))
    assert len(entries(tmp_path / "cache")) == LAYERS


async def test_jobs_alone_never_exceed_the_budget(
    wide: str, tmp_path: Path, budget: MemoryBudget
) -> None:
    # Layers served from the cache are not network streams: every chunk in the budget is
    # a job's (hash lanes, layout writes), and the budget is a hard bound.
    async with Client(retry=FAST, docker_config=False) as c:
        fs = FilesystemCache(tmp_path / "cache")
        await cache.prefetch(cache.image(await c.image(wide), fs), fs)
        budget.limit = CHUNK_SIZE
        budget.high_water = 0
        async with anyio.create_task_group() as tg:
            for s in await _blobs(c, wide, fs):
                tg.start_soon(drain, s)
    assert 0 < budget.high_water <= budget.limit
    assert budget.charged == 0


@pytest.mark.parametrize("order", ["in_turn", "interleaved", "one_left_open"])
async def test_consumers_never_deadlock_on_a_tiny_budget(
    wide: str, tmp_path: Path, budget: MemoryBudget, order: str
) -> None:
    budget.limit = 1  # every chunk is over it
    async with Client(retry=FAST, docker_config=False) as c:
        fs = FilesystemCache(tmp_path / "cache")
        streams = await _blobs(c, wide, fs)
        got = [hashlib.sha256() for _ in streams]
        if order == "in_turn":
            for s, h in zip(streams, got, strict=True):
                async with s:
                    async for part in s:
                        h.update(part)
        elif order == "interleaved":  # one task, round robin
            live = list(range(len(streams)))
            while live:
                for i in list(live):
                    try:
                        got[i].update(await streams[i].receive())
                    except anyio.EndOfStream:
                        live.remove(i)
            for s in streams:
                await s.aclose()
        else:  # one chunk of the first, then the others whole, the first still open
            got[0].update(await streams[0].receive())
            for s, h in zip(streams[1:], got[1:], strict=True):
                async with s:
                    async for part in s:
                        h.update(part)
            async with streams[0]:
                async for part in streams[0]:
                    got[0].update(part)
        img = await c.image(wide)
        digests = [await layer.digest() for layer in await img.layers()]
    assert [Hash("sha256", h.hexdigest()) for h in got] == digests
    assert budget.charged == 0
    assert len(entries(tmp_path / "cache")) == LAYERS


async def test_a_cancelled_read_gives_back_what_it_charged(
    wide: str, tmp_path: Path, budget: MemoryBudget
) -> None:
    budget.limit = CHUNK_SIZE
    budget.high_water = 0
    async with Client(retry=FAST, docker_config=False) as c:
        streams = await _blobs(c, wide, FilesystemCache(tmp_path / "cache"))
        async with anyio.create_task_group() as tg:
            for s in streams:
                tg.start_soon(drain, s)
            while budget.high_water == 0:
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
        for s in streams:
            await s.aclose()
    assert budget.charged == 0
    assert entries(tmp_path / "cache") == []


def test_tune_malloc_is_for_programs_to_call() -> None:
    # A process-wide setting: tried in a process of its own, never in the library's.
    code = "from aiolayercache._memory_budget import tune_malloc; print(tune_malloc())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    glibc = sys.platform == "linux" and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    assert out.stdout.strip() == str(glibc)
