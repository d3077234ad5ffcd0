"""What an outside attack on the cache directory broke (issue 10, items 1-3, 5, 7, 10).

Each test booby-traps or corrupts something a fast path would skip, and checks that
no unhashed byte reaches a destination, nothing hangs, nothing outside the cache is
touched, and the pull still ends with the right bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from aiolayercache import (
    CacheDirectoryError,
    Hash,
    Image,
    LayerNotFoundError,
    cache,
    layout,
    random,
)
from aiolayercache._atomic import AtomicFile
from aiolayercache.cache import FilesystemCache
from aiolayercache.streams import StreamAttribute, drain

from .conftest import Published
from .registry import FaultProxy, Registry
from .test_cli import summary

CLI = [sys.executable, "-m", "aiolayercache"]
pytestmark = pytest.mark.anyio


def rot(path: Path, offset: int = 100) -> None:
    """Flip one byte in place, keeping size, inode and mtime (bit rot the proof cannot see)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
    )


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def layout_blobs_verify(root: Path) -> list[str]:
    """Names of blobs in the layout whose bytes do not hash to their name."""
    bad = []
    for p in (root / "blobs" / "sha256").iterdir():
        if sha256_file(p) != f"sha256:{p.name}":
            bad.append(p.name)
    return bad


async def first_layer(img: Image) -> tuple[Hash, int]:
    d = (await img.manifest()).layers[0]
    return d.digest, d.size


# --- 1. bit rot under a fast path ---------------------------------------------------------


async def test_rotted_entry_never_reaches_a_layout_through_the_kernel_copy(
    tmp_path: Path,
) -> None:
    img = random.image(256 * 1024, 2, seed=11)
    fs = FilesystemCache(tmp_path / "cache")
    await layout.write(tmp_path / "first", cache.image(img, fs))
    h, _ = await first_layer(img)
    entry = tmp_path / "cache" / h.filename
    rot(entry)

    # The entry still looks proven (same size, mtime, inode): a stream of it offers a
    # kernel copy. The copy must be hashed, fail, condemn the entry and fetch anew.
    dest = tmp_path / "second"
    await layout.write(dest, cache.image(img, fs))
    assert layout_blobs_verify(dest) == []
    assert sha256_file(entry) == str(h), "the entry was fetched again, with the right bytes"

    # And the layout's proof was not earned by the rotted bytes: a third write keeps it whole.
    await layout.write(dest, cache.image(img, fs))
    assert layout_blobs_verify(dest) == []


async def test_a_proven_entry_offers_its_file_and_a_teeing_stream_does_not(
    tmp_path: Path,
) -> None:
    img = random.image(64 * 1024, 1, seed=12)
    fs = FilesystemCache(tmp_path)
    (layer,) = await cache.image(img, fs).layers()
    first = await layer.compressed()  # a miss: teed into the cache
    assert first.extra(StreamAttribute.proven_file, None) is None
    assert first.extra(StreamAttribute.from_cache) is False
    await drain(first)
    second = await layer.compressed()
    async with second:
        proven = second.extra(StreamAttribute.proven_file)
        assert proven.digest == await layer.digest()
        assert proven.size == await layer.size()
        assert second.extra(StreamAttribute.from_cache) is True


def test_cli_pull_from_a_rotted_cache_gives_a_layout_skopeo_copies(
    registry: Registry, published: Published, tmp_path: Path
) -> None:
    """The attack's own reproduction: pull, rot an entry keeping its mtime, pull again into
    a new layout: the layout must be whole (skopeo copies it), the entry fetched again."""
    ref = f"{registry.host}/test/big:v1"
    cache_dir = tmp_path / "cache"
    first = subprocess.run(
        [*CLI, "pull", "--quiet", "--cache-dir", str(cache_dir), ref, str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    digests = [d.digest for d in anyio.run(published.big.manifest).layers]
    entry = cache_dir / digests[0].filename
    rot(entry, 2 * 1024 * 1024)
    out = tmp_path / "b"
    again = subprocess.run(
        [*CLI, "pull", "--quiet", "--cache-dir", str(cache_dir), ref, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert layout_blobs_verify(out) == []
    assert sha256_file(entry) == str(digests[0])
    name = json.loads((out / "index.json").read_bytes())["manifests"][0]["annotations"]
    ref_name = name["org.opencontainers.image.ref.name"]
    copy = subprocess.run(
        ["skopeo", "copy", f"oci:{out}:{ref_name}", f"oci:{tmp_path / 'c'}:x"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert copy.returncode == 0, copy.stderr


# --- 2. things that are not regular files at an entry's name ------------------------------


def _make_trap(kind: str, entry: Path, elsewhere: Path) -> None:
    if kind == "directory":
        entry.mkdir()
        (entry / "inside").write_bytes(b"x")
    elif kind == "fifo":
        os.mkfifo(entry)
    elif kind == "symlink-to-dir":
        elsewhere.mkdir()
        entry.symlink_to(elsewhere)
    elif kind == "symlink-loop":
        entry.symlink_to(entry.name)
    elif kind == "symlink-to-file":
        elsewhere.write_bytes(b"not the layer")
        entry.symlink_to(elsewhere)


TRAPS = ["directory", "fifo", "symlink-to-dir", "symlink-loop", "symlink-to-file"]


@pytest.mark.parametrize("kind", TRAPS)
async def test_a_non_file_entry_is_set_aside_never_hangs(kind: str, tmp_path: Path) -> None:
    img = random.image(128 * 1024, 2, seed=13)
    cache_dir = tmp_path / "cache"
    fs = FilesystemCache(cache_dir)
    await fs.sweep()  # set up
    h, _ = await first_layer(img)
    elsewhere = tmp_path / "elsewhere"
    _make_trap(kind, cache_dir / h.filename, elsewhere)
    assert await fs.entries() == [] or all(e.digest != h for e in await fs.entries())

    with anyio.fail_after(20):
        await layout.write(tmp_path / "out", cache.image(img, fs))
    assert layout_blobs_verify(tmp_path / "out") == []
    # The trap was moved aside and the entry filled properly.
    assert (cache_dir / h.filename).is_file() and not (cache_dir / h.filename).is_symlink()
    assert sha256_file(cache_dir / h.filename) == str(h)
    if kind in ("symlink-to-dir", "symlink-to-file"):
        assert elsewhere.exists(), "nothing outside the cache is touched"
    # verify removes what was set aside; nothing is left in the corrupt dir.
    report = await fs.verify()
    assert report.ok >= 2
    assert list((cache_dir / ".aiolayercache" / "corrupt").iterdir()) == []
    if kind == "symlink-to-dir":
        assert elsewhere.is_dir()


@pytest.mark.parametrize("kind", TRAPS)
async def test_verify_ls_and_rm_handle_non_file_entries(kind: str, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    fs = FilesystemCache(cache_dir)
    await fs.sweep()
    h = Hash.of(kind.encode())
    elsewhere = tmp_path / "elsewhere"
    _make_trap(kind, cache_dir / h.filename, elsewhere)
    assert [e for e in await fs.entries() if e.digest == h] == []
    await fs.delete(h)
    assert not os.path.lexists(cache_dir / h.filename)
    _make_trap(kind, cache_dir / h.filename, tmp_path / "elsewhere2")
    with anyio.fail_after(20):
        report = await fs.verify()
    assert h in report.removed
    assert not os.path.lexists(cache_dir / h.filename)
    if kind.startswith("symlink-to"):
        assert elsewhere.exists()


# --- 3. our own state directories as symlinks ---------------------------------------------


@pytest.mark.parametrize("which", ["", "tmp", "meta", "locks"])
async def test_symlinked_state_dirs_are_refused_and_nothing_outside_is_touched(
    which: str, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    state = cache_dir / ".aiolayercache"
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious.tmp"
    victim.write_bytes(b"keep me")
    if which:
        state.mkdir(parents=True)
        (state / which).symlink_to(outside)
    else:
        cache_dir.mkdir()
        state.symlink_to(outside)
    img = random.image(64 * 1024, 1, seed=14)
    fs = FilesystemCache(cache_dir)
    with pytest.raises(CacheDirectoryError) as info:
        await layout.write(tmp_path / "out", cache.image(img, fs))
    assert str(outside) in str(info.value) or ".aiolayercache" in str(info.value)
    assert victim.read_bytes() == b"keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["precious.tmp"]


# --- 5. a killed writer's temp files in a layout -----------------------------------------


async def test_layout_write_sweeps_dead_temps_and_spares_live_ones_and_others(
    tmp_path: Path,
) -> None:
    img = random.image(64 * 1024, 1, seed=15)
    dest = tmp_path / "out"
    await layout.write(dest, img)
    blobs = dest / "blobs" / "sha256"
    dead = blobs / ".0123456789abcdef.0123456789abcdef.tmp"
    dead.write_bytes(b"x" * 1000)
    dead_index = dest / ".index.fedcba9876543210.tmp"
    dead_index.write_bytes(b"{}")
    users = dest / "notes.tmp"  # not a name our writer gives: never touched
    users.write_bytes(b"mine")
    live = AtomicFile(str(blobs / "live"), str(blobs), durable=False, tag="live")
    await live.open()
    try:
        await layout.write(dest, random.image(64 * 1024, 1, seed=16), ref_name="two")
        assert not dead.exists() and not dead_index.exists()
        assert users.read_bytes() == b"mine"
        assert Path(live.tmp).exists(), "a live writer's temp (locked) is spared"
    finally:
        await live.discard()


# --- 7. an entry that cannot be read -----------------------------------------------------

_UNREADABLE_KID = r"""
import sys, anyio, logging
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from aiolayercache import cache, layout, random
from aiolayercache.cache import FilesystemCache

async def main():
    img = random.image(128 * 1024, 2, seed=17)
    fs = FilesystemCache(sys.argv[1])
    await layout.write(sys.argv[2], cache.image(img, fs))
    kinds = sorted(e.kind for e in await fs.entries())
    print("KINDS", kinds)
    report = await fs.verify()
    print("VERIFY", report.ok, len(report.removed))

anyio.run(main)
"""


# Root with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped: file permissions apply.
DROP = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def run_unprivileged(tmp_path: Path, script: str, *args: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (Python) with ``args`` as a user whom file permissions bind."""
    kid = tmp_path / "kid.py"
    kid.write_text(script)
    return subprocess.run(
        [*DROP, sys.executable, str(kid), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_an_unreadable_entry_is_a_miss_with_one_warning(tmp_path: Path) -> None:
    """As a user without the right to read an entry (root with CAP_DAC_* dropped)."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to drop root's file-access override")
    img = random.image(128 * 1024, 2, seed=17)
    cache_dir = tmp_path / "cache"
    anyio.run(layout.write, tmp_path / "warm", cache.image(img, FilesystemCache(cache_dir)))
    h = anyio.run(first_layer, img)[0]
    entry = cache_dir / h.filename
    entry.chmod(0)
    out = run_unprivileged(tmp_path, _UNREADABLE_KID, cache_dir, tmp_path / "out")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("cannot read entry") == 1, out.stderr
    assert layout_blobs_verify(tmp_path / "out") == []
    # The fill replaced the unreadable entry with a good, readable one.
    assert sha256_file(entry) == str(h)
    assert "unverified" not in out.stdout and "unreadable" not in out.stdout
    entry.chmod(0)
    ls = subprocess.run(
        [*DROP, *CLI, "cache", "--cache-dir", str(cache_dir), "ls"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ls.returncode == 0, ls.stderr
    assert f"{h}" in ls.stdout and "unreadable" in ls.stdout
    verify = subprocess.run(
        [*DROP, *CLI, "cache", "--cache-dir", str(cache_dir), "verify"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert f"removed {h}" in verify.stdout
    assert not entry.exists()


# --- 10. waiting on another process, read-only commands, the summary ----------------------


async def test_a_stalled_fill_in_another_process_is_waited_for_then_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the entry's lock and its temp file does not grow: the wait
    is logged with what it waits for, and ends after stalled_fill_timeout."""
    from aiolayercache.cache import _flight

    monkeypatch.setattr(_flight, "_NOTICE_AFTER", 0.5)
    img = random.image(64 * 1024, 1, seed=18)
    fs = FilesystemCache(tmp_path, stalled_fill_timeout=2.0)
    await fs.sweep()
    h, _ = await first_layer(img)
    lock_path = tmp_path / ".aiolayercache" / "locks" / f"sha256-{h.hex}.lock"
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    stuck = tmp_path / ".aiolayercache" / "tmp" / f".{h.hex[:16]}.0000000000000000.tmp"
    stuck.write_bytes(b"x" * 10)
    try:
        with caplog.at_level(logging.WARNING, logger="aiolayercache.cache"):
            with anyio.fail_after(30):
                await layout.write(tmp_path / "out", cache.image(img, fs))
    finally:
        os.close(lock)
    text = caplog.text
    assert f"waiting for another process to finish filling {h}" in text
    assert "made no progress" in text
    assert layout_blobs_verify(tmp_path / "out") == []
    assert sha256_file(tmp_path / h.filename) == str(h)


@pytest.mark.parametrize(
    "action", [["ls"], ["du"], ["prune", "--max-size", "1G"], ["rm", "sha256:" + "a" * 64]]
)
def test_read_only_cache_commands_create_nothing(action: list[str], tmp_path: Path) -> None:
    from aiolayercache.cli import main

    missing = tmp_path / "nonexistent"
    code = main(["cache", "--cache-dir", str(missing), *action])
    assert code in (0, 1)
    assert not missing.exists()


async def test_read_only_use_of_an_existing_cache_creates_no_state(tmp_path: Path) -> None:
    fs = FilesystemCache(tmp_path)
    assert await fs.entries() == []
    assert await fs.prune(max_bytes=0) == []
    with pytest.raises(LayerNotFoundError):
        await fs.delete(Hash.of(b"x"))
    assert list(tmp_path.iterdir()) == []


def test_bytes_read_after_waiting_for_another_process_count_as_from_cache(
    proxy: FaultProxy, published: Published, tmp_path: Path
) -> None:
    """The other process (this test) holds one layer's lock while the CLI starts, then
    commits the entry and lets go: the CLI reads it from the cache and says so."""
    ref = f"{proxy.address}/test/big:v1"
    cache_dir = tmp_path / "cache"
    anyio.run(FilesystemCache(cache_dir).sweep)
    m = anyio.run(published.big.manifest)
    h, other = m.layers[0].digest, m.layers[1].digest
    blob = published.big._blobs.blobs[h]  # type: ignore[attr-defined]
    lock_path = cache_dir / ".aiolayercache" / "locks" / f"sha256-{h.hex}.lock"
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        kid = subprocess.Popen(
            [*CLI, "pull", "--cache-dir", str(cache_dir), ref, str(tmp_path / "out")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Once the CLI has the other layer, it is waiting on our lock for this one.
        deadline = time.monotonic() + 60
        while not (cache_dir / other.filename).exists():
            assert time.monotonic() < deadline, "the CLI never fetched the other layer"
            assert kid.poll() is None, kid.communicate()
            time.sleep(0.02)
        tmp = cache_dir / ".aiolayercache" / "tmp" / "other-process.tmp"
        tmp.write_bytes(blob)
        os.replace(tmp, cache_dir / h.filename)
    finally:
        os.close(lock)
    out, err = kid.communicate(timeout=120)
    assert kid.returncode == 0, err
    gets = sum(n for path, n in proxy.stats.requests.items() if h.hex in path)
    assert gets == 0, "the layer the other process filled was not fetched"
    s = summary(out)  # sizes are rounded to a tenth of a MiB
    assert s["cached"] >= 0.97 * len(blob), out
    assert s["fetched"] <= 1.03 * m.layers[1].size, out


# --- the second attack: state files as symlinks, concurrent layouts, locks, takeovers ------


async def test_symlinked_proof_and_lock_files_lead_nowhere_outside(tmp_path: Path) -> None:
    img = random.image(64 * 1024, 2, seed=21)
    cache_dir = tmp_path / "cache"
    fs = FilesystemCache(cache_dir)
    await layout.write(tmp_path / "a", cache.image(img, fs))
    h, _ = await first_layer(img)
    outside = tmp_path / "outside"
    outside.mkdir()
    # A proof file planted as a symlink to a file outside, with an old mtime.
    target = outside / "proof.json"
    meta = cache_dir / ".aiolayercache" / "meta" / f"{h.filename}.json"
    target.write_bytes(meta.read_bytes())
    os.utime(target, (1_000_000, 1_000_000))
    meta.unlink()
    meta.symlink_to(target)
    # A lock file planted as a symlink to where a file would be created outside.
    other = (await img.manifest()).layers[1].digest
    (cache_dir / other.filename).unlink()  # so this layer is filled again, taking its lock
    lock = cache_dir / ".aiolayercache" / "locks" / f"sha256-{other.hex}.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(outside / "CREATED_BY_PULL")
    from aiolayercache.cache import _proofs

    _proofs._PROOFS.clear()  # as a new process: proofs are read from their files
    _proofs._USED.clear()
    await layout.write(tmp_path / "b", cache.image(img, FilesystemCache(cache_dir)))
    await FilesystemCache(cache_dir).entries()
    await FilesystemCache(cache_dir).prune(max_bytes=10**12)
    assert target.stat().st_mtime == 1_000_000, "a proof outside the cache was touched"
    assert sorted(p.name for p in outside.iterdir()) == ["proof.json"]
    assert layout_blobs_verify(tmp_path / "b") == []


async def test_two_writers_into_one_layout_at_once_keep_both_images(tmp_path: Path) -> None:
    dest = tmp_path / "shared"
    imgs = [random.image(256 * 1024, 3, seed=30 + i) for i in range(4)]
    async with anyio.create_task_group() as tg:
        for i, img in enumerate(imgs):
            tg.start_soon(lambda i=i, img=img: layout.write(dest, img, ref_name=f"v{i}"))
    names = sorted(
        d["annotations"]["org.opencontainers.image.ref.name"]
        for d in json.loads((dest / "index.json").read_bytes())["manifests"]
    )
    assert names == ["v0", "v1", "v2", "v3"]
    for i, img in enumerate(imgs):
        assert await (await layout.image(dest, f"v{i}")).digest() == await img.digest()


_LOCKED_OUT_KID = r"""
import sys, anyio, logging
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from aiolayercache import cache, layout, random
from aiolayercache.cache import FilesystemCache

async def main():
    img = random.image(128 * 1024, 2, seed=22)
    await layout.write(sys.argv[2], cache.image(img, FilesystemCache(sys.argv[1])))

anyio.run(main)
"""


@pytest.mark.parametrize("which", ["locks", "tmp"])
def test_an_unwritable_state_dir_never_fails_a_pull(which: str, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    anyio.run(FilesystemCache(cache_dir).sweep)
    (cache_dir / ".aiolayercache" / which).chmod(0)
    out = run_unprivileged(tmp_path, _LOCKED_OUT_KID, cache_dir, tmp_path / "out")
    (cache_dir / ".aiolayercache" / which).chmod(0o755)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert layout_blobs_verify(tmp_path / "out") == []
    if which == "locks":
        assert out.stderr.count("cannot take entry locks") == 1, out.stderr


async def test_verify_says_why_it_removed_each_entry(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    fs = FilesystemCache(cache_dir)
    img = random.image(64 * 1024, 1, seed=23)
    await layout.write(tmp_path / "a", cache.image(img, fs))
    h, _ = await first_layer(img)
    good = tmp_path / "good-copy"
    shutil.copy(cache_dir / h.filename, good)
    (cache_dir / h.filename).unlink()
    (cache_dir / h.filename).symlink_to(good)  # a symlink to a correct blob
    rotten = Hash.of(b"something else")
    (cache_dir / rotten.filename).write_bytes(b"not that")
    report = await fs.verify()
    assert report.reasons[h] == "it was a symlink, not a regular file"
    assert report.reasons[rotten] == "its bytes do not match its name"
    assert good.exists()


async def test_verify_of_a_missing_cache_creates_nothing(tmp_path: Path) -> None:
    report = await FilesystemCache(tmp_path / "none").verify()
    assert (report.ok, report.removed) == (0, [])
    assert not (tmp_path / "none").exists()


_TAKEOVER_KID = r"""
import sys, anyio
from aiolayercache import cache, layout
from aiolayercache.cache import FilesystemCache
from aiolayercache.remote import Client

async def main():
    fs = FilesystemCache(sys.argv[1], stalled_fill_timeout=1.5)
    async with Client() as c:
        img = cache.image(await c.image(sys.argv[2]), fs)
        await layout.write(sys.argv[3], img)

anyio.run(main)
"""


def test_after_a_stalled_filler_one_process_fetches_for_all(
    proxy: FaultProxy, published: Published, tmp_path: Path
) -> None:
    """Three processes wait on a filler that holds the lock and makes no progress: after
    the stall timeout one of them fetches the layer; the others wait for it and read it."""
    cache_dir = tmp_path / "cache"
    anyio.run(FilesystemCache(cache_dir).sweep)
    h = anyio.run(published.big.manifest).layers[0].digest
    lock = os.open(
        cache_dir / ".aiolayercache" / "locks" / f"sha256-{h.hex}.lock", os.O_RDWR | os.O_CREAT
    )
    fcntl.flock(lock, fcntl.LOCK_EX)
    (cache_dir / ".aiolayercache" / "tmp" / f".{h.hex[:16]}.0000000000000000.tmp").write_bytes(
        b"stuck"
    )
    proxy.add(str(h), "throttle", 0.02, times=10)  # the taker's download takes a while
    kid = tmp_path / "kid.py"
    kid.write_text(_TAKEOVER_KID)
    try:
        kids = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(kid),
                    str(cache_dir),
                    f"{proxy.address}/test/big:v1",
                    str(tmp_path / f"out{i}"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(3)
        ]
        results = [k.communicate(timeout=120) for k in kids]
    finally:
        os.close(lock)
    for k, (_, err) in zip(kids, results, strict=True):
        assert k.returncode == 0, err
    gets = sum(n for path, n in proxy.stats.requests.items() if "GET" in path and h.hex in path)
    assert gets == 1, f"{gets} downloads of the stalled layer; one process should fetch for all"
    for i in range(3):
        assert layout_blobs_verify(tmp_path / f"out{i}") == []


@pytest.mark.parametrize("what", ["layer", "config"])
@pytest.mark.parametrize("dest", ["layout", "tarball"])
async def test_a_rotted_entry_is_fetched_again_for_any_destination(
    what: str, dest: str, tmp_path: Path
) -> None:
    """Rot that keeps size, mtime and inode: the streamed read fails its hash at the end;
    the destination drops what it got of it and reads it once more, from upstream."""
    img = random.image(256 * 1024, 2, seed=40)
    cache_dir = tmp_path / "cache"
    await layout.write(tmp_path / "warm", cache.image(img, FilesystemCache(cache_dir)))
    m = await img.manifest()
    h = m.layers[0].digest if what == "layer" else m.config.digest
    rot(cache_dir / h.filename, 10)
    fs = FilesystemCache(cache_dir)
    if dest == "layout":
        await layout.write(tmp_path / "out", cache.image(img, fs))
        assert layout_blobs_verify(tmp_path / "out") == []
    else:
        from aiolayercache import tarball, validate

        await tarball.write(tmp_path / "out.tar", {"x/y:v1": cache.image(img, fs)})
        await validate.image(await tarball.image(tmp_path / "out.tar", "x/y:v1"))
    assert sha256_file(cache_dir / h.filename) == str(h), "fetched again, with the right bytes"


async def test_tarball_destinations_leave_no_temp_behind(tmp_path: Path) -> None:
    from aiolayercache import tarball

    img = random.image(64 * 1024, 1, seed=41)
    (tmp_path / "adir.tar").mkdir()
    with pytest.raises(tarball.TarballError, match="is a directory"):
        await tarball.write(tmp_path / "adir.tar", img)
    dead = tmp_path / ".tarball.0123456789abcdef.tmp"  # a killed write's, lock free
    dead.write_bytes(b"x" * 100)
    mine = tmp_path / "notes.tmp"
    mine.write_bytes(b"mine")
    await tarball.write(tmp_path / "ok.tar", img)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.tar", "notes.tmp", "ok.tar"]


async def test_a_failed_rename_leaves_no_temp_file(tmp_path: Path) -> None:
    out = AtomicFile(str(tmp_path / "target"), str(tmp_path), durable=False, tag="t")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "x").write_bytes(b"x")  # a non-empty dir: rename onto it fails
    await out.open()
    await out.write(b"data")
    with pytest.raises(OSError):
        await out.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


async def test_a_fifo_is_not_an_archive(tmp_path: Path) -> None:
    from aiolayercache import tarball

    os.mkfifo(tmp_path / "a.tar")
    with anyio.fail_after(10), pytest.raises(tarball.TarballError, match="not a regular file"):
        await tarball.images(tmp_path / "a.tar")
