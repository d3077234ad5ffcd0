"""``docker save`` tarballs, read and write, and layers from single files.

Reading indexes the archive once and serves each member as a byte range of
the archive file, verified as it streams; member names from ``manifest.json``
that are absolute, contain ``..`` or are missing are refused with a typed
error naming them. Each member is hashed once however often it is listed, and
more than :data:`MAX_ARCHIVE_IMAGES` images or :data:`MAX_IMAGE_LAYERS` layers
an image are refused. Writing streams every blob into one temp file next to
the destination (no whole-image buffering) and renames it into place at the end.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

import aiofiles
import anyio
import anyio.to_thread
from anyio.abc import ByteReceiveStream

from . import partial
from ._errors import ManifestError
from ._hash import Hash
from ._once import Once
from ._protocols import Layer
from ._tarball_write import TarballError, write
from ._tarball_write import kind as _kind
from ._types import MAX_DOCUMENT_BYTES, ConfigFile, Descriptor, MediaType
from .streams import (
    CHUNK_SIZE,
    ChunkStream,
    VerifyingStream,
    hash_stream,
    read_all,
)

__all__ = [
    "MAX_ARCHIVE_IMAGES",
    "MAX_IMAGE_LAYERS",
    "TarballError",
    "TarballImage",
    "image",
    "images",
    "layer_from_file",
    "write",
]

# Caps on what one manifest.json may list (docs/DECISIONS.md): Docker chains at most 125
# layers (moby layer_store.go maxLayerDepth), and reading an archive costs work per listing.
MAX_ARCHIVE_IMAGES = 1000
MAX_IMAGE_LAYERS = 1000


class _RangeStream(ChunkStream):
    """``size`` bytes of ``path`` from ``offset`` (a member of an archive, or a whole file)."""

    def __init__(self, file: object, offset: int, size: int) -> None:
        super().__init__()
        self._file = file
        self._left = size
        self._offset = offset

    @classmethod
    async def open(cls, path: str, offset: int = 0, size: int | None = None) -> _RangeStream:
        f = await aiofiles.open(path, "rb", buffering=0)
        if size is None:
            size = os.fstat(f.fileno()).st_size - offset
        await f.seek(offset)
        return cls(f, offset, size)

    async def _next(self) -> bytes | None:
        if self._left <= 0:
            return None
        data: bytes = await self._file.read(min(CHUNK_SIZE, self._left))  # type: ignore[attr-defined]
        if not data:
            raise TarballError("archive ends inside a member")
        self._left -= len(data)
        return data

    async def _aclose(self) -> None:
        await self._file.close()  # type: ignore[attr-defined]


class _FileLayer:
    """A layer from a file holding a gzip, zstd or plain tar (detected by magic)."""

    def __init__(
        self, path: str, offset: int = 0, size: int | None = None, media_type: str | None = None
    ) -> None:
        self._path = path
        self._offset = offset
        self._size = size
        self._media_type = media_type
        self._inner: Once[Layer] = Once(self._detect)

    def __repr__(self) -> str:
        return f"<layer from {self._path}>"

    async def _open(self) -> ByteReceiveStream:
        return await _RangeStream.open(self._path, self._offset, self._size)

    async def _detect(self) -> Layer:
        kind = _kind(await _read_head(await self._open()))
        if kind == "tar":
            return partial.uncompressed_layer(
                self._open, media_type=self._media_type or MediaType.DOCKER_LAYER
            )
        digest, size = await hash_stream(await self._open())
        mt = self._media_type or (
            MediaType.OCI_LAYER_ZSTD if kind == "zstd" else MediaType.DOCKER_LAYER
        )
        return partial.compressed_layer(
            self._verified(digest, size), digest=digest, size=size, media_type=mt
        )

    async def _get(self) -> Layer:
        return await self._inner.get()

    def _verified(self, digest: Hash, size: int) -> partial.Opener:
        async def open_() -> ByteReceiveStream:
            return VerifyingStream(await self._open(), digest, size, what=self._path)

        return open_

    async def digest(self) -> Hash:
        return await (await self._get()).digest()

    async def diff_id(self) -> Hash:
        return await (await self._get()).diff_id()

    async def size(self) -> int:
        return await (await self._get()).size()

    async def media_type(self) -> str:
        return await (await self._get()).media_type()

    async def compressed(self) -> ByteReceiveStream:
        return await (await self._get()).compressed()

    async def uncompressed(self) -> ByteReceiveStream:
        return await (await self._get()).uncompressed()


async def _read_head(stream: ByteReceiveStream, n: int = 4) -> bytes:
    async with stream:
        try:
            return (await stream.receive(n))[:n]
        except anyio.EndOfStream:
            return b""


def layer_from_file(path: str | os.PathLike[str], *, media_type: str | None = None) -> Layer:
    """A layer from a file: gzip, zstd or plain tar, detected by magic on first use.

    Digest, size and diff_id are computed lazily, once. A plain tar is
    gzip'd on the fly for ``compressed()``.
    """
    return _FileLayer(os.fspath(path), media_type=media_type)


# --- reading docker save archives ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Member:
    offset: int
    size: int


def _safe_name(name: object, archive: str) -> str:
    if not isinstance(name, str) or not name:
        raise TarballError(f"{archive}: manifest.json names a member that is not a string")
    norm = posixpath.normpath(name)
    if (
        name.startswith("/")
        or "\\" in name
        or "\0" in name
        or norm.startswith("../")
        or norm == ".."
        or ".." in name.split("/")
    ):
        raise TarballError(f"{archive}: unsafe member name {name!r} in manifest.json")
    return norm


def _index_archive(path: str) -> dict[str, _Member]:
    members: dict[str, _Member] = {}
    links: dict[str, str] = {}
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise TarballError(f"{path}: cannot read the archive: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):  # a FIFO would block for ever, a device read for ever
        raise TarballError(f"{path}: not a regular file, so not a docker archive")
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                # normpath drops "./" prefixes; lstrip("./") would also eat ".x" -> "x".
                name = posixpath.normpath(m.name.lstrip("/") or m.name)
                if m.isreg():
                    members[name] = _Member(m.offset_data, m.size)
                elif m.issym() or m.islnk():
                    target = m.linkname
                    if m.issym():
                        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
                    links[name] = posixpath.normpath(target)
    except (tarfile.TarError, OSError) as exc:
        raise TarballError(f"{path}: not a readable tar archive: {exc}") from exc
    for name, target in links.items():
        seen = 0
        while target in links and seen < 16:
            target, seen = links[target], seen + 1
        if target in members:
            members.setdefault(name, members[target])
    return members


class _Archive:
    """One archive's members, and what was learnt of each: hashed or parsed once."""

    def __init__(self, path: str, members: dict[str, _Member]) -> None:
        self.path = path
        self.members = members
        self._layers: dict[_Member, tuple[Hash, str]] = {}
        self._configs: dict[_Member, tuple[bytes, ConfigFile]] = {}

    def member(self, name: object) -> _Member:
        safe = _safe_name(name, self.path)
        m = self.members.get(safe)
        if m is None:
            raise TarballError(f"{self.path}: manifest.json names {name!r}, which is not there")
        return m

    async def read(self, name: object, cap: int = MAX_DOCUMENT_BYTES) -> bytes:
        m = self.member(name)
        if m.size > cap:
            raise TarballError(f"{self.path}: member {name!r} is over the {cap}-byte cap")
        return await read_all(await _RangeStream.open(self.path, m.offset, m.size))

    async def layer(self, name: object) -> tuple[_Member, Hash, str]:
        """The member ``name``, its digest and its kind; hashed on the first ask only."""
        m = self.member(name)
        known = self._layers.get(m)
        if known is None:
            head = await _read_head(await _RangeStream.open(self.path, m.offset, m.size))
            digest, _ = await hash_stream(await _RangeStream.open(self.path, m.offset, m.size))
            known = self._layers[m] = (digest, _kind(head))
        return m, *known

    async def config(self, name: object) -> tuple[bytes, ConfigFile]:
        """The config member ``name``, raw and parsed; read on the first ask only."""
        m = self.member(name)
        known = self._configs.get(m)
        if known is None:
            raw = await self.read(name)
            try:
                parsed = ConfigFile.parse(raw)
            except ManifestError as exc:
                raise ManifestError(f"{self.path}: {name!r}: {exc}") from exc
            known = self._configs[m] = (raw, parsed)
        return known


class TarballImage(partial.ManifestImage):
    """An image of a ``docker save`` archive, as :func:`images` and :func:`image` return it.

    An OCI image (:class:`~aiolayercache.partial.ManifestImage`) whose blobs
    are members of the archive, read verified.

    :param raw_manifest: the OCI manifest made for it
    :param open_blob: opens the archive member a descriptor names
    :param raw_config: the config member's bytes
    :param repo_tags: the tags the archive gives it
    """

    #: The tags ``manifest.json`` gives the image (``RepoTags``), in its order; may be empty.
    repo_tags: list[str]

    def __init__(
        self,
        raw_manifest: bytes,
        open_blob: partial.BlobOpener,
        *,
        raw_config: bytes,
        repo_tags: Sequence[str] = (),
    ) -> None:
        super().__init__(
            raw_manifest,
            open_blob,
            raw_config=raw_config,
            media_type=MediaType.OCI_MANIFEST_SCHEMA1,
        )
        self.repo_tags = list(repo_tags)


async def images(path: str | os.PathLike[str]) -> list[TarballImage]:
    """Every image of a ``docker save`` archive, in ``manifest.json`` order.

    Each is a :class:`TarballImage`, its tags in ``repo_tags``. Layers are
    hashed once here, to build the manifest (an OCI manifest; plain tar
    layers keep their bytes and use the uncompressed layer media type).

    :raises TarballError: not an archive, a member named unsafely or missing,
        or more images or layers than the caps.
    :raises ManifestError: malformed ``manifest.json`` or config, or a config
        whose ``rootfs.diff_ids`` do not match the layers in number.
    """
    p = os.fspath(path)
    archive = _Archive(p, await anyio.to_thread.run_sync(_index_archive, p))
    raw_list = await archive.read("manifest.json")
    try:
        entries = json.loads(raw_list)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{p}: manifest.json is not valid JSON") from exc
    if not isinstance(entries, list):
        raise ManifestError(f"{p}: manifest.json is not a list")
    if len(entries) > MAX_ARCHIVE_IMAGES:
        raise TarballError(
            f"{p}: manifest.json lists {len(entries)} images, over the cap of {MAX_ARCHIVE_IMAGES}"
        )
    out: list[TarballImage] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("Layers"), list):
            raise ManifestError(f"{p}: manifest.json entry {i} needs 'Config' and 'Layers'")
        names = entry["Layers"]
        if len(names) > MAX_IMAGE_LAYERS:
            raise TarballError(
                f"{p}: manifest.json entry {i} lists {len(names)} layers, over the cap of "
                f"{MAX_IMAGE_LAYERS} an image"
            )
        raw_config, config = await archive.config(entry.get("Config"))
        if len(config.rootfs.diff_ids) != len(names):
            raise ManifestError(
                f"{p}: manifest.json entry {i}: config {entry.get('Config')!r} lists "
                f"{len(config.rootfs.diff_ids)} diff_ids for {len(names)} layers"
            )
        blobs: dict[Hash, _Member] = {}
        layers = []
        for name in names:
            m, digest, kind = await archive.layer(name)
            mt = {
                "gzip": MediaType.OCI_LAYER,
                "zstd": MediaType.OCI_LAYER_ZSTD,
                "tar": MediaType.OCI_UNCOMPRESSED_LAYER,
            }[kind]
            blobs[digest] = m
            layers.append({"mediaType": str(mt), "size": m.size, "digest": str(digest)})
        config_digest = Hash.of(raw_config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": str(MediaType.OCI_MANIFEST_SCHEMA1),
            "config": {
                "mediaType": str(MediaType.OCI_CONFIG_JSON),
                "size": len(raw_config),
                "digest": str(config_digest),
            },
            "layers": layers,
        }
        raw = json.dumps(manifest, separators=(",", ":")).encode()

        def opener(blobs: dict[Hash, _Member] = blobs) -> partial.BlobOpener:
            async def open_blob(desc: Descriptor) -> ByteReceiveStream:
                m = blobs.get(desc.digest)
                if m is None:
                    raise TarballError(f"{p}: no blob {desc.digest}")
                stream = await _RangeStream.open(p, m.offset, m.size)
                return VerifyingStream(stream, desc.digest, m.size, what=f"{p} {desc.digest}")

            return open_blob

        tags = entry.get("RepoTags") or []
        if not isinstance(tags, list):
            raise ManifestError(f"{p}: manifest.json entry {i}: 'RepoTags' must be a list")
        repo_tags = [t for t in tags if isinstance(t, str)]
        out.append(TarballImage(raw, opener(), raw_config=raw_config, repo_tags=repo_tags))
    return out


async def image(path: str | os.PathLike[str], tag: str | None = None) -> TarballImage:
    """One image of a ``docker save`` archive: the one tagged ``tag``, or the only one."""
    imgs = await images(path)
    if tag is None:
        if len(imgs) != 1:
            raise TarballError(f"{os.fspath(path)}: {len(imgs)} images; name one by tag")
        return imgs[0]
    for img in imgs:
        if tag in img.repo_tags:
            return img
    raise TarballError(f"{os.fspath(path)}: no image tagged {tag!r}")
