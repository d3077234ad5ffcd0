"""Issue 10, defects 6, 8 and 9: hostile archives, deep index trees, layouts skopeo reads.

Archives and layouts are real files built here. Work is counted, not timed:
as the bytes this process reads (``/proc/self/io``), or as the manifest
fetches and blob opens of a counting source (:class:`Store`). Layouts are
checked with the real skopeo, and the README's pull runs against the real
registry.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random as _random
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ByteReceiveStream

from aiolayercache import (
    Descriptor,
    Hash,
    ImageIndex,
    ManifestError,
    MediaType,
    ValidationError,
    cache,
    layout,
    mutate,
    partial,
    random,
    tarball,
    validate,
)
from aiolayercache._types import MAX_INDEX_DEPTH
from aiolayercache.streams import BytesStream, read_all
from aiolayercache.tarball import TarballError

pytestmark = pytest.mark.anyio

KIB = 1024
OCI_INDEX = MediaType.OCI_IMAGE_INDEX


# --- 6: a docker archive whose manifest.json repeats one layer ------------------------


def _layer_tar(size: int, seed: int) -> bytes:
    data = _random.Random(seed).randbytes(size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(f"file-{seed}")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _config(diff_ids: list[str]) -> bytes:
    rootfs = {"type": "layers", "diff_ids": diff_ids}
    return json.dumps({"architecture": "amd64", "os": "linux", "rootfs": rootfs}).encode()


def _archive(path: Path, members: dict[str, bytes], entries: list[dict[str, Any]]) -> Path:
    """A ``docker save`` archive: ``members`` then ``manifest.json`` listing ``entries``."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in [*members.items(), ("manifest.json", json.dumps(entries).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _repeated_layer_archive(path: Path, repeats: int, *, diff_ids: int | None = None) -> Path:
    tar = _layer_tar(256 * KIB, seed=6)
    diff_id = str(Hash.of(tar))
    config = _config([diff_id] * (repeats if diff_ids is None else diff_ids))
    entry = {"Config": "config.json", "RepoTags": ["x/y:v1"], "Layers": ["l.tar.gz"] * repeats}
    members = {"config.json": config, "l.tar.gz": gzip.compress(tar, 1, mtime=0)}
    return _archive(path, members, [entry])


def _bytes_read() -> int:
    """Bytes this process has read with read(2) and friends so far (Linux)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


async def test_6_a_layer_listed_a_thousand_times_is_read_once(tmp_path: Path) -> None:
    if not os.path.exists("/proc/self/io"):
        pytest.skip("needs /proc/self/io to count the bytes read")
    path = _repeated_layer_archive(tmp_path / "rep.tar", tarball.MAX_IMAGE_LAYERS)
    layer_bytes = (tmp_path / "rep.tar").stat().st_size
    before = _bytes_read()
    (img,) = await tarball.images(path)
    read = _bytes_read() - before
    # Hashing each listing again would read 1,000 x 256 KiB = 250 MiB of the archive.
    assert read < 4 * layer_bytes, f"read {read} bytes of a {layer_bytes}-byte archive"
    layers = (await img.manifest()).layers
    assert len(layers) == tarball.MAX_IMAGE_LAYERS
    assert len({d.digest for d in layers}) == 1


async def test_6_a_repeated_layer_still_reads_and_validates(tmp_path: Path) -> None:
    (img,) = await tarball.images(_repeated_layer_archive(tmp_path / "rep.tar", 3))
    await validate.image(img)
    assert [await x.digest() for x in await img.layers()] == [
        d.digest for d in (await img.manifest()).layers
    ]


async def test_6_more_layers_than_the_cap_is_a_typed_error(tmp_path: Path) -> None:
    path = _repeated_layer_archive(tmp_path / "many.tar", tarball.MAX_IMAGE_LAYERS + 1)
    with pytest.raises(TarballError, match=r"many\.tar.*1001 layers.*1000") as ei:
        await tarball.images(path)
    assert "manifest.json" in str(ei.value)


async def test_6_more_images_than_the_cap_is_a_typed_error(tmp_path: Path) -> None:
    entry = {"Config": "config.json", "RepoTags": [], "Layers": []}
    n = tarball.MAX_ARCHIVE_IMAGES + 1
    path = _archive(tmp_path / "imgs.tar", {"config.json": _config([])}, [entry] * n)
    with pytest.raises(TarballError, match=rf"imgs\.tar.*{n} images.*{n - 1}"):
        await tarball.images(path)


@pytest.mark.parametrize(("layers", "diff_ids"), [(2, 1), (1, 2), (1, 0)])
async def test_6_diff_ids_that_do_not_match_the_layers_are_an_error(
    tmp_path: Path, layers: int, diff_ids: int
) -> None:
    path = _repeated_layer_archive(tmp_path / "odd.tar", layers, diff_ids=diff_ids)
    with pytest.raises(ManifestError, match=rf"odd\.tar.*config\.json.*{diff_ids} diff_ids"):
        await tarball.images(path)


# --- 8: deep and repetitive index trees --------------------------------------------------


class Store:
    """Blobs by digest, as a layout keeps them; counts every manifest fetch and blob open."""

    def __init__(self) -> None:
        self.blobs: dict[Hash, bytes] = {}
        self.fetches: Counter[Hash] = Counter()
        self.opens: Counter[Hash] = Counter()

    def add(self, data: bytes, media_type: str) -> Descriptor:
        h = Hash.of(data)
        self.blobs[h] = data
        return Descriptor(media_type=media_type, size=len(data), digest=h)

    async def add_image(self, img: Any) -> Descriptor:
        m = await img.manifest()
        self.add(await img.raw_config_file(), m.config.media_type)
        for layer in await img.layers():
            self.add(await read_all(await layer.compressed()), await layer.media_type())
        return self.add(await img.raw_manifest(), await img.media_type())

    def add_index(self, children: list[Descriptor], name: str = "") -> Descriptor:
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": str(OCI_INDEX),
            "manifests": [json.loads(d.to_json()) for d in children],
        }
        if name:
            doc["annotations"] = {"name": name}
        return self.add(json.dumps(doc).encode(), OCI_INDEX)

    async def fetch_manifest(self, desc: Descriptor) -> bytes:
        self.fetches[desc.digest] += 1
        return self.blobs[desc.digest]

    async def open_blob(self, desc: Descriptor) -> ByteReceiveStream:
        self.opens[desc.digest] += 1
        return BytesStream(self.blobs[desc.digest])

    def index(self, top: Descriptor) -> ImageIndex:
        return partial.index(self.blobs[top.digest], self.fetch_manifest, self.open_blob)

    def write_layout(self, root: Path, top: Descriptor) -> Path:
        (root / "blobs" / "sha256").mkdir(parents=True)
        for h, data in self.blobs.items():
            (root / "blobs" / h.algorithm / h.hex).write_bytes(data)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        named = json.loads(top.to_json()) | {"annotations": {layout.REF_NAME: "deep"}}
        index = {"schemaVersion": 2, "mediaType": str(OCI_INDEX), "manifests": [named]}
        (root / "index.json").write_text(json.dumps(index))
        return root


async def _nested(store: Store, levels: int) -> Descriptor:
    """``levels`` indexes, each the only child of the one above; an image at the bottom."""
    desc = await store.add_image(
        random.image(4 * KIB, 2, media_type=MediaType.OCI_MANIFEST_SCHEMA1)
    )
    for _ in range(levels):
        desc = store.add_index([desc])
    return desc


async def _deep_layout(tmp_path: Path, levels: int) -> Path:
    """A layout whose ``index.json`` names the top of ``levels`` nested indexes "deep"."""
    store = Store()
    return store.write_layout(tmp_path / f"deep{levels}", await _nested(store, levels))


async def _top(root: Path) -> ImageIndex:
    """The index ``index.json`` names "deep" (one level below ``index.json``)."""
    ii = await layout.index(root)
    (d,) = (await ii.index_manifest()).manifests
    return await ii.image_index(d.digest)


async def _walk_all(ii: ImageIndex) -> None:
    """Follow a chain of single children down by hand, as a reader would."""
    while True:
        (d,) = (await ii.index_manifest()).manifests
        if d.media_type != OCI_INDEX:
            await ii.image(d.digest)
            return
        ii = await ii.image_index(d.digest)


async def test_8_at_the_cap_every_walker_works(tmp_path: Path) -> None:
    # index.json, then MAX_INDEX_DEPTH nested indexes below it, then the image.
    root = await _deep_layout(tmp_path, MAX_INDEX_DEPTH)
    ii = await layout.index(root)
    await _walk_all(ii)
    await validate.index(ii)
    stats = await cache.prefetch(await layout.index(root), cache.MemoryCache())
    assert stats.layers == 2
    # The top of the chain written as an entry of another layout: as deep there.
    await layout.write(tmp_path / "copy", await _top(root), ref_name="c")
    await validate.index(await layout.index(tmp_path / "copy"))
    oci = await layout.write(tmp_path / "oci", await mutate.to_oci(await _top(root)), ref_name="o")
    assert oci.media_type == OCI_INDEX
    await validate.index(await layout.index(tmp_path / "oci"))


@pytest.mark.parametrize("levels", [MAX_INDEX_DEPTH + 1, 1500])
async def test_8_past_the_cap_every_walker_raises_a_typed_error(
    tmp_path: Path, levels: int
) -> None:
    root = await _deep_layout(tmp_path, levels)
    deep = rf"nested {MAX_INDEX_DEPTH + 1} levels deep.*cap of {MAX_INDEX_DEPTH}"
    with pytest.raises(ManifestError, match=deep):
        await _walk_all(await layout.index(root))
    with pytest.raises(ValidationError, match=deep):
        await validate.index(await layout.index(root))
    with pytest.raises(ExceptionGroup) as eg:
        await cache.prefetch(await layout.index(root), cache.MemoryCache())
    assert eg.group_contains(ManifestError, match=deep)
    with pytest.raises(ManifestError, match=deep):
        await layout.write(tmp_path / "copy", await layout.index(root), ref_name="c")
    assert not (tmp_path / "copy" / "index.json").exists()
    with pytest.raises(ManifestError, match=deep):
        await layout.write(tmp_path / "oci", await mutate.to_oci(await layout.index(root)))
    assert not (tmp_path / "oci" / "index.json").exists()


async def _walkers(store: Store, top: Descriptor, tmp_path: Path) -> dict[str, Counter[Hash]]:
    """Fetch counts per manifest for each walker over the index ``top`` of ``store``."""
    out: dict[str, Counter[Hash]] = {}

    async def count(name: str, work: Any) -> None:
        store.fetches.clear()
        store.opens.clear()
        await work
        out[name] = store.fetches + store.opens

    await count("validate", validate.index(store.index(top)))
    await count("prefetch", cache.prefetch(store.index(top), cache.MemoryCache()))
    await count("write", layout.write(tmp_path / "w", store.index(top), durability="fast"))
    oci = await mutate.to_oci(store.index(top))
    await count("to_oci + write", layout.write(tmp_path / "o", oci, durability="fast"))
    return out


async def test_8_a_child_listed_20000_times_is_walked_once(tmp_path: Path) -> None:
    store = Store()
    child = await store.add_image(random.image(KIB, 1, media_type=MediaType.OCI_MANIFEST_SCHEMA1))
    top = store.add_index([child] * 20_000)
    assert len(store.blobs[top.digest]) < 4 * 1024 * 1024
    for name, counts in (await _walkers(store, top, tmp_path)).items():
        # A few reads of each blob (compressed, uncompressed), not one per listing.
        assert max(counts.values()) <= 4, (name, counts.most_common(2))


async def test_8_a_lattice_of_shared_children_is_walked_once_per_node(tmp_path: Path) -> None:
    # Two distinct indexes a level, each listing both of the level below: 2**12 paths
    # from the top to the image, 26 distinct manifests.
    store = Store()
    img = await store.add_image(random.image(KIB, 1, media_type=MediaType.OCI_MANIFEST_SCHEMA1))
    level = [img]
    for i in range(12):
        level = [store.add_index(level, f"a{i}"), store.add_index(level, f"b{i}")]
    top = store.add_index(level)
    for name, counts in (await _walkers(store, top, tmp_path)).items():
        assert max(counts.values()) <= 4, (name, counts.most_common(2))


# --- 9: layouts of Docker-typed images that skopeo reads --------------------------------


async def _skopeo(*args: str) -> tuple[int, str]:
    proc = await anyio.run_process(["skopeo", "--insecure-policy", *args], check=False)
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


@pytest.fixture
def skopeo() -> None:
    if shutil.which("skopeo") is None:
        if os.environ.get("CI"):
            pytest.fail("skopeo is missing in CI: .ci/run must install it")
        pytest.skip("skopeo is not installed (apt-get install skopeo)")


async def test_9_layout_write_oci_true_makes_a_layout_skopeo_reads(
    tmp_path: Path, skopeo: None
) -> None:
    img = random.image(64 * KIB, 2, seed=9)
    assert await img.media_type() == MediaType.DOCKER_MANIFEST_SCHEMA2
    d = tmp_path / "d"
    desc = await layout.write(d, img, ref_name="v1", oci=True)
    assert desc.media_type == MediaType.OCI_MANIFEST_SCHEMA1
    rc, out = await _skopeo("inspect", f"oci:{d}:v1")
    assert rc == 0, out
    got = json.loads(out)
    assert got["Digest"] == str(desc.digest)
    assert got["Layers"] == [str(x.digest) for x in (await img.manifest()).layers]
    back = await layout.image(d, "v1")
    await validate.image(back)
    assert json.loads(await back.raw_config_file()) == json.loads(await img.raw_config_file())


async def test_9_without_oci_the_docker_types_are_kept(tmp_path: Path) -> None:
    img = random.image(16 * KIB, 1, seed=10)
    desc = await layout.write(tmp_path / "d", img, ref_name="v1")
    assert desc.media_type == MediaType.DOCKER_MANIFEST_SCHEMA2
    assert desc.digest == await img.digest()
    index_json = json.loads((tmp_path / "d" / "index.json").read_text())
    assert index_json["manifests"][0]["mediaType"] == MediaType.DOCKER_MANIFEST_SCHEMA2


async def test_9_write_all_oci_true_converts_a_docker_manifest_list(tmp_path: Path) -> None:
    docker = random.index_of(
        [random.image(8 * KIB, 1, seed=11), random.image(8 * KIB, 1, seed=12)],
        media_type=MediaType.DOCKER_MANIFEST_LIST,
        platforms=["linux/amd64", "linux/arm64"],
    )
    img = random.image(8 * KIB, 1, seed=13)
    d = tmp_path / "d"
    descs = await layout.write_all(d, [(docker, "list"), (img, "one")], oci=True)
    assert [x.media_type for x in descs] == [OCI_INDEX, MediaType.OCI_MANIFEST_SCHEMA1]
    ii = await layout.index(d)
    await validate.index(ii)
    top = await ii.image_index(descs[0].digest)
    for child in (await top.index_manifest()).manifests:
        assert child.media_type == MediaType.OCI_MANIFEST_SCHEMA1
        m = await (await top.image(child.digest)).manifest()
        assert m.config.media_type == MediaType.OCI_CONFIG_JSON
        assert {x.media_type for x in m.layers} == {MediaType.OCI_LAYER}


async def test_9_the_readme_tour_pull_makes_a_layout_skopeo_reads(
    tmp_path: Path, skopeo: None, registry: Any, published: Any
) -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (example,) = [b for b in blocks if "async def pull(" in b]
    ns: dict[str, Any] = {}
    exec(example, ns)
    dest = tmp_path / "dest"
    fs = cache.FilesystemCache(tmp_path / "cache")
    await ns["pull"](f"{registry.host}/test/small:v1", str(dest), fs)
    assert await published.small.media_type() == MediaType.DOCKER_MANIFEST_SCHEMA2
    rc, out = await _skopeo("inspect", f"oci:{dest}:latest")
    assert rc == 0, out
    assert json.loads(out)["Layers"] == [
        str(x.digest) for x in (await published.small.manifest()).layers
    ]
