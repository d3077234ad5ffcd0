"""OCI layouts and docker save tarballs: interop with skopeo and umoci, writes, bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
import zstandard
from anyio.abc import ByteReceiveStream

from aiolayercache import (
    DigestMismatchError,
    Hash,
    Image,
    Layer,
    ManifestError,
    MediaType,
    ValidationError,
    cache,
    layout,
    partial,
    random,
    tarball,
    validate,
)
from aiolayercache.cache import FilesystemCache
from aiolayercache.layout import LayoutError
from aiolayercache.streams import read_all
from aiolayercache.tarball import TarballError

from .conftest import PLATFORMS, Published, SlowStream, Source, entries
from .registry import Registry

pytestmark = pytest.mark.anyio

OCI = MediaType.OCI_MANIFEST_SCHEMA1
KIB = 1024


# --- helpers ---------------------------------------------------------------------------


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing in CI: .ci/run must install it")
        pytest.skip(f"{tool} is not installed (apt-get install {tool})")
    return path


@pytest.fixture
def skopeo() -> str:
    return _need("skopeo")


@pytest.fixture
def umoci() -> str:
    return _need("umoci")


async def run(*args: str) -> str:
    """Run a tool; its stdout, or a failure that shows its stderr."""
    proc = await anyio.run_process(list(args), check=False)
    assert proc.returncode == 0, f"{args}: {proc.stderr.decode(errors='replace')}"
    return proc.stdout.decode()


async def skopeo_copy(skopeo: str, src: str, dst: str, *extra: str) -> None:
    await run(skopeo, "--insecure-policy", "copy", "--quiet", *extra, src, dst)


async def skopeo_inspect(skopeo: str, ref: str, *extra: str) -> Any:
    return json.loads(await run(skopeo, "--insecure-policy", "inspect", *extra, ref))


def sha256_file(p: Path) -> str:
    return "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()


def snapshot(root: Path, *, exclude: Path | None = None) -> dict[str, tuple[int, int, int, str]]:
    """Every path under ``root`` (links not followed): mode, size, mtime and content hash."""
    out: dict[str, tuple[int, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if exclude is not None and (p == exclude or exclude in p.parents):
                continue
            st = p.lstat()
            digest = ""
            if p.is_file() and not p.is_symlink():
                digest = sha256_file(p)
            elif p.is_symlink():
                digest = os.readlink(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def temp_files(root: Path) -> list[str]:
    return sorted(
        os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.endswith(".tmp")
    )


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, exception groups flattened."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaves(e)]
    return [exc]


class Opens:
    """Paths this process opens (``open`` audit events) inside ``with opens:`` blocks."""

    hooked: ClassVar[bool] = False
    active: ClassVar[Opens | None] = None

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __enter__(self) -> Opens:
        Opens.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        Opens.active = None

    @staticmethod
    def hook(event: str, args: tuple[Any, ...]) -> None:
        rec = Opens.active
        if rec is not None and event == "open" and isinstance(args[0], str | bytes):
            rec.paths.append(os.path.abspath(os.fsdecode(args[0])))


@pytest.fixture
def opened() -> Iterator[Opens]:
    """Record what the library opens: wrap its calls (not the test's own I/O) in ``with``."""
    if not Opens.hooked:
        sys.addaudithook(Opens.hook)  # permanent, but idle outside a ``with`` block
        Opens.hooked = True
    yield Opens()
    Opens.active = None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def assert_read_only_inside(opened: Opens, allowed: Path, tmp: Path, *, some: bool = True) -> None:
    """Of the files opened under ``tmp`` (links resolved), none lies outside ``allowed``."""
    top, ok = os.path.realpath(tmp), os.path.realpath(allowed)
    real = {os.path.realpath(p) for p in opened.paths}
    if some:
        assert any(_under(p, ok) for p in real), "nothing opened at all: is the hook working?"
    outside = sorted(p for p in real if _under(p, top) and not _under(p, ok))
    assert outside == []


async def blob_of(layer: Layer) -> bytes:
    return await read_all(await layer.compressed())


async def tar_of(layer: Layer) -> bytes:
    return await read_all(await layer.uncompressed())


def tar_files(tar: bytes) -> dict[str, bytes]:
    """Regular files of a tar: name -> bytes."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        for m in tf:
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
    return out


async def image_of(layers: list[Layer], note: str = "") -> Image:
    """An OCI image of ``layers`` (shared freely between images), its config marked ``note``."""
    blobs: dict[Hash, Layer] = {}
    descs, diff_ids = [], []
    for layer in layers:
        d = await layer.digest()
        blobs[d] = layer
        descs.append({"mediaType": await layer.media_type(), "size": await layer.size()})
        descs[-1]["digest"] = str(d)
        diff_ids.append(str(await layer.diff_id()))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"note": note}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    raw_config = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": str(OCI),
        "config": {
            "mediaType": str(MediaType.OCI_CONFIG_JSON),
            "size": len(raw_config),
            "digest": str(Hash.of(raw_config)),
        },
        "layers": descs,
    }

    async def open_blob(desc: Any) -> ByteReceiveStream:
        return await blobs[desc.digest].compressed()

    return partial.image(json.dumps(manifest).encode(), open_blob, raw_config=raw_config)


class FailingLayer:
    """A layer whose compressed stream raises half way through."""

    def __init__(self, inner: Layer, data: bytes) -> None:
        self._inner = inner
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def compressed(self) -> ByteReceiveStream:
        return SlowStream(self._data, chunk=16 * KIB, fail_at=len(self._data) // 2)


class FailingImage:
    """``inner`` with its layer ``index`` failing mid-stream."""

    def __init__(self, inner: Image, index: int, data: bytes) -> None:
        self._inner = inner
        self._index = index
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def layers(self) -> list[Layer]:
        out = list(await self._inner.layers())
        out[self._index] = FailingLayer(out[self._index], self._data)
        return out


async def failing(img: Image, index: int = 1) -> Image:
    data = await blob_of((await img.layers())[index])
    return FailingImage(img, index, data)


async def diff_ids(img: Image) -> list[Hash]:
    return list((await img.config_file()).rootfs.diff_ids)


def index_json(root: Path) -> Any:
    return json.loads((root / "index.json").read_text())


def ref_names(root: Path) -> dict[str, str]:
    return {
        d["annotations"][layout.REF_NAME]: d["digest"]
        for d in index_json(root)["manifests"]
        if layout.REF_NAME in d.get("annotations", {})
    }


# --- interop: what we write, read by skopeo and umoci ---------------------------------


async def test_skopeo_inspects_and_copies_our_layout(tmp_path: Path, skopeo: str) -> None:
    img = random.image(100 * KIB, 2, media_type=OCI, seed=21)
    ours = tmp_path / "ours"
    desc = await layout.write(ours, img, ref_name="v1")
    assert desc.digest == await img.digest()
    got = await skopeo_inspect(skopeo, f"oci:{ours}:v1")
    assert got["Digest"] == str(await img.digest())
    assert got["Layers"] == [str(d.digest) for d in (await img.manifest()).layers]
    raw = await run(skopeo, "--insecure-policy", "inspect", "--raw", f"oci:{ours}:v1")
    assert raw.encode() == await img.raw_manifest()
    copy = tmp_path / "copy"
    await skopeo_copy(skopeo, f"oci:{ours}:v1", f"oci:{copy}:v1")
    back = await layout.image(copy, "v1")
    await validate.image(back)
    assert await back.digest() == await img.digest()


async def test_umoci_unpacks_our_layout(tmp_path: Path, umoci: str) -> None:
    img = random.image(120 * KIB, 3, media_type=OCI, seed=22)
    await layout.write(tmp_path / "lay", img, ref_name="v1")
    bundle = tmp_path / "bundle"
    await run(umoci, "unpack", "--rootless", "--image", f"{tmp_path / 'lay'}:v1", str(bundle))
    want: dict[str, bytes] = {}
    for layer in await img.layers():
        files = tar_files(await tar_of(layer))
        assert len(files) == 1
        want.update(files)
    rootfs = bundle / "rootfs"
    assert sorted(os.listdir(rootfs)) == sorted(want)
    for name, data in want.items():
        assert (rootfs / name).read_bytes() == data


async def test_skopeo_reads_our_tarball(tmp_path: Path, skopeo: str) -> None:
    img = random.image(100 * KIB, 2, seed=23)  # a Docker image, gzip layers
    archive = tmp_path / "a.tar"
    await tarball.write(archive, {"example.com/a:v1": img})
    got = await skopeo_inspect(skopeo, f"docker-archive:{archive}:example.com/a:v1")
    assert got["Layers"] == [str(d) for d in await diff_ids(img)]  # skopeo decompresses
    out = tmp_path / "out"
    await skopeo_copy(skopeo, f"docker-archive:{archive}:example.com/a:v1", f"oci:{out}:x")
    back = await layout.image(out, "x")
    await validate.image(back)
    assert await diff_ids(back) == await diff_ids(img)


async def test_multi_image_layout_round_trip(tmp_path: Path, skopeo: str) -> None:
    ii = random.index(50 * KIB, 2, 3, platforms=PLATFORMS[:3], seed=24)
    img = random.image(50 * KIB, 1, media_type=OCI, seed=25)
    lay = tmp_path / "lay"
    await layout.write(lay, ii, ref_name="multi")
    await layout.write(lay, img, ref_name="one")
    assert ref_names(lay) == {"multi": str(await ii.digest()), "one": str(await img.digest())}
    back = await layout.index(lay)
    await validate.index(back)
    top = await back.index_manifest()
    assert [d.digest for d in top.manifests] == [await ii.digest(), await img.digest()]
    nested = await back.image_index(await ii.digest())
    assert await nested.raw_manifest() == await ii.raw_manifest()
    one = await layout.image(lay, "one")
    assert await one.digest() == await img.digest()
    # skopeo finds both by name
    assert (await skopeo_inspect(skopeo, f"oci:{lay}:one"))["Digest"] == str(await img.digest())
    raw = await run(skopeo, "--insecure-policy", "inspect", "--raw", f"oci:{lay}:multi")
    assert raw.encode() == await ii.raw_manifest()


# --- interop: what skopeo writes, read by us -------------------------------------------


@pytest.mark.parametrize("name", ["small", "oci"])
async def test_we_read_what_skopeo_pulls(
    tmp_path: Path, skopeo: str, registry: Registry, published: Published, name: str
) -> None:
    src = f"docker://{registry.host}/test/{name}:v1"
    want: Image = getattr(published, name)
    lay = tmp_path / "lay"
    await skopeo_copy(skopeo, src, f"oci:{lay}:v1", "--src-tls-verify=false")
    img = await layout.image(lay, "v1")
    await validate.image(img)
    assert await diff_ids(img) == await diff_ids(want)
    archive = tmp_path / "a.tar"
    await skopeo_copy(
        skopeo, src, f"docker-archive:{archive}:test/{name}:v1", "--src-tls-verify=false"
    )
    timg = await tarball.image(archive)
    await validate.image(timg)
    assert await diff_ids(timg) == await diff_ids(want)
    assert any(t.endswith(f"test/{name}:v1") for t in timg.repo_tags)


async def test_we_read_a_multi_platform_layout_from_skopeo(
    tmp_path: Path, skopeo: str, registry: Registry, published: Published
) -> None:
    lay = tmp_path / "lay"
    src = f"docker://{registry.host}/test/multi:v1"
    await skopeo_copy(skopeo, src, f"oci:{lay}:multi", "--all", "--src-tls-verify=false")
    ii = await layout.index(lay)
    await validate.index(ii)
    (top,) = (await ii.index_manifest()).manifests
    nested = await ii.image_index(top.digest)
    children = (await nested.index_manifest()).manifests
    assert len(children) == len(PLATFORMS)
    assert {str(d.platform) for d in children} == set(PLATFORMS)
    with pytest.raises(ManifestError, match="index, not an image"):
        await layout.image(lay, "multi")


# --- ggcr's cache naming -----------------------------------------------------------------

_ENTRY = re.compile(r"sha256:[0-9a-f]{64}")


async def test_a_crane_cache_dir_serves_hits(tmp_path: Path) -> None:
    src = Source(random.image(100 * KIB, 3, seed=31))
    d = tmp_path / "crane-cache"
    d.mkdir()
    for layer in await src.image().layers():  # as `crane --cache_path` leaves it
        (d / f"sha256:{(await layer.digest()).hex}").write_bytes(await blob_of(layer))
        (d / f"sha256:{(await layer.diff_id()).hex}").write_bytes(await tar_of(layer))
    before = entries(d)
    assert len(before) == 6
    src.opens.clear()
    await validate.image(cache.image(src.image(), FilesystemCache(d)))
    assert src.layer_opens == 0  # every compressed and uncompressed read was a hit
    assert entries(d) == before
    assert {n for n in os.listdir(d) if not _ENTRY.fullmatch(n)} == {".aiolayercache"}


async def test_our_cache_dir_is_laid_out_like_cranes(tmp_path: Path) -> None:
    src = Source(random.image(100 * KIB, 2, seed=32))
    ours = tmp_path / "ours"
    await validate.image(cache.image(src.image(), FilesystemCache(ours)))
    names = set(os.listdir(ours))
    assert ".aiolayercache" in names
    names.discard(".aiolayercache")
    img = src.image()
    want = {f"sha256:{(await x.digest()).hex}" for x in await img.layers()}
    want |= {f"sha256:{(await x.diff_id()).hex}" for x in await img.layers()}
    want.add(f"sha256:{(await img.config_name()).hex}")
    assert names == want
    for n in names:
        assert _ENTRY.fullmatch(n)
        assert sha256_file(ours / n) == n


async def test_our_entries_serve_hits_without_our_state(tmp_path: Path) -> None:
    src = Source(random.image(100 * KIB, 2, seed=33))
    ours = tmp_path / "ours"
    await validate.image(cache.image(src.image(), FilesystemCache(ours)))
    bare = tmp_path / "bare"  # the entries alone, as crane (or a copy) leaves them
    bare.mkdir()
    for n in os.listdir(ours):
        if _ENTRY.fullmatch(n):
            shutil.copy(ours / n, bare / n)
    src.opens.clear()
    await validate.image(cache.image(src.image(), FilesystemCache(bare)))
    assert src.layer_opens == 0


# --- layout writes -------------------------------------------------------------------------


def blob_files(root: Path) -> dict[str, tuple[int, int]]:
    d = root / "blobs" / "sha256"
    return {
        n: (d.joinpath(n).stat().st_ino, d.joinpath(n).stat().st_mtime_ns) for n in os.listdir(d)
    }


async def test_writing_the_same_image_twice_writes_blobs_once(tmp_path: Path) -> None:
    img = random.image(100 * KIB, 3, media_type=OCI, seed=41)
    lay = tmp_path / "lay"
    await layout.write(lay, img, ref_name="v1")
    first = blob_files(lay)
    assert len(first) == 5  # 3 layers, config, manifest
    for n in first:
        assert sha256_file(lay / "blobs" / "sha256" / n) == f"sha256:{n}"
    await layout.write(lay, img, ref_name="v1")
    assert blob_files(lay) == first  # the same files: not rewritten
    assert ref_names(lay) == {"v1": str(await img.digest())}
    assert len(index_json(lay)["manifests"]) == 1
    await validate.image(await layout.image(lay, "v1"))


@pytest.mark.parametrize("damage", ["flipped", "truncated", "symlink-out"])
async def test_a_bad_existing_blob_is_replaced(tmp_path: Path, damage: str) -> None:
    img = random.image(100 * KIB, 2, media_type=OCI, seed=42)
    lay = tmp_path / "lay"
    layer = (await img.layers())[0]
    good = await blob_of(layer)
    p = lay / "blobs" / "sha256" / (await layer.digest()).hex
    p.parent.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_bytes(b"\0" * len(good))
    if damage == "flipped":
        p.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    elif damage == "truncated":
        p.write_bytes(good[: len(good) // 2])
    else:
        p.symlink_to(outside)
    before = snapshot(tmp_path, exclude=lay)
    await layout.write(lay, img, ref_name="v1")
    assert not p.is_symlink()
    assert p.read_bytes() == good
    assert snapshot(tmp_path, exclude=lay) == before  # the outside file was not touched
    await validate.image(await layout.image(lay, "v1"))


async def test_a_second_ref_name_is_added_and_the_same_one_replaced(tmp_path: Path) -> None:
    a = random.image(60 * KIB, 1, media_type=OCI, seed=43)
    b = random.image(60 * KIB, 1, media_type=OCI, seed=44)
    c = random.image(60 * KIB, 1, media_type=OCI, seed=45)
    lay = tmp_path / "lay"
    await layout.write(lay, a, ref_name="a")
    await layout.write(lay, b, ref_name="b")
    assert ref_names(lay) == {"a": str(await a.digest()), "b": str(await b.digest())}
    assert await (await layout.image(lay, "a")).digest() == await a.digest()
    assert await (await layout.image(lay, "b")).digest() == await b.digest()
    await layout.write(lay, c, ref_name="a")  # replaces a's entry; a's blobs stay
    assert ref_names(lay) == {"a": str(await c.digest()), "b": str(await b.digest())}
    assert len(index_json(lay)["manifests"]) == 2
    assert await (await layout.image(lay, "a")).digest() == await c.digest()
    await validate.index(await layout.index(lay))
    assert (lay / "blobs" / "sha256" / (await a.digest()).hex).exists()


@pytest.mark.parametrize("existing", [False, True])
async def test_an_interrupted_write_leaves_index_json_alone(tmp_path: Path, existing: bool) -> None:
    lay = tmp_path / "lay"
    keep = random.image(50 * KIB, 1, media_type=OCI, seed=46)
    if existing:
        await layout.write(lay, keep, ref_name="keep")
    before_index = (lay / "index.json").read_bytes() if existing else None
    before = snapshot(tmp_path, exclude=lay)
    img = random.image(200 * KIB, 3, media_type=OCI, seed=47)
    with pytest.raises((ConnectionResetError, BaseExceptionGroup)) as ei:
        await layout.write(lay, await failing(img), ref_name="v2")
    assert any(isinstance(e, ConnectionResetError) for e in leaves(ei.value))
    if existing:
        assert (lay / "index.json").read_bytes() == before_index
        await validate.image(await layout.image(lay, "keep"))
        with pytest.raises(LayoutError, match="v2"):
            await layout.image(lay, "v2")
    else:
        assert not (lay / "index.json").exists()
        with pytest.raises(LayoutError, match=re.escape("index.json")):
            await layout.index(lay)
    assert temp_files(lay) == []
    assert snapshot(tmp_path, exclude=lay) == before
    failed = (await img.layers())[1]
    assert not (lay / "blobs" / "sha256" / (await failed.digest()).hex).exists()
    # And a clean retry completes the layout.
    await layout.write(lay, img, ref_name="v2")
    await validate.image(await layout.image(lay, "v2"))


@pytest.mark.parametrize("bound", [1, 3])
async def test_blob_writes_respect_the_concurrency_bound(tmp_path: Path, bound: int) -> None:
    img = random.image(50 * KIB, 6, media_type=OCI, seed=48)
    active, peak = 0, 0
    full = anyio.Event()  # set once ``bound`` layer streams are open together

    class Counted(SlowStream):
        async def _next(self) -> bytes | None:
            with anyio.move_on_after(1):  # hold the first streams open until the bound is reached
                await full.wait()
            return await super()._next()

        async def _aclose(self) -> None:
            nonlocal active
            active -= 1
            await super()._aclose()

    class CountedLayer:
        def __init__(self, inner: Layer, data: bytes) -> None:
            self._inner, self._data = inner, data

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        async def compressed(self) -> ByteReceiveStream:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            if active >= bound:
                full.set()
            return Counted(self._data, chunk=8 * KIB)

    class CountedImage:
        def __getattr__(self, name: str) -> Any:
            return getattr(img, name)

        async def layers(self) -> list[CountedLayer]:
            return [CountedLayer(x, await blob_of(x)) for x in await img.layers()]

    with anyio.fail_after(10):
        await layout.write(tmp_path / "lay", CountedImage(), concurrency=bound)
    assert peak == bound  # in parallel, and never past the bound
    assert active == 0
    await validate.image(await layout.image(tmp_path / "lay"))


@pytest.mark.parametrize("planted", ["blobs", "blobs/sha256", ".oci-layout.tmp"])
async def test_write_follows_no_planted_symlink_out(tmp_path: Path, planted: str) -> None:
    lay = tmp_path / "lay"
    lay.mkdir()
    outside = tmp_path / "outside"
    if planted == ".oci-layout.tmp":
        outside.write_bytes(b"precious")
    else:
        outside.mkdir()
    (lay / planted).parent.mkdir(parents=True, exist_ok=True)
    (lay / planted).symlink_to(outside)
    before = snapshot(tmp_path, exclude=lay)
    img = random.image(50 * KIB, 1, media_type=OCI, seed=49)
    try:
        await layout.write(lay, img, ref_name="v1")
    except LayoutError as exc:
        assert planted in str(exc)
    else:
        await validate.image(await layout.image(lay, "v1"))
    assert snapshot(tmp_path, exclude=lay) == before


# --- tarball -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gzip", "zstd", "tar"])
async def test_layer_from_file(tmp_path: Path, kind: str) -> None:
    tar = await tar_of(random.layer(150 * KIB, seed=51))
    data = {
        "gzip": lambda: gzip.compress(tar, 1),
        "zstd": lambda: zstandard.ZstdCompressor(level=1).compress(tar),
        "tar": lambda: tar,
    }[kind]()
    f = tmp_path / f"layer.{kind}"
    f.write_bytes(data)
    layer = tarball.layer_from_file(f)
    assert await layer.diff_id() == Hash.of(tar)
    assert await read_all(await layer.uncompressed()) == tar
    blob = await blob_of(layer)
    assert Hash.of(blob) == await layer.digest()
    assert len(blob) == await layer.size()
    if kind == "tar":
        assert blob[:2] == b"\x1f\x8b"  # gzip'd on the fly
        assert gzip.decompress(blob) == tar
        assert await layer.media_type() == MediaType.DOCKER_LAYER
    else:
        assert blob == data
        assert await layer.digest() == Hash.of(data)
        assert await layer.size() == len(data)
        want = MediaType.OCI_LAYER_ZSTD if kind == "zstd" else MediaType.DOCKER_LAYER
        assert await layer.media_type() == want
    # digest, size and diff_id are stable across calls and a fresh object
    again = tarball.layer_from_file(f)
    assert (await again.digest(), await again.size()) == (await layer.digest(), await layer.size())
    await validate.image(await image_of([layer]))


async def test_several_images_in_one_archive_share_layers(tmp_path: Path) -> None:
    shared = random.layer(100 * KIB, seed=52)
    own1, own2 = random.layer(60 * KIB, seed=53), random.layer(60 * KIB, seed=54)
    img1 = await image_of([shared, own1], "one")
    img2 = await image_of([own2, shared], "two")
    archive = tmp_path / "a.tar"
    await tarball.write(archive, {"x.test/a:v1": img1, "x.test/b:v1": img2, "x.test/c:v1": img1})
    with tarfile.open(archive) as tf:
        names = tf.getnames()
        manifest = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert len(names) == len(set(names))
    layer_names = [n for n in names if n.endswith(".tar.gz")]
    digests = {(await x.digest()).hex for x in (shared, own1, own2)}
    assert sorted(n.removesuffix(".tar.gz") for n in layer_names) == sorted(digests)
    assert len([n for n in names if n.endswith(".json") and n != "manifest.json"]) == 2
    assert [e["RepoTags"] for e in manifest] == [["x.test/a:v1", "x.test/c:v1"], ["x.test/b:v1"]]
    back = await tarball.images(archive)
    assert len(back) == 2
    for got, want in zip(back, (img1, img2), strict=True):
        await validate.image(got)
        assert await got.config_name() == await want.config_name()
        got_layers = [d.digest for d in (await got.manifest()).layers]
        assert got_layers == [d.digest for d in (await want.manifest()).layers]
    c = await tarball.image(archive, "x.test/c:v1")
    assert await c.config_name() == await img1.config_name()


@pytest.mark.parametrize("existing", [False, True])
async def test_an_interrupted_tarball_write_leaves_nothing(tmp_path: Path, existing: bool) -> None:
    archive = tmp_path / "a.tar"
    if existing:
        await tarball.write(archive, random.image(20 * KIB, 1, seed=55))
    before = snapshot(tmp_path)
    img = random.image(200 * KIB, 3, seed=56)
    with pytest.raises((ConnectionResetError, BaseExceptionGroup)) as ei:
        await tarball.write(archive, {"x.test/a:v1": await failing(img)})
    assert any(isinstance(e, ConnectionResetError) for e in leaves(ei.value))
    assert snapshot(tmp_path) == before  # no temp file, the old archive (if any) intact
    assert temp_files(tmp_path) == []


# --- bad layouts ---------------------------------------------------------------------------


@pytest.fixture
async def bad_layout(tmp_path: Path) -> tuple[Path, Image]:
    img = random.image(60 * KIB, 2, media_type=OCI, seed=61)
    lay = tmp_path / "lay"
    await layout.write(lay, img, ref_name="v1")
    return lay, img


def blob_path(lay: Path, h: Hash) -> Path:
    return lay / "blobs" / "sha256" / h.hex


async def test_a_missing_blob(
    tmp_path: Path, bad_layout: tuple[Path, Image], opened: Opens
) -> None:
    lay, img = bad_layout
    layer_digest = (await img.manifest()).layers[0].digest
    blob_path(lay, layer_digest).unlink()
    before = snapshot(tmp_path)
    with opened:
        got = await layout.image(lay, "v1")
        with pytest.raises(LayoutError) as ei:
            await (await got.layers())[0].compressed()
        with pytest.raises(ValidationError, match=layer_digest.hex):
            await validate.image(got)
    assert str(blob_path(lay, layer_digest)) in str(ei.value)
    assert "missing" in str(ei.value)
    assert snapshot(tmp_path) == before
    assert_read_only_inside(opened, lay, tmp_path)
    manifest = blob_path(lay, await img.digest())
    manifest.unlink()
    with pytest.raises(LayoutError) as ei:
        await layout.image(lay, "v1")
    assert str(manifest) in str(ei.value)


@pytest.mark.parametrize("which", ["layer", "config", "manifest"])
async def test_a_blob_whose_bytes_do_not_match_its_name(
    tmp_path: Path, bad_layout: tuple[Path, Image], which: str, opened: Opens
) -> None:
    lay, img = bad_layout
    m = await img.manifest()
    h = {"layer": m.layers[1].digest, "config": m.config.digest, "manifest": await img.digest()}
    p = blob_path(lay, h[which])
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit off
    p.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    with opened, pytest.raises(DigestMismatchError) as ei:
        got = await layout.image(lay, "v1")
        if which == "config":
            await got.raw_config_file()
        else:
            await read_all(await (await got.layers())[1].compressed())
    assert str(h[which]) in str(ei.value)
    assert str(p) in str(ei.value)
    if which != "manifest":
        with opened, pytest.raises(ValidationError, match=h[which].hex):
            await validate.image(await layout.image(lay, "v1"))
    assert snapshot(tmp_path) == before
    assert_read_only_inside(opened, lay, tmp_path)


@pytest.mark.parametrize("content", ["not json", "huge", "crafted digest", "not an index"])
async def test_a_bad_index_json(
    tmp_path: Path, bad_layout: tuple[Path, Image], content: str, opened: Opens
) -> None:
    lay, img = bad_layout
    doc = index_json(lay)
    if content == "not json":
        raw = b'{"schemaVersion": 2, "manifests": ['
    elif content == "huge":
        raw = json.dumps(doc).encode() + b" " * (4 * 1024 * 1024 + 1)  # valid JSON, too big
    elif content == "crafted digest":
        doc["manifests"][0]["digest"] = "sha256:../../outside"
        raw = json.dumps(doc).encode()
    else:
        raw = b"[1, 2, 3]"
    (lay / "index.json").write_bytes(raw)
    (tmp_path / "outside").write_bytes(await img.raw_manifest())
    before = snapshot(tmp_path)
    for read in (lambda: layout.index(lay), lambda: layout.image(lay, "v1")):
        with opened, pytest.raises(ManifestError) as ei:
            await read()
        assert str(lay / "index.json") in str(ei.value)
    with opened, pytest.raises(ManifestError):
        await layout.write(lay, img, ref_name="v2")  # nor is it written over
    assert snapshot(tmp_path) == before
    assert (lay / "index.json").read_bytes() == raw
    assert_read_only_inside(opened, lay, tmp_path)


@pytest.mark.parametrize("where", ["layer", "manifest", "index.json", "blobs/sha256"])
async def test_a_symlink_out_of_the_layout_is_never_followed(
    tmp_path: Path, bad_layout: tuple[Path, Image], where: str, opened: Opens
) -> None:
    lay, img = bad_layout
    m = await img.manifest()
    outside = tmp_path / "outside"
    if where == "blobs/sha256":
        link = lay / "blobs" / "sha256"  # the whole blob directory moved out, intact
    else:
        link = {
            "layer": blob_path(lay, m.layers[0].digest),
            "manifest": blob_path(lay, await img.digest()),
            "index.json": lay / "index.json",
        }[where]
    shutil.move(link, outside)  # the right bytes, so following the link would "work"
    link.symlink_to(outside)
    before = snapshot(tmp_path)
    with opened, pytest.raises(LayoutError) as ei:
        got = await layout.image(lay, "v1")
        await read_all(await (await got.layers())[0].compressed())
    assert str(link) in str(ei.value)
    assert "outside the layout" in str(ei.value)
    if where == "layer":
        with opened, pytest.raises(ValidationError, match="outside the layout"):
            await validate.image(await layout.image(lay, "v1"))
    assert snapshot(tmp_path) == before
    # Links resolved, nothing opened lies outside (for index.json, nothing is opened at all).
    assert_read_only_inside(opened, lay, tmp_path, some=where != "index.json")


async def test_a_good_layout_reads_only_its_own_files(
    tmp_path: Path, bad_layout: tuple[Path, Image], opened: Opens
) -> None:
    lay, img = bad_layout
    (tmp_path / "neighbour").write_bytes(b"x")
    with opened:
        got = await layout.image(lay, "v1")
        await validate.image(got)
    assert await got.digest() == await img.digest()
    assert_read_only_inside(opened, lay, tmp_path)
    assert str(lay / "index.json") in opened.paths
    assert str(blob_path(lay, (await img.manifest()).layers[1].digest)) in opened.paths


# --- bad tarballs --------------------------------------------------------------------------


def build_archive(
    path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)


async def save_parts() -> tuple[bytes, bytes]:
    """A config and its one gzip layer, as a docker save archive holds them."""
    layer = random.layer(50 * KIB, seed=71)
    config = {"rootfs": {"type": "layers", "diff_ids": [str(await layer.diff_id())]}}
    return json.dumps(config).encode(), await blob_of(layer)


async def test_a_good_handmade_archive_reads(tmp_path: Path) -> None:
    config, layer = await save_parts()
    archive = tmp_path / "a.tar"
    entry = {"Config": "./c.json", "RepoTags": ["x.test/a:v1"], "Layers": ["l/layer.tar.gz"]}
    build_archive(
        archive,
        {"c.json": config, "l/layer.tar.gz": layer, "manifest.json": json.dumps([entry]).encode()},
    )
    img = await tarball.image(archive, "x.test/a:v1")
    await validate.image(img)
    assert await read_all(await (await img.layers())[0].compressed()) == layer


async def test_a_symlink_member_to_another_member_is_followed(tmp_path: Path) -> None:
    config, layer = await save_parts()
    archive = tmp_path / "a.tar"
    entry = {"Config": "c.json", "Layers": ["sub/layer.tar"]}  # as skopeo's archives link them
    build_archive(
        archive,
        {"c.json": config, "blob.tar.gz": layer, "manifest.json": json.dumps([entry]).encode()},
        {"sub/layer.tar": "../blob.tar.gz"},
    )
    img = await tarball.image(archive)
    await validate.image(img)


async def test_member_names_are_matched_exactly(tmp_path: Path) -> None:
    # "x.tar.gz", ".x.tar.gz" and "..x.tar.gz" are three members; none stands in for another.
    config: dict[str, Any] = {"rootfs": {"type": "layers", "diff_ids": []}}
    files: dict[str, bytes] = {}
    for i, name in enumerate(["x.tar.gz", ".x.tar.gz", "..x.tar.gz"]):
        layer = random.layer(20 * KIB, seed=72 + i)
        files[name] = await blob_of(layer)
        config["rootfs"]["diff_ids"].append(str(await layer.diff_id()))
    entry = {"Config": ".c.json", "Layers": list(files)}
    files[".c.json"] = json.dumps(config).encode()
    files["manifest.json"] = json.dumps([entry]).encode()
    archive = tmp_path / "a.tar"
    build_archive(archive, files)
    img = await tarball.image(archive)
    await validate.image(img)
    got = [await read_all(await x.compressed()) for x in await img.layers()]
    assert got == [files["x.tar.gz"], files[".x.tar.gz"], files["..x.tar.gz"]]


BAD_NAMES = {
    "dotdot": ({"Layers": ["../outside.tar.gz"]}, "../outside.tar.gz"),
    "nested dotdot": ({"Layers": ["l/../../outside.tar.gz"]}, "l/../../outside.tar.gz"),
    "absolute": ({"Layers": ["{outside}"]}, "{outside}"),
    "missing": ({"Layers": ["nothere.tar.gz"]}, "nothere.tar.gz"),
    "symlink out": ({"Layers": ["link.tar.gz"]}, "link.tar.gz"),
    "absolute symlink": ({"Layers": ["abslink.tar.gz"]}, "abslink.tar.gz"),
    "config dotdot": ({"Config": "../outside.json"}, "../outside.json"),
    "config missing": ({"Config": "nothere.json"}, "nothere.json"),
}


@pytest.mark.parametrize("case", list(BAD_NAMES))
async def test_manifest_json_names_a_bad_member(tmp_path: Path, case: str, opened: Opens) -> None:
    config, layer = await save_parts()
    outside = tmp_path / "outside.tar.gz"
    outside.write_bytes(layer)  # what a read outside the archive would find: the right bytes
    (tmp_path / "outside.json").write_bytes(config)
    override, name = BAD_NAMES[case]
    entry: dict[str, Any] = {"Config": "c.json", "RepoTags": [], "Layers": ["layer.tar.gz"]}
    entry.update(json.loads(json.dumps(override).replace("{outside}", str(outside))))
    name = name.replace("{outside}", str(outside))
    archive = tmp_path / "in" / "a.tar"
    build_archive(
        archive,
        {"c.json": config, "layer.tar.gz": layer, "manifest.json": json.dumps([entry]).encode()},
        {"link.tar.gz": "../outside.tar.gz", "abslink.tar.gz": str(outside)},
    )
    before = snapshot(tmp_path)
    with opened, pytest.raises(TarballError) as ei:
        await tarball.image(archive)
    assert str(archive) in str(ei.value)
    assert name in str(ei.value)
    assert snapshot(tmp_path) == before
    assert_read_only_inside(opened, archive, tmp_path)


@pytest.mark.parametrize("content", ["random", "gzip", "empty", "text"])
async def test_not_a_tar(tmp_path: Path, content: str, opened: Opens) -> None:
    data = {
        "random": os.urandom(10 * KIB),
        "gzip": gzip.compress(os.urandom(10 * KIB)),
        "empty": b"",
        "text": b"hello\n" * 200,
    }[content]
    archive = tmp_path / "a.tar"
    archive.write_bytes(data)
    before = snapshot(tmp_path)
    with opened, pytest.raises(TarballError, match=re.escape(str(archive))):
        await tarball.image(archive)
    assert snapshot(tmp_path) == before
    assert_read_only_inside(opened, archive, tmp_path)


@pytest.mark.parametrize("content", ["not json", "not a list", "bad entry", "absent"])
async def test_a_bad_manifest_json(tmp_path: Path, content: str, opened: Opens) -> None:
    config, layer = await save_parts()
    files = {"c.json": config, "layer.tar.gz": layer}
    raw = {
        "not json": b'[{"Config": "c.json", "Layers": [',
        "not a list": b'{"Config": "c.json", "Layers": ["layer.tar.gz"]}',
        "bad entry": b'[{"Config": "c.json", "Layers": "layer.tar.gz"}]',
        "absent": None,
    }[content]
    if raw is not None:
        files["manifest.json"] = raw
    archive = tmp_path / "a.tar"
    build_archive(archive, files)
    before = snapshot(tmp_path)
    with opened, pytest.raises((ManifestError, TarballError)) as ei:
        await tarball.image(archive)
    assert str(archive) in str(ei.value)
    assert "manifest.json" in str(ei.value)
    want = TarballError if content == "absent" else ManifestError
    assert isinstance(ei.value, want)
    assert snapshot(tmp_path) == before
    assert_read_only_inside(opened, archive, tmp_path)
