"""Manifests as a registry serves them, and what ``get`` returns: a RemoteDescriptor."""

from __future__ import annotations

import json

import aiohttp
from anyio.abc import ByteReceiveStream

from .. import partial
from .._errors import DigestMismatchError, ManifestError
from .._hash import Hash
from .._platform import host_platform, image_for_platform
from .._protocols import Image, ImageIndex
from .._types import (
    MAX_DOCUMENT_BYTES,
    Descriptor,
    MediaType,
    Platform,
    is_image_type,
    is_index_type,
)
from .._wrap import ImageWrapper, IndexWrapper
from ._errors import NET_ERRORS, TransportError, read_capped, redact
from ._protocols import Fetcher
from ._reference import Reference

__all__ = [
    "MANIFEST_ACCEPT",
    "RemoteDescriptor",
    "SourcedImage",
    "SourcedIndex",
    "manifest_media_type",
    "read_manifest",
    "source_of",
]

MANIFEST_ACCEPT = ", ".join(
    [
        MediaType.OCI_IMAGE_INDEX,
        MediaType.OCI_MANIFEST_SCHEMA1,
        MediaType.DOCKER_MANIFEST_LIST,
        MediaType.DOCKER_MANIFEST_SCHEMA2,
        f"{MediaType.DOCKER_MANIFEST_SCHEMA1_SIGNED};q=0.1",
        f"{MediaType.DOCKER_MANIFEST_SCHEMA1};q=0.1",
    ]
)


def manifest_media_type(raw: bytes, content_type: str, what: str) -> str:
    """The manifest's media type from Content-Type and body; refuse schema 1 and conflicts."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ManifestError(f"manifest {what}: not valid JSON") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"manifest {what}: not a JSON object")
    body_type: str | None = doc["mediaType"] if isinstance(doc.get("mediaType"), str) else None
    schema1 = (MediaType.DOCKER_MANIFEST_SCHEMA1, MediaType.DOCKER_MANIFEST_SCHEMA1_SIGNED)
    if content_type in schema1 or body_type in schema1 or doc.get("schemaVersion") == 1:
        raise ManifestError(f"manifest {what}: Docker schema 1 manifests are not supported")
    known = is_image_type(content_type) or is_index_type(content_type)
    if known and body_type is not None and body_type != content_type:
        raise ManifestError(
            f"manifest {what}: mediaType {body_type} does not match Content-Type {content_type}"
        )
    if known:
        return content_type
    if body_type is not None:
        return body_type
    if "manifests" in doc:
        return MediaType.OCI_IMAGE_INDEX
    return MediaType.OCI_MANIFEST_SCHEMA1


async def read_manifest(
    resp: aiohttp.ClientResponse, what: str, expect: Hash | None
) -> tuple[bytes, str, Hash]:
    """A manifest response's body (capped), media type and digest (checked against ``expect``)."""
    try:
        raw = await read_capped(resp, MAX_DOCUMENT_BYTES, f"manifest {what}")
    except NET_ERRORS as exc:
        raise TransportError(f"reading manifest {what}: {exc}", url=redact(resp.url)) from exc
    content_type = resp.content_type or ""
    algorithm = expect.algorithm if expect is not None else "sha256"
    digest = Hash.of(raw, algorithm)
    if expect is not None and digest != expect:
        raise DigestMismatchError(f"manifest {what}", expect, digest)
    return raw, manifest_media_type(raw, content_type, what), digest


class SourcedImage(ImageWrapper):
    """An image read from a registry, with where it came from (so a push to another
    repository of that registry can mount its blobs instead of uploading them)."""

    def __init__(self, inner: Image, source: Reference) -> None:
        super().__init__(inner)
        self.source = source


class SourcedIndex(IndexWrapper):
    """An index read from a registry, with where it came from."""

    def __init__(self, inner: ImageIndex, source: Reference) -> None:
        super().__init__(inner)
        self.source = source


def source_of(target: Image | ImageIndex) -> Reference | None:
    """The registry repository ``target`` was read from, through any wrappers; or None."""
    node: object = target
    for _ in range(64):
        if isinstance(node, SourcedImage | SourcedIndex):
            return node.source
        if not isinstance(node, ImageWrapper | IndexWrapper):
            return None
        node = node.inner
    return None


class RemoteDescriptor:
    """What ``get`` returns: a manifest's descriptor and raw bytes; becomes an image or index."""

    def __init__(self, client: Fetcher, ref: Reference, desc: Descriptor, raw: bytes) -> None:
        self.client = client
        self.ref = ref
        self.descriptor = desc
        self.raw_manifest = raw

    def __repr__(self) -> str:
        return f"<remote {self.ref} {self.descriptor.media_type} {self.descriptor.digest}>"

    @property
    def media_type(self) -> str:
        return self.descriptor.media_type

    @property
    def digest(self) -> Hash:
        return self.descriptor.digest

    @property
    def is_index(self) -> bool:
        return is_index_type(self.descriptor.media_type)

    def _open_blob(self) -> partial.BlobOpener:
        async def open_blob(desc: Descriptor) -> ByteReceiveStream:
            return await self.client.open_blob(self.ref, desc)

        return open_blob

    def _fetch_manifest(self) -> partial.ManifestFetcher:
        async def fetch(desc: Descriptor) -> bytes:
            raw, _, _ = await self.client.fetch_manifest(self.ref, str(desc.digest), desc.digest)
            return raw

        return fetch

    def index(self) -> ImageIndex:
        if not self.is_index:
            raise ManifestError(f"{self.ref} is an image ({self.media_type}), not an index")
        ii = partial.index(
            self.raw_manifest,
            self._fetch_manifest(),
            self._open_blob(),
            media_type=self.media_type,
        )
        return SourcedIndex(ii, self.ref)

    async def image(self, *, platform: Platform | str | None = None) -> Image:
        if not self.is_index:
            img = partial.image(self.raw_manifest, self._open_blob(), media_type=self.media_type)
            return SourcedImage(img, self.ref)
        want = (
            Platform.from_string(platform)
            if isinstance(platform, str)
            else (platform or host_platform())
        )
        return SourcedImage(await image_for_platform(self.index(), want, str(self.ref)), self.ref)
