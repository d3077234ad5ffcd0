"""Issue 10, defect 6: hostile docker archives.

Archives are real files built here; the work is counted as the bytes this
process reads (``/proc/self/io``), not timed.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random as _random
import tarfile
from pathlib import Path
from typing import Any

import pytest

from aiolayercache import (
    Hash,
    ManifestError,
    tarball,
    validate,
)
from aiolayercache.tarball import TarballError

pytestmark = pytest.mark.anyio

KIB = 1024


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
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(doc).encode()


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
