"""OCI image layouts: read one as an ImageIndex, write images and indexes into one.

A layout is a directory with ``oci-layout``, ``index.json`` and
``blobs/<alg>/<hex>``. Reading checks every blob against its digest as it
streams, and never follows a blob path out of the layout. Writing
(``_layout_write``) puts each blob in place once, atomically (temp file,
fsync, rename), in parallel with a bound, and replaces ``index.json``
atomically last, so an interrupted write never leaves an index that points
at a missing or partial blob.
"""

from __future__ import annotations

import os

import anyio
import anyio.to_thread
from anyio.abc import ByteReceiveStream

from . import partial
from ._errors import ManifestError
from ._hash import Hash
from ._layout_base import REF_NAME, LayoutError, blob_path, inside, read_index_json
from ._layout_write import write, write_all
from ._protocols import Image, ImageIndex
from ._types import MAX_DOCUMENT_BYTES, Descriptor, MediaType, is_index_type
from .streams import FileStream, VerifyingStream, read_all

__all__ = ["REF_NAME", "LayoutError", "image", "index", "write", "write_all"]


class _Reader:
    def __init__(self, root: str) -> None:
        self.root = root

    def _open_path(self, desc: Descriptor) -> str:
        path = blob_path(self.root, desc.digest)
        inside(self.root, path)
        if not os.path.isfile(path):
            raise LayoutError(f"{path}: blob {desc.digest} is missing from the layout")
        return path

    async def open_blob(self, desc: Descriptor) -> ByteReceiveStream:
        path = await anyio.to_thread.run_sync(self._open_path, desc)
        try:
            fs = await FileStream.open(path)
        except OSError as exc:
            raise LayoutError(f"{path}: cannot open blob: {exc.strerror}") from exc
        return VerifyingStream(fs, desc.digest, desc.size, what=path)

    async def fetch_manifest(self, desc: Descriptor) -> bytes:
        if desc.size > MAX_DOCUMENT_BYTES:
            raise ManifestError(
                f"{blob_path(self.root, desc.digest)}: manifest of {desc.size} bytes is over "
                f"the {MAX_DOCUMENT_BYTES} cap"
            )
        return await read_all(await self.open_blob(desc))


async def index(path: str | os.PathLike[str]) -> ImageIndex:
    """The layout at ``path`` as an ImageIndex (its ``index.json``)."""
    root = await anyio.to_thread.run_sync(os.path.realpath, path)
    raw = await anyio.to_thread.run_sync(read_index_json, root)
    r = _Reader(root)
    return partial.index(raw, r.fetch_manifest, r.open_blob, media_type=MediaType.OCI_IMAGE_INDEX)


async def image(path: str | os.PathLike[str], ref: str | Hash | None = None) -> Image:
    """One image of the layout: by digest, by its ``org.opencontainers.image.ref.name``,
    or the only image when ``ref`` is None."""
    ii = await index(path)
    im = await ii.index_manifest()
    want: Hash | None = ref if isinstance(ref, Hash) else None
    if isinstance(ref, str) and ref.startswith(("sha256:", "sha512:")):
        want = Hash.parse(ref)
    if want is not None:
        matches = [d for d in im.manifests if d.digest == want]
    elif ref is not None:
        matches = [d for d in im.manifests if (d.annotations or {}).get(REF_NAME) == ref]
    else:
        matches = [d for d in im.manifests if not is_index_type(d.media_type)]
    if not matches:
        raise LayoutError(f"{os.fspath(path)}: no image {ref if ref is not None else ''}".strip())
    if ref is None and len({d.digest for d in matches}) > 1:
        raise LayoutError(f"{os.fspath(path)}: several images; name one by ref or digest")
    desc = matches[0]
    if is_index_type(desc.media_type):
        raise ManifestError(f"{os.fspath(path)}: {ref} names an index, not an image")
    return await ii.image(desc.digest)
