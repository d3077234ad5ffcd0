"""Reliability across processes (RELIABILITY.md rows 1, 2, 5, 6, 7, 8) and mass cancellation.

Children are real processes (``python kid.py MODE ...``, the script below) pulling through
the session's fault proxy in front of Debian's docker-registry; the proxy counts every
request. Each test prints one ``RELIABILITY <name> runs=.. failures=..`` line and appends
the same counts as JSON to ``$AIOLAYERCACHE_RELIABILITY_LOG`` (see ``_log.py``). Failures
are collected over all runs first, recorded, then asserted, so a bad run is counted.

The last two tests are in-process regressions for bugs these scenarios found: a fill that
waited on itself (an image wrapped twice by one cache) and a sweep that could take a live
writer's temp file between its creation and its lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

import anyio
import anyio.to_thread
import pytest

from aiolayercache import Hash, Manifest, cache, random, validate
from aiolayercache._atomic import AtomicFile, sweep_temps
from aiolayercache.cache import FilesystemCache
from aiolayercache.remote import Client, RetryPolicy
from aiolayercache.streams import CHUNK_SIZE

from ..conftest import Published, Source, entries, temps
from ..registry import FaultProxy
from ._log import record

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CLI = [sys.executable, "-m", "aiolayercache"]
FAST = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05, retry_after_cap=2.0, resumes=6)


def summary(name: str, scenario: str, **counts: Any) -> str:
    """Print ``RELIABILITY name k=v ...`` and append the counts to the reliability log."""
    line = " ".join(["RELIABILITY", name, *(f"{k}={v}" for k, v in counts.items())])
    print(line)
    record(scenario, **counts)
    return line


# --- the child process ------------------------------------------------------------------

KID = textwrap.dedent(
    '''
    """A child for the reliability tests: python kid.py MODE ARGS..."""
    import gc
    import hashlib
    import json
    import os
    import sys
    import time
    from random import Random

    import anyio
    import anyio.lowlevel

    FAST = dict(attempts=4, backoff=0.01, max_backoff=0.05, retry_after_cap=2.0, resumes=6)


    def client():
        from aiolayercache.remote import Client, RetryPolicy

        return Client(retry=RetryPolicy(**FAST), docker_config=False)


    def fds():
        out = {}
        for n in os.listdir("/proc/self/fd"):
            try:
                out[int(n)] = os.readlink(f"/proc/self/fd/{n}")
            except OSError:
                pass
        return out


    async def read_stream(stream, h, chunk=64 * 1024, pause=0.0, rng=None):
        n = 0
        async with stream:
            while True:
                try:
                    data = await stream.receive(chunk)
                except anyio.EndOfStream:
                    return n
                h.update(data)
                n += len(data)
                if pause:
                    await anyio.sleep(rng.random() * pause)


    async def layer(cache_dir, ref, digest):
        """Read one layer through the cache (filling it)."""
        from aiolayercache import Hash, cache
        from aiolayercache.cache import FilesystemCache

        async with client() as c:
            img = cache.image(await c.image(ref), FilesystemCache(cache_dir))
            lay = await img.layer_by_digest(Hash.parse(digest))
            h = hashlib.sha256()
            n = await read_stream(await lay.compressed(), h)
        print(json.dumps({"bytes": n, "sha256": h.hexdigest()}), flush=True)
        return 0


    async def reader(cache_dir, ref, seconds, seed):
        """Read random layers slowly through the cache until the time is up; hash them here."""
        from aiolayercache import cache
        from aiolayercache.cache import FilesystemCache

        rng = Random(int(seed))
        fs = FilesystemCache(cache_dir)
        out = {"reads": 0, "bytes": 0, "errors": []}
        deadline = time.monotonic() + float(seconds)
        async with client() as c:
            img = cache.image(await c.image(ref), fs)
            layers = await img.layers()
            while time.monotonic() < deadline:
                lay = rng.choice(layers)
                want, size = await lay.digest(), await lay.size()
                h = hashlib.sha256()
                try:
                    n = await read_stream(await lay.compressed(), h, pause=0.002, rng=rng)
                except Exception as exc:
                    out["errors"].append(f"{type(exc).__name__}: {exc}")
                    continue
                if n != size or h.hexdigest() != want.hex:
                    out["errors"].append(f"partial read of {want}: {n} of {size} bytes")
                out["reads"] += 1
                out["bytes"] += n
        print(json.dumps(out), flush=True)
        return 0


    async def pruner(cache_dir, seconds):
        """prune(max_bytes=0) in a loop until the time is up."""
        from aiolayercache.cache import FilesystemCache

        fs = FilesystemCache(cache_dir)
        out = {"rounds": 0, "removed": 0}
        deadline = time.monotonic() + float(seconds)
        while time.monotonic() < deadline:
            out["removed"] += len(await fs.prune(max_bytes=0))
            out["rounds"] += 1
            await anyio.sleep(0.005)
        print(json.dumps(out), flush=True)
        return 0


    async def cancels(cache_dir, refs, tasks, seed):
        """Many tasks reading layers through one cache, cancelled at random points."""
        from aiolayercache import Hash, LayerNotFoundError, cache
        from aiolayercache.cache import FilesystemCache
        from aiolayercache.cache._flight import FLIGHTS as _FLIGHTS

        before = fds()
        started = time.monotonic()
        fs = FilesystemCache(cache_dir)
        outcomes = {}
        problems = []
        c = client()
        with anyio.fail_after(120):
            layers = []
            for ref in refs.split(","):
                img = cache.image(await c.image(ref), fs)
                layers.extend(await img.layers())
            described = [(x, await x.digest(), await x.diff_id()) for x in layers]
            limiter = anyio.CapacityLimiter(64)

            async def one(i):
                rng = Random(int(seed) * 100_003 + i)
                lay, digest, diff_id = rng.choice(described)
                form = "compressed" if rng.random() < 0.8 else "uncompressed"
                want = digest if form == "compressed" else diff_id
                mode = rng.choice(["deadline", "after_k", "after_k", "close_early", "full"])
                k = rng.randint(0, 8)
                h = hashlib.sha256()
                got = 0
                complete = False
                async with limiter:
                    if rng.random() < 0.05:  # make room: later readers must fill again
                        try:
                            await fs.delete(want)
                        except LayerNotFoundError:
                            pass
                    with anyio.CancelScope() as scope:
                        if mode == "deadline":
                            scope.deadline = anyio.current_time() + rng.uniform(0, 0.05)
                        opener = lay.compressed if form == "compressed" else lay.uncompressed
                        stream = await opener()
                        async with stream:
                            chunks = 0
                            while True:
                                if mode == "after_k" and chunks == k:
                                    scope.cancel()
                                    await anyio.lowlevel.checkpoint()
                                if mode == "close_early" and chunks == k:
                                    break
                                try:
                                    data = await stream.receive(64 * 1024)
                                except anyio.EndOfStream:
                                    complete = True
                                    break
                                h.update(data)
                                got += len(data)
                                chunks += 1
                    if complete and h.hexdigest() != want.hex:
                        problems.append(f"task {i}: {form} {want}: bytes hash otherwise")
                    if scope.cancelled_caught:
                        what = "cancelled"
                    elif complete:
                        what = "complete"
                    else:
                        what = "closed_early"
                    outcomes[what] = outcomes.get(what, 0) + 1

            async def guarded(i):
                try:
                    await one(i)
                except Exception as exc:
                    problems.append(f"task {i}: {type(exc).__name__}: {exc}")

            async with anyio.create_task_group() as tg:
                for i in range(int(tasks)):
                    tg.start_soon(guarded, i)
        await c.aclose()
        elapsed = time.monotonic() - started
        await anyio.sleep(0.2)  # let closed transports finish closing
        gc.collect()
        await anyio.sleep(0)
        after = fds()
        leaked = {n: t for n, t in after.items() if before.get(n) != t}
        report = await fs.verify()
        flights = [k[1] for k in _FLIGHTS]
        print(
            json.dumps(
                {
                    "outcomes": outcomes,
                    "problems": problems[:20],
                    "n_problems": len(problems),
                    "fds_before": len(before),
                    "fds_after": len(after),
                    "leaked": {str(k): v for k, v in leaked.items()},
                    "verified": report.ok,
                    "removed": [str(x) for x in report.removed],
                    "temps_removed": report.temps_removed,
                    "flights_left": flights,
                    "elapsed": elapsed,
                }
            ),
            flush=True,
        )
        return 0


    def tmpfs(cache_dir, ref, out):
        """Pull with the CLI into a cache on a small tmpfs; measure the tmpfs around it."""
        from aiolayercache.cache import FilesystemCache
        from aiolayercache.cli import main

        def used():
            st = os.statvfs(cache_dir)
            return (st.f_blocks - st.f_bfree) * st.f_frsize

        def files():
            found = {}
            for root, _, names in os.walk(cache_dir):
                for n in names:
                    p = os.path.join(root, n)
                    found[os.path.relpath(p, cache_dir)] = os.path.getsize(p)
            return found

        fs = FilesystemCache(cache_dir)
        anyio.run(fs.sweep)  # creates the cache's directories (entries() only reads)
        base = used()
        code = main(["pull", ref, out, "--cache-dir", cache_dir, "--quiet"])
        after_pull, files_after_pull = used(), files()
        pruned = anyio.run(lambda: fs.prune(max_bytes=0))
        print(
            "RESULT "
            + json.dumps(
                {
                    "code": code,
                    "size": os.statvfs(cache_dir).f_blocks * os.statvfs(cache_dir).f_frsize,
                    "base": base,
                    "after_pull": after_pull,
                    "files_after_pull": files_after_pull,
                    "pruned": [str(e.digest) for e in pruned],
                    "after_prune": used(),
                    "files_after_prune": files(),
                }
            ),
            flush=True,
        )
        return 0


    def main():
        mode, args = sys.argv[1], sys.argv[2:]
        if os.environ.get("KID_BARRIER"):
            print("ready", flush=True)
            sys.stdin.readline()
        if mode == "cli":
            from aiolayercache.cli import main as cli

            return cli(args)
        if mode == "tmpfs":
            return tmpfs(*args)
        return anyio.run(globals()[mode], *args)


    if __name__ == "__main__":
        sys.exit(main())
    '''
)


@dataclass
class Kid:
    proc: subprocess.Popen[str]
    out: Path
    err: Path

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def json(self) -> Any:
        lines = [x for x in self.stdout.splitlines() if x.startswith("{")]
        assert lines, f"no result from the child: {self.stderr[-3000:]}"
        return json.loads(lines[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def wait(self, seconds: float = 60) -> int:
        return await anyio.to_thread.run_sync(self.proc.wait, seconds)


class Kids:
    """Starts children, each with its own stdout/stderr files; kills leftovers at teardown."""

    def __init__(self, script: Path, logs: Path) -> None:
        self.script = script
        self.logs = logs
        self.started: list[Kid] = []

    def spawn(
        self, mode: str, *args: str, barrier: bool = False, prefix: list[str] | None = None
    ) -> Kid:
        n = len(self.started)
        env = dict(os.environ)
        env.pop("AIOLAYERCACHE_CACHE_DIR", None)
        if barrier:
            env["KID_BARRIER"] = "1"
        out, err = self.logs / f"kid{n}.out", self.logs / f"kid{n}.err"
        with open(out, "w") as o, open(err, "w") as e:
            proc = subprocess.Popen(
                [*(prefix or []), sys.executable, str(self.script), mode, *args],
                stdin=subprocess.PIPE if barrier else subprocess.DEVNULL,
                stdout=o,
                stderr=e,
                text=True,
                env=env,
            )
        kid = Kid(proc, out, err)
        self.started.append(kid)
        return kid

    async def release(self, group: list[Kid], seconds: float = 30) -> None:
        """The barrier: wait until every child of ``group`` is ready, then let all go."""
        with anyio.fail_after(seconds):
            while not all(k.stdout.startswith("ready") for k in group):
                for k in group:
                    assert k.proc.poll() is None, f"child died before the barrier: {k.stderr}"
                await anyio.sleep(0.01)
        for k in group:
            assert k.proc.stdin is not None
            k.proc.stdin.write("go\n")
            k.proc.stdin.flush()

    def cleanup(self) -> None:
        for k in self.started:
            if k.proc.poll() is None:
                k.kill()
            if k.proc.stdin is not None:
                k.proc.stdin.close()


@pytest.fixture(scope="session")
def kid_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("kid") / "kid.py"
    p.write_text(KID)
    return p


@pytest.fixture
def kids(kid_script: Path, tmp_path: Path) -> Iterator[Kids]:
    logs = tmp_path / "logs"
    logs.mkdir()
    k = Kids(kid_script, logs)
    yield k
    k.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    async with Client(retry=FAST, docker_config=False) as c:
        yield c


# --- invariants -------------------------------------------------------------------------


def bad_entries(d: Path) -> list[str]:
    """Files named like a digest whose bytes hash to something else (or are missing bytes)."""
    bad = []
    for name in sorted(os.listdir(d)):
        alg, sep, hex_ = name.partition(":")
        if not sep or alg not in ("sha256", "sha512"):
            continue
        data = (d / name).read_bytes()
        if hashlib.new(alg, data).hexdigest() != hex_:
            bad.append(f"{name} ({len(data)} bytes)")
    return bad


def held_locks(d: Path) -> list[str]:
    """Entry lock files some process still holds (flock conflicts across descriptors)."""
    locks = d / ".aiolayercache" / "locks"
    held = []
    for name in sorted(os.listdir(locks)) if locks.exists() else []:
        fd = os.open(locks / name, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            held.append(name)
        finally:
            os.close(fd)
    return held


def temps_of(d: Path, h: Hash) -> list[Path]:
    """Temp files of entry ``h`` (named ``.<first 16 hex>.<random>.tmp``)."""
    t = d / ".aiolayercache" / "tmp"
    return [t / n for n in temps(d) if n.startswith(f".{h.hex[:16]}.")]


def layer_descs(img: Any) -> list[tuple[Hash, int]]:
    return [(x.digest, x.size) for x in Manifest.parse(img._raw).layers]


def blob_gets(proxy: FaultProxy) -> dict[str, int]:
    return {
        k: v for k, v in proxy.stats.requests.items() if k.startswith("GET ") and "/blobs/" in k
    }


async def wait_for(cond: Any, seconds: float, what: str) -> None:
    """Poll ``cond`` (state another process changes: no event to wait on)."""
    try:
        with anyio.fail_after(seconds):
            while not cond():  # noqa: ASYNC110
                await anyio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out after {seconds} s waiting for {what}") from None


# --- 1. SIGKILL mid-pull at chosen offsets (rows 1 and 2) -----------------------------------

PAUSED_RUNS = 16
THROTTLED_RUNS = 8


async def test_sigkill_mid_pull_leaves_only_verified_entries(
    proxy: FaultProxy, published: Published, kids: Kids, client: Client, tmp_path: Path
) -> None:
    """A CLI pull of test/big (2 layers of 3 MiB) into one shared cache is SIGKILLed.

    Paused runs: the proxy sends a chosen number of bytes of one layer (0 included: headers
    only), says "offset reached" and holds the rest; the test waits until the child's temp
    file stops growing (never past the offset) and kills it: the child then holds
    unverified bytes in memory and on disk. Throttled
    runs: the layer trickles in; the kill lands at a random moment after the temp file
    appears (mid-blob, at the rename, or after). After each kill: every final entry hashes
    to its name, the paused entry is absent, no lock is held, the dead writer's temp file is
    swept while a live writer's (an AtomicFile held open here) is spared, and an in-process
    pull validates; then the cache is pruned so the next child starts cold.
    """
    ref = f"{proxy.address}/test/big:v1"
    layers = layer_descs(published.big)
    d = tmp_path / "cache"
    fs = FilesystemCache(d)
    await fs.sweep()  # create the directories (entries() only reads)
    live = AtomicFile(str(d / "live-writer"), str(d / ".aiolayercache" / "tmp"), durable=False)
    await live.open()
    rng = Random(20240601)
    size = layers[0][1]
    offsets = [0, 1, 4096, 65536, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, size - 1]
    offsets += [rng.randrange(size) for _ in range(PAUSED_RUNS - len(offsets))]
    plan: list[tuple[int, int | None]] = [(i % 2, off) for i, off in enumerate(offsets)]
    plan += [(rng.randrange(2), None) for _ in range(THROTTLED_RUNS)]
    failures: list[str] = []
    partial = swept = completed_before_kill = 0
    started = time.monotonic()
    try:
        for run, (which, offset) in enumerate(plan):
            h, _ = layers[which]
            where = f"run {run} (layer {which}, offset {offset})"
            proxy.rules.clear()
            reached, release = threading.Event(), threading.Event()
            if offset is not None:
                proxy.add(f"/blobs/{h}", "pause", (offset, reached, release))
            else:
                proxy.add(f"/blobs/{h}", "throttle", 0.006)
            kid = kids.spawn("cli", "pull", ref, str(tmp_path / f"out{run}"), "--cache-dir", str(d))
            try:
                if offset is not None:
                    await anyio.to_thread.run_sync(reached.wait, 30)
                    assert reached.is_set(), f"{where}: the proxy never reached the offset"
                    # Kill once the child's temp file exists and has stopped growing: it
                    # holds what the client could verify-and-tee of the first `offset`
                    # bytes (streams hand out ~1 MiB chunks and hold one back).
                    sizes: list[int] = []

                    def settled(h: Hash = h, sizes: list[int] = sizes) -> bool:
                        now = [p.stat().st_size for p in temps_of(d, h) if p.exists()]
                        sizes.append(now[0] if now else -1)
                        return len(sizes) > 20 and sizes[-1] >= 0 and len(set(sizes[-20:])) == 1

                    await wait_for(settled, 20, f"{where}: the temp file to settle")
                    on_disk = sizes[-1]
                    if on_disk > offset:
                        failures.append(f"{where}: {on_disk} bytes on disk of {offset} sent")
                else:
                    await wait_for(
                        lambda h=h, kid=kid: bool(temps_of(d, h)) or kid.proc.poll() is not None,
                        30,
                        f"{where}: temp file",
                    )
                    await anyio.sleep(rng.uniform(0, 0.45))
                if kid.proc.poll() is not None:
                    completed_before_kill += 1
                kid.kill()
            finally:
                release.set()
            # --- what the dead child left
            if offset is not None and kid.proc.returncode != -signal.SIGKILL:
                failures.append(f"{where}: child exited {kid.proc.returncode}: {kid.stderr}")
            bad = bad_entries(d)
            partial += len(bad)
            failures += [f"{where}: bad entry {b}" for b in bad]
            if offset is not None and (d / h.filename).exists():
                failures.append(f"{where}: entry committed though its body was held back")
            if held := held_locks(d):
                failures.append(f"{where}: locks still held after the kill: {held}")
            before = temps(d)
            if offset is not None and not temps_of(d, h):
                failures.append(f"{where}: no temp file left: the kill did not land mid-write")
            n = await FilesystemCache(d).sweep()
            after = temps(d)
            if after != [os.path.basename(live.tmp)]:
                failures.append(f"{where}: after the sweep {after}, want only the live writer")
            if n != len(set(before) - set(after)):
                failures.append(f"{where}: sweep() says {n}, but {before} became {after}")
            swept += n
            # --- the next pull succeeds and validates; then start cold again
            try:
                await validate.image(cache.image(await client.image(ref), FilesystemCache(d)))
            except Exception as exc:
                failures.append(f"{where}: re-pull failed: {type(exc).__name__}: {exc}")
            failures += [f"{where}: bad entry after re-pull {b}" for b in bad_entries(d)]
            await FilesystemCache(d).prune(max_bytes=0)
    finally:
        await live.discard()
    summary(
        "kill_mid_pull",
        "1/2 SIGKILL mid-pull at chosen offsets",
        runs=len(plan),
        failures=len(failures),
        partial_entries=partial,
        stale_temps_swept=swept,
        completed_before_kill=completed_before_kill,
        seconds=round(time.monotonic() - started, 1),
    )
    assert not failures, "\n".join(failures)
    assert swept >= PAUSED_RUNS  # every paused child left a temp file, and it went


# --- 8. the sweep spares a live writer in another process ----------------------------------


async def test_sweep_removes_temps_of_killed_children_and_spares_a_live_one(
    proxy: FaultProxy, published: Published, kids: Kids, tmp_path: Path
) -> None:
    """Three children paused mid-layer are killed, a fourth stays paused: a sweep from another
    process (``aiolayercache cache verify``) removes exactly the three dead temp files; the
    live child then finishes, and its entry verifies."""
    d = tmp_path / "cache"
    small = layer_descs(published.small)
    big_h, big_size = layer_descs(published.big)[0]
    events = []
    group = []
    for (h, size), off in [*zip(small, (0, 100_000, 250_000), strict=True), ((big_h, big_size), 0)]:
        reached, release = threading.Event(), threading.Event()
        repo = "small" if (h, size) in small else "big"
        proxy.add(f"/blobs/{h}", "pause", (min(off, size - 1), reached, release))
        events.append((reached, release))
        ref = f"{proxy.address}/test/{repo}:v1"
        group.append(kids.spawn("layer", str(d), ref, str(h)))
    failures: list[str] = []
    try:
        for reached, _ in events:
            await anyio.to_thread.run_sync(reached.wait, 30)
        await wait_for(lambda: len(temps(d)) == 4, 20, "four temp files")
        # While everyone is alive, a sweep removes nothing.
        r = subprocess.run(
            [*CLI, "cache", "--cache-dir", str(d), "verify"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if "0 stale temp files removed" not in r.stdout or len(temps(d)) != 4:
            failures.append(f"a sweep with only live writers removed some: {r.stdout}")
        live_tmp = temps_of(d, big_h)
        for k in group[:3]:
            k.kill()
        r = subprocess.run(
            [*CLI, "cache", "--cache-dir", str(d), "verify"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if "3 stale temp files removed" not in r.stdout:
            failures.append(f"sweep after three kills: {r.stdout} {r.stderr}")
        if temps_of(d, big_h) != live_tmp or len(temps(d)) != 1:
            failures.append(f"after the sweep: {temps(d)}, want only {live_tmp}")
    finally:
        for _, release in events:
            release.set()
    code = await group[3].wait(60)
    if code != 0 or group[3].json()["sha256"] != big_h.hex:
        failures.append(f"the live child failed: {code} {group[3].stderr[-2000:]}")
    if entries(d) != [big_h.filename]:  # layers only: the configs are cached too
        failures.append(f"entries: {os.listdir(d)}")
    failures += [f"bad entry {b}" for b in bad_entries(d)]
    if temps(d) or held_locks(d):
        failures.append(f"left behind: temps {temps(d)} locks {held_locks(d)}")
    summary(
        "sweep_live_writer",
        "8 sweep after kills spares a live writer",
        runs=1,
        failures=len(failures),
    )
    assert not failures, "\n".join(failures)


# --- 2. eight processes, one cache, one GET per blob (row 5) --------------------------------

PROCS = 8


async def test_eight_processes_pull_the_same_images_each_blob_crosses_once(
    proxy: FaultProxy, published: Published, kids: Kids, tmp_path: Path
) -> None:
    """Eight CLI pulls of test/big and test/small start at once (a stdin barrier) into one
    cache. Layer bodies trickle (throttled) so every child finds the fills in progress.
    Every child succeeds, every entry verifies, each blob path sees exactly one GET and the
    proxy moves exactly the images' unique blob bytes."""
    d = tmp_path / "cache"
    blobs: dict[Hash, bytes] = {}
    for img in (published.big, published.small):
        blobs.update(img._blobs.blobs)  # type: ignore[attr-defined]
    for h, _ in layer_descs(published.big) + layer_descs(published.small):
        proxy.add(f"/blobs/{h}", "throttle", 0.003, times=PROCS)
    refs = [f"{proxy.address}/test/big:v1", f"{proxy.address}/test/small:v1"]
    group = [
        kids.spawn(
            "cli", "pull", *refs, str(tmp_path / f"out{i}"), "--cache-dir", str(d), barrier=True
        )
        for i in range(PROCS)
    ]
    started = time.monotonic()
    await kids.release(group)
    codes = [await k.wait(120) for k in group]
    elapsed = time.monotonic() - started
    failures = [
        f"child {i} exited {c}: {group[i].stderr[-2000:]}" for i, c in enumerate(codes) if c
    ]
    gets = blob_gets(proxy)
    per_blob = {h: sum(v for k, v in gets.items() if str(h) in k) for h in blobs}
    configs = {
        Manifest.parse(img._raw).config.digest  # type: ignore[attr-defined]
        for img in (published.big, published.small)
    }
    extra = {str(h)[:19]: n for h, n in per_blob.items() if n != 1}
    if extra:
        failures.append(f"blobs (layers and configs) not fetched exactly once: {extra}")
    unique = sum(len(b) for b in blobs.values())
    if proxy.stats.blob_bytes != unique:
        failures.append(f"blob bytes {proxy.stats.blob_bytes}, unique {unique}")
    bad = bad_entries(d)
    failures += [f"bad entry {b}" for b in bad]
    report = await FilesystemCache(d).verify()
    if report.removed or report.ok != len(blobs):
        failures.append(f"verify: {report}")
    if temps(d) or held_locks(d):
        failures.append(f"left behind: temps {temps(d)} locks {held_locks(d)}")
    summary(
        "eight_processes",
        "5 eight processes pull the same images",
        runs=1,
        failures=len(failures),
        partial_entries=len(bad),
        processes=PROCS,
        blob_gets=sum(per_blob.values()),
        unique_blobs=len(blobs),
        config_gets=sum(per_blob[h] for h in configs),
        blob_bytes=proxy.stats.blob_bytes,
        unique_bytes=unique,
        seconds=round(elapsed, 1),
    )
    assert not failures, "\n".join(failures)


# --- 3. a cache on a tmpfs smaller than a layer (row 7) -------------------------------------


def _tmpfs_command(mount: Path) -> list[str] | None:
    """How to run a command with a 2 MiB tmpfs on ``mount``: a private mount namespace
    (``unshare -Urm``, no root needed) or, as root, None (mount it directly)."""
    if shutil.which("unshare"):
        probe = subprocess.run(
            [
                "unshare",
                "-Urm",
                "sh",
                "-c",
                f"mount -t tmpfs -o size=2m tmpfs {shlex.quote(str(mount))}",
            ],
            capture_output=True,
        )
        if probe.returncode == 0:
            return [
                "unshare",
                "-Urm",
                "sh",
                "-c",
                f'mount -t tmpfs -o size=2m tmpfs {shlex.quote(str(mount))} && "$@"',
            ]
    return None


async def test_cache_on_a_full_tmpfs_pulls_uncached_and_leaves_nothing(
    proxy: FaultProxy, published: Published, kids: Kids, tmp_path: Path
) -> None:
    """The cache lives on a 2 MiB tmpfs; test/big has two 3 MiB layers. The CLI pull
    succeeds, logs "not caching" exactly once per layer, keeps only the config; after
    pruning it, the tmpfs's used blocks are back to the baseline measured before the pull
    (so no temp file is left, not even an unlinked one held open).

    The tmpfs comes from ``unshare -Urm`` (a private mount namespace) or, failing that, a
    direct ``mount`` as root (unmounted after). Where neither works the test is skipped:
    the monkeypatched ENOSPC writer of tests/test_cache.py covers the logic there.
    """
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    prefix = _tmpfs_command(mount)
    mounted = False
    if prefix is None:
        if os.geteuid() != 0:
            pytest.skip("no unshare -Urm and not root: no tmpfs to test on")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)])
        if r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted = True
        prefix = []
    else:
        prefix = [*prefix, "sh"]  # "$@" starts after $0
    d = mount / "cache"
    ref = f"{proxy.address}/test/big:v1"
    layers = layer_descs(published.big)
    try:
        kid = kids.spawn("tmpfs", str(d), ref, str(tmp_path / "out"), prefix=prefix)
        code = await kid.wait(120)
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=True)
    assert code == 0, kid.stderr
    line = next(x for x in kid.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT ") :])
    warnings = [x for x in kid.stderr.splitlines() if "not caching" in x]
    failures = []
    if res["code"] != 0:
        failures.append(f"the pull failed: {kid.stderr[-2000:]}")
    if res["size"] != 2 * 1024 * 1024:
        failures.append(f"the tmpfs is {res['size']} bytes, not 2 MiB: was it mounted?")
    for h, _ in layers:
        n = sum(str(h) in w for w in warnings)
        if n != 1:
            failures.append(f"{h}: {n} 'not caching' warnings, want 1")
    if len(warnings) != len(layers):
        failures.append(f"{len(warnings)} warnings: {warnings}")
    after = res["files_after_pull"]
    if any(n.startswith(".aiolayercache/tmp/") for n in after):
        failures.append(f"temp files left after the pull: {after}")
    names = [n for n in after if n.startswith("sha256:")]
    config = str(Manifest.parse(published.big._raw).config.digest)  # type: ignore[attr-defined]
    if names != [config]:
        failures.append(f"entries after the pull: {names}, want only the config")
    page = os.sysconf("SC_PAGE_SIZE")
    pages = sum(-(-size // page) * page for size in after.values())
    if res["after_pull"] - res["base"] != pages:  # an unlinked temp held open would show here
        failures.append(f"tmpfs used {res['after_pull']} bytes after the pull; files hold {pages}")
    if res["after_prune"] != res["base"]:
        failures.append(f"tmpfs used {res['after_prune']} bytes after prune, {res['base']} before")
    if any(size for size in res["files_after_prune"].values()):
        failures.append(f"bytes left after prune: {res['files_after_prune']}")
    summary(
        "enospc_tmpfs",
        "7 ENOSPC on a tmpfs smaller than a layer",
        runs=1,
        failures=len(failures),
        leaks=res["after_prune"] - res["base"],
        warnings=len(warnings),
        tmpfs="unshare" if not mounted else "mount",
    )
    assert not failures, "\n".join(failures)


# --- 4. eviction racing readers and writers in other processes (row 6) ---------------------

RACE_SECONDS = 4.0


async def test_prune_races_readers_and_writers_in_other_processes(
    proxy: FaultProxy, published: Published, kids: Kids, client: Client, tmp_path: Path
) -> None:
    """Four children read random layers slowly through one cache (refilling what is gone)
    while a fifth prunes it to zero in a loop and the test runs ``cache prune --max-size 0``
    too. Every read hashes right and is whole; afterwards every entry verifies and no temp
    file or held lock is left."""
    d = tmp_path / "cache"
    fs = FilesystemCache(d)
    refs = [f"{proxy.address}/test/big:v1", f"{proxy.address}/test/small:v1"]
    for ref in refs:
        await cache.prefetch(await client.image(ref), fs)
    warm_gets = sum(blob_gets(proxy).values())
    group = [
        kids.spawn("reader", str(d), refs[i % 2], str(RACE_SECONDS), str(i), barrier=True)
        for i in range(4)
    ]
    group.append(kids.spawn("pruner", str(d), str(RACE_SECONDS), barrier=True))
    await kids.release(group)
    cli_prunes = 0
    deadline = time.monotonic() + RACE_SECONDS - 1
    while time.monotonic() < deadline:
        r = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [*CLI, "cache", "--cache-dir", str(d), "prune", "--max-size", "0"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        )
        assert r.returncode == 0, r.stderr
        cli_prunes += 1
    codes = [await k.wait(120) for k in group]
    failures = [
        f"child {i} exited {c}: {group[i].stderr[-2000:]}" for i, c in enumerate(codes) if c
    ]
    results = [k.json() for k in group]
    readers, pruned = results[:4], results[4]
    reads = sum(r["reads"] for r in readers)
    errors = [e for r in readers for e in r["errors"]]
    failures += errors
    if any(r["reads"] == 0 for r in readers):
        failures.append(f"a reader read nothing: {readers}")
    refills = sum(blob_gets(proxy).values()) - warm_gets
    bad = bad_entries(d)
    failures += [f"bad entry {b}" for b in bad]
    report = await FilesystemCache(d).verify()
    if report.removed:
        failures.append(f"verify removed {report.removed}")
    if temps(d) or held_locks(d):
        failures.append(f"left behind: temps {temps(d)} locks {held_locks(d)}")
    summary(
        "prune_race",
        "6 prune races readers and writers",
        runs=reads,
        failures=len(failures),
        partial_entries=len(bad),
        bad_bytes_served=sum("partial" in e or "Mismatch" in e for e in errors),
        prune_rounds=pruned["rounds"],
        pruned_entries=pruned["removed"],
        cli_prunes=cli_prunes,
        refills=refills,
    )
    assert not failures, "\n".join(failures)
    # The race happened: entries were pruned under the readers and filled again.
    assert pruned["removed"] > 0 and refills > 0


# --- 5. 1,000 tasks cancelled at random points --------------------------------------------

TASKS = 1000


async def test_a_thousand_tasks_cancelled_at_random_leak_nothing(
    proxy: FaultProxy, published: Published, kids: Kids, tmp_path: Path
) -> None:
    """In a child (so its descriptors are its own, not the proxy's): 1,000 tasks, 64 at a
    time, read random layers of test/small, test/oci and test/big (compressed or not)
    through one cache and are cancelled at random points (a random deadline, cancel after
    k chunks, close after k chunks, or read to the end); 5% delete an entry first so fills
    keep happening. Seeded. No descriptor leaks, no claim or temp file is left, complete
    reads hash right, every entry verifies, and all of it ends within ``fail_after(120)``."""
    d = tmp_path / "cache"
    refs = ",".join(f"{proxy.address}/test/{r}:v1" for r in ("small", "oci", "big"))
    kid = kids.spawn("cancels", str(d), refs, str(TASKS), "5")
    code = await kid.wait(180)
    assert code == 0, kid.stderr[-3000:]
    res = kid.json()
    failures = list(res["problems"])
    if res["leaked"]:
        failures.append(f"descriptors leaked: {res['leaked']}")
    if res["removed"]:
        failures.append(f"entries that did not verify: {res['removed']}")
    if res["temps_removed"] or temps(d):
        failures.append(f"temp files left: {res['temps_removed']} {temps(d)}")
    if res["flights_left"]:
        failures.append(f"fill claims left: {res['flights_left']}")
    if held := held_locks(d):
        failures.append(f"locks held after exit: {held}")
    failures += [f"bad entry {b}" for b in bad_entries(d)]
    outcomes = res["outcomes"]
    summary(
        "cancel_storm",
        "4 1,000 tasks cancelled at random points",
        runs=sum(outcomes.values()),
        failures=len(failures) + res["n_problems"] - len(res["problems"]),
        leaks=len(res["leaked"]),
        cancelled=outcomes.get("cancelled", 0),
        complete=outcomes.get("complete", 0),
        closed_early=outcomes.get("closed_early", 0),
        upstream_gets=sum(blob_gets(proxy).values()),
        seconds=round(res["elapsed"], 1),
    )
    assert not failures, "\n".join(failures)
    assert sum(outcomes.values()) == TASKS
    assert outcomes.get("cancelled", 0) > 200 and outcomes.get("complete", 0) > 50
    # Fills were cancelled and entries deleted, so blobs were fetched again, many times.
    assert sum(blob_gets(proxy).values()) > 3 * res["verified"]


# --- found while writing these: a fill must not wait on itself -------------------------------


async def test_an_image_wrapped_twice_by_one_cache_fills_once_and_does_not_hang(
    tmp_path: Path,
) -> None:
    """``cache.prefetch(cache.image(img, fs), fs)`` used to hang for ever: the outer fill
    claimed the entry, and its upstream (the inner wrapper) waited for that same claim."""
    fs = FilesystemCache(tmp_path)
    src = Source(random.image(100_000, 2, seed=7))
    with anyio.fail_after(10):
        stats = await cache.prefetch(cache.image(src.image(), fs), fs)
        assert (stats.misses, src.layer_opens) == (2, 2)
        await validate.image(cache.image(cache.image(src.image(), fs), fs))
    assert src.layer_opens == 4  # + each layer once more, uncompressed (by diff_id)
    report = await fs.verify()
    assert (report.ok, report.removed) == (5, [])  # 2 layers x 2 forms + the config
    assert temps(tmp_path) == [] and held_locks(tmp_path) == []


async def test_a_sweep_between_create_and_lock_does_not_take_a_live_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer's temp file is unlocked between its creation and its flock; a sweep in
    another process (every process sweeps at first use) could remove it there, and the
    fill then lost its entry ("not caching ...: No such file or directory" at the rename).
    Here the sweep runs exactly in that window: the writer must notice and take a new name."""
    fs = FilesystemCache(tmp_path)
    await fs.sweep()  # sets the cache up (entries() only reads)
    tmp_dir = str(tmp_path / ".aiolayercache" / "tmp")
    real = fcntl.flock
    swept: list[str] = []
    writer_locks = 0

    def flock(fd: int, op: int) -> None:
        nonlocal writer_locks
        if os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")) == tmp_dir:
            writer_locks += 1
            if writer_locks == 1:  # sweep first, as another process might
                swept.extend(sweep_temps(tmp_dir))
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    src = Source(random.image(100_000, 1, seed=11))
    layer = (await cache.image(src.image(), fs).layers())[0]
    stream = await layer.compressed()
    async with stream:
        while True:
            try:
                await stream.receive()
            except anyio.EndOfStream:
                break
    monkeypatch.undo()
    assert len(swept) == 1  # the sweep did take the first temp file
    assert fs.write_errors == 0
    assert entries(tmp_path) == [(await layer.digest()).filename]
    assert bad_entries(tmp_path) == [] and temps(tmp_path) == []
