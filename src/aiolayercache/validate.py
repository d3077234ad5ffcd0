"""Read everything of an image or index and check every digest, size and diff_id.

The counterpart of go-containerregistry's ``validate``: findings are collected
and raised together as one :class:`ValidationError`.
"""

from __future__ import annotations

from ._errors import AioLayerCacheError, ValidationError
from ._hash import Hash
from ._protocols import Image, ImageIndex
from ._types import Manifest, is_index_type
from .partial import _nested_depth
from .streams import hash_stream

__all__ = ["image", "index"]


async def _check_image(img: Image, findings: list[str]) -> None:
    raw = await img.raw_manifest()
    digest = Hash.of(raw)
    if (d := await img.digest()) != digest:
        findings.append(f"digest() is {d}, raw manifest hashes to {digest}")
    if (n := await img.size()) != len(raw):
        findings.append(f"size() is {n}, raw manifest has {len(raw)} bytes")
    m = await img.manifest()
    if m != Manifest.parse(raw):
        findings.append("manifest() differs from the parsed raw manifest")
    rc = await img.raw_config_file()
    cd = Hash.of(rc)
    if cd != m.config.digest:
        findings.append(f"config hashes to {cd}, manifest says {m.config.digest}")
    if len(rc) != m.config.size:
        findings.append(f"config has {len(rc)} bytes, manifest says {m.config.size}")
    if (cn := await img.config_name()) != m.config.digest:
        findings.append(f"config_name() is {cn}, manifest says {m.config.digest}")
    diff_ids = (await img.config_file()).rootfs.diff_ids
    if len(diff_ids) != len(m.layers):
        findings.append(f"config has {len(diff_ids)} diff_ids for {len(m.layers)} layers")
    layers = await img.layers()
    if len(layers) != len(m.layers):
        findings.append(f"layers() has {len(layers)} layers, manifest {len(m.layers)}")
    for i, (desc, layer) in enumerate(zip(m.layers, layers, strict=False)):
        where = f"layer {i} ({desc.digest})"
        if (ld := await layer.digest()) != desc.digest:
            findings.append(f"{where}: digest() is {ld}")
        if (ls := await layer.size()) != desc.size:
            findings.append(f"{where}: size() is {ls}, manifest says {desc.size}")
        if (lm := await layer.media_type()) != desc.media_type:
            findings.append(f"{where}: media_type() is {lm}, manifest says {desc.media_type}")
        try:
            got, n = await hash_stream(await layer.compressed(), desc.digest.algorithm)
            if got != desc.digest or n != desc.size:
                findings.append(f"{where}: compressed bytes are {got} ({n} bytes)")
        except AioLayerCacheError as exc:
            findings.append(f"{where}: compressed: {exc}")
        if i < len(diff_ids):
            want = diff_ids[i]
            if (ldi := await layer.diff_id()) != want:
                findings.append(f"{where}: diff_id() is {ldi}, config says {want}")
            try:
                got, _ = await hash_stream(await layer.uncompressed(), want.algorithm)
                if got != want:
                    findings.append(f"{where}: uncompressed bytes hash to {got}, want {want}")
            except AioLayerCacheError as exc:
                findings.append(f"{where}: uncompressed: {exc}")
            by_diff = await img.layer_by_diff_id(want)
            if (bd := await by_diff.digest()) != desc.digest:
                findings.append(f"{where}: layer_by_diff_id gives {bd}")
        by_digest = await img.layer_by_digest(desc.digest)
        if (bd := await by_digest.digest()) != desc.digest:
            findings.append(f"{where}: layer_by_digest gives {bd}")


async def image(img: Image) -> None:
    """Raise :class:`ValidationError` unless every part of ``img`` checks out."""
    findings: list[str] = []
    try:
        await _check_image(img, findings)
    except AioLayerCacheError as exc:
        findings.append(str(exc))
    if findings:
        raise ValidationError(f"image {await _name(img)}", findings)


async def _name(x: Image | ImageIndex) -> str:
    try:
        return str(await x.digest())
    except AioLayerCacheError:
        return "?"


async def _check_index(
    ii: ImageIndex, findings: list[str], depth: int, seen: dict[Hash, int]
) -> None:
    raw = await ii.raw_manifest()
    digest = Hash.of(raw)
    if (d := await ii.digest()) != digest:
        findings.append(f"digest() is {d}, raw index hashes to {digest}")
    if (n := await ii.size()) != len(raw):
        findings.append(f"size() is {n}, raw index has {len(raw)} bytes")
    im = await ii.index_manifest()
    for desc in im.manifests:
        where = f"child {desc.digest}"
        # Content-addressed: a manifest listed again (here or anywhere in the tree) is
        # the same bytes, checked once; only its stated size can differ.
        if desc.digest in seen:
            if seen[desc.digest] != desc.size:
                findings.append(f"{where}: size {desc.size}, listed before as {seen[desc.digest]}")
            continue
        seen[desc.digest] = desc.size
        child: Image | ImageIndex
        try:
            if is_index_type(desc.media_type):
                child_depth = _nested_depth(depth, digest, desc.digest)
                child = await ii.image_index(desc.digest)
                await _index(child, child_depth, seen)
            else:
                child = await ii.image(desc.digest)
                await image(child)
        except ValidationError as exc:
            findings.extend(f"{where}: {f}" for f in exc.findings)
            continue
        if (cd := await child.digest()) != desc.digest:
            findings.append(f"{where}: digest() is {cd}")
        if (cs := await child.size()) != desc.size:
            findings.append(f"{where}: size() is {cs}, index says {desc.size}")


async def _index(ii: ImageIndex, depth: int, seen: dict[Hash, int]) -> None:
    findings: list[str] = []
    try:
        await _check_index(ii, findings, depth, seen)
    except AioLayerCacheError as exc:
        findings.append(str(exc))
    if findings:
        raise ValidationError(f"index {await _name(ii)}", findings)


async def index(ii: ImageIndex) -> None:
    """Raise :class:`ValidationError` unless ``ii`` and every child, recursively, check out.

    Each distinct child manifest is checked once however often the tree lists
    it; an index nested more than :data:`~aiolayercache._types.MAX_INDEX_DEPTH`
    levels below ``ii`` is a finding (and is not opened).
    """
    await _index(ii, 0, {})
