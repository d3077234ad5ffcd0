"""Manifests of the model: Platform, Descriptor, Manifest and IndexManifest, parsed strictly."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from ._errors import ManifestError
from ._hash import Hash
from ._json import _digest, _dump, _load, _opt_str, _put, _str_list, _str_map
from ._media_types import is_image_type, is_index_type, is_schema1_type

__all__ = ["MAX_INDEX_DEPTH", "Descriptor", "IndexManifest", "Manifest", "Platform"]

# Indexes nested deeper than this below the one a walk starts from are refused with a
# ManifestError (partial._nested_depth enforces it; docs/DECISIONS.md says why 32).
MAX_INDEX_DEPTH = 32


def _schema_version(doc: dict[str, Any], what: str) -> int:
    v = doc.get("schemaVersion")
    if isinstance(v, bool):
        raise ManifestError(f"{what}: schemaVersion must be 2, got {v!r}")
    if v == 1:
        raise ManifestError(f"{what}: Docker schema 1 manifests are not supported")
    if v != 2:
        raise ManifestError(f"{what}: schemaVersion must be 2, got {v!r}")
    return 2


@dataclass(frozen=True, slots=True)
class Platform:
    """Where an image runs: ``os/architecture[/variant]`` and the finer fields."""

    architecture: str
    os: str
    os_version: str | None = None
    os_features: list[str] | None = None
    variant: str | None = None
    features: list[str] | None = None

    @classmethod
    def parse(cls, raw: bytes) -> Platform:
        return cls._from_dict(_load(raw, "platform"), "platform")

    @classmethod
    def from_string(cls, s: str) -> Platform:
        """Parse ``os/arch[/variant]`` as docker's ``--platform`` does."""
        parts = s.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {s!r}: want os/arch[/variant]")
        return cls(
            architecture=parts[1], os=parts[0], variant=parts[2] if len(parts) == 3 else None
        )

    @classmethod
    def _from_dict(cls, d: object, what: str) -> Platform:
        if not isinstance(d, dict):
            raise ManifestError(f"{what}: platform must be an object")
        arch, os_ = d.get("architecture"), d.get("os")
        if not isinstance(arch, str) or not isinstance(os_, str):
            raise ManifestError(f"{what}: platform needs string 'architecture' and 'os'")
        return cls(
            architecture=arch,
            os=os_,
            os_version=_opt_str(d, "os.version", what),
            os_features=_str_list(d, "os.features", what),
            variant=_opt_str(d, "variant", what),
            features=_str_list(d, "features", what),
        )

    def _to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        _put(d, "os.version", self.os_version)
        _put(d, "os.features", self.os_features)
        _put(d, "variant", self.variant)
        _put(d, "features", self.features)
        return d

    def to_json(self) -> bytes:
        return _dump(self._to_dict())

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return f"{s}/{self.variant}" if self.variant else s


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A typed, sized, content-addressed reference to a blob or a manifest."""

    media_type: str
    size: int
    digest: Hash
    data: bytes | None = None
    urls: list[str] | None = None
    annotations: dict[str, str] | None = None
    platform: Platform | None = None
    artifact_type: str | None = None

    @classmethod
    def parse(cls, raw: bytes) -> Descriptor:
        return cls._from_dict(_load(raw, "descriptor"), "descriptor")

    @classmethod
    def _from_dict(cls, d: object, what: str) -> Descriptor:
        if not isinstance(d, dict):
            raise ManifestError(f"{what}: descriptor must be an object")
        mt = d.get("mediaType")
        if not isinstance(mt, str) or not mt:
            raise ManifestError(f"{what}: descriptor needs a string 'mediaType'")
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63:
            raise ManifestError(f"{what}: descriptor 'size' must be an int64 >= 0, got {size!r}")
        digest = _digest(d.get("digest"), what)
        data: bytes | None = None
        if d.get("data") is not None:
            if not isinstance(d["data"], str):
                raise ManifestError(f"{what}: descriptor 'data' must be base64 text")
            try:
                data = base64.b64decode(d["data"], validate=True)
            except ValueError as exc:
                raise ManifestError(f"{what}: descriptor 'data' is not base64") from exc
        platform = None
        if d.get("platform") is not None:
            platform = Platform._from_dict(d["platform"], what)
        return cls(
            media_type=mt,
            size=size,
            digest=digest,
            data=data,
            urls=_str_list(d, "urls", what),
            annotations=_str_map(d, "annotations", what),
            platform=platform,
            artifact_type=_opt_str(d, "artifactType", what),
        )

    def _to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mediaType": str(self.media_type),
            "size": self.size,
            "digest": str(self.digest),
        }
        if self.data is not None:
            d["data"] = base64.b64encode(self.data).decode()
        _put(d, "urls", self.urls)
        _put(d, "annotations", self.annotations)
        if self.platform is not None:
            d["platform"] = self.platform._to_dict()
        _put(d, "artifactType", self.artifact_type)
        return d

    def to_json(self) -> bytes:
        return _dump(self._to_dict())


def _descriptors(doc: dict[str, Any], key: str, what: str) -> list[Descriptor]:
    v = doc.get(key)
    if not isinstance(v, list):
        raise ManifestError(f"{what}: {key!r} must be a list")
    return [Descriptor._from_dict(x, f"{what} {key}[{i}]") for i, x in enumerate(v)]


def _subject(doc: dict[str, Any], what: str) -> Descriptor | None:
    if doc.get("subject") is None:
        return None
    return Descriptor._from_dict(doc["subject"], f"{what} subject")


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest (OCI image manifest or Docker schema 2)."""

    schema_version: int
    config: Descriptor
    layers: list[Descriptor]
    media_type: str | None = None
    annotations: dict[str, str] | None = None
    subject: Descriptor | None = None
    artifact_type: str | None = None

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        what = "manifest"
        doc = _load(raw, what)
        mt = _opt_str(doc, "mediaType", what)
        if is_schema1_type(mt):
            raise ManifestError(f"{what}: Docker schema 1 manifests are not supported")
        version = _schema_version(doc, what)
        if "manifests" in doc:
            raise ManifestError(f"{what}: has both 'manifests' and image fields (ambiguous)")
        if mt is not None and is_index_type(mt):
            raise ManifestError(f"{what}: mediaType {mt} is an index, not an image manifest")
        if "config" not in doc:
            raise ManifestError(f"{what}: no 'config'")
        return cls(
            schema_version=version,
            config=Descriptor._from_dict(doc["config"], f"{what} config"),
            layers=_descriptors(doc, "layers", what),
            media_type=mt,
            annotations=_str_map(doc, "annotations", what),
            subject=_subject(doc, what),
            artifact_type=_opt_str(doc, "artifactType", what),
        )

    def to_json(self) -> bytes:
        body = {"config": self.config._to_dict(), "layers": [x._to_dict() for x in self.layers]}
        return _document(self, body)


@dataclass(frozen=True, slots=True)
class IndexManifest:
    """An image index (OCI image index or Docker manifest list)."""

    schema_version: int
    manifests: list[Descriptor]
    media_type: str | None = None
    annotations: dict[str, str] | None = None
    subject: Descriptor | None = None
    artifact_type: str | None = None

    @classmethod
    def parse(cls, raw: bytes) -> IndexManifest:
        what = "index"
        doc = _load(raw, what)
        version = _schema_version(doc, what)
        mt = _opt_str(doc, "mediaType", what)
        if "layers" in doc or "config" in doc:
            raise ManifestError(f"{what}: has both 'manifests' and image fields (ambiguous)")
        if mt is not None and is_image_type(mt):
            raise ManifestError(f"{what}: mediaType {mt} is an image manifest, not an index")
        return cls(
            schema_version=version,
            manifests=_descriptors(doc, "manifests", what),
            media_type=mt,
            annotations=_str_map(doc, "annotations", what),
            subject=_subject(doc, what),
            artifact_type=_opt_str(doc, "artifactType", what),
        )

    def to_json(self) -> bytes:
        return _document(self, {"manifests": [x._to_dict() for x in self.manifests]})


def _document(m: Manifest | IndexManifest, body: dict[str, Any]) -> bytes:
    """The bytes of manifest or index ``m`` whose own fields are ``body``, keys in spec order."""
    d: dict[str, Any] = {"schemaVersion": m.schema_version}
    _put(d, "mediaType", None if m.media_type is None else str(m.media_type))
    _put(d, "artifactType", m.artifact_type)
    d.update(body)
    if m.subject is not None:
        d["subject"] = m.subject._to_dict()
    _put(d, "annotations", m.annotations)
    return _dump(d)
