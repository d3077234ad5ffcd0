"""Value types of the OCI / Docker v2 image model, parsed strictly from raw bytes."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ._errors import InvalidDigestError, ManifestError
from ._hash import Hash

__all__ = [
    "ConfigFile",
    "Descriptor",
    "History",
    "IndexManifest",
    "Manifest",
    "MediaType",
    "Platform",
    "RootFS",
]

# Documents bigger than this are refused before parsing (RELIABILITY.md row 13).
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024

# Indexes nested deeper than this below the one a walk starts from are refused with a
# ManifestError (partial._nested_depth enforces it; docs/DECISIONS.md says why 32).
MAX_INDEX_DEPTH = 32


class MediaType(StrEnum):
    """OCI and Docker v2 media types (the names follow go-containerregistry's ``types``)."""

    OCI_CONTENT_DESCRIPTOR = "application/vnd.oci.descriptor.v1+json"
    OCI_IMAGE_INDEX = "application/vnd.oci.image.index.v1+json"
    OCI_MANIFEST_SCHEMA1 = "application/vnd.oci.image.manifest.v1+json"
    OCI_CONFIG_JSON = "application/vnd.oci.image.config.v1+json"
    OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
    OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
    OCI_UNCOMPRESSED_LAYER = "application/vnd.oci.image.layer.v1.tar"
    OCI_RESTRICTED_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    OCI_UNCOMPRESSED_RESTRICTED_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar"
    OCI_EMPTY_JSON = "application/vnd.oci.empty.v1+json"

    DOCKER_MANIFEST_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
    DOCKER_MANIFEST_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    DOCKER_MANIFEST_SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
    DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
    DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    DOCKER_CONFIG_JSON = "application/vnd.docker.container.image.v1+json"
    DOCKER_PLUGIN_CONFIG = "application/vnd.docker.plugin.v1+json"
    DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    DOCKER_UNCOMPRESSED_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

    @property
    def is_index(self) -> bool:
        return self in (MediaType.OCI_IMAGE_INDEX, MediaType.DOCKER_MANIFEST_LIST)

    @property
    def is_image(self) -> bool:
        return self in (MediaType.OCI_MANIFEST_SCHEMA1, MediaType.DOCKER_MANIFEST_SCHEMA2)

    @property
    def is_schema1(self) -> bool:
        return self in (MediaType.DOCKER_MANIFEST_SCHEMA1, MediaType.DOCKER_MANIFEST_SCHEMA1_SIGNED)


def is_index_type(media_type: str | None) -> bool:
    return media_type in (MediaType.OCI_IMAGE_INDEX, MediaType.DOCKER_MANIFEST_LIST)


def is_image_type(media_type: str | None) -> bool:
    return media_type in (MediaType.OCI_MANIFEST_SCHEMA1, MediaType.DOCKER_MANIFEST_SCHEMA2)


# --- strict JSON helpers ------------------------------------------------------------


def _load(raw: bytes, what: str) -> dict[str, Any]:
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise ManifestError(f"{what}: expected bytes, got {type(raw).__name__}")
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ManifestError(f"{what}: {len(raw)} bytes is over the {MAX_DOCUMENT_BYTES} cap")
    try:
        doc = json.loads(bytes(raw))
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{what}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _dump(doc: dict[str, Any]) -> bytes:
    # ASCII escapes: a lone surrogate that parsed (JSON allows "\ud800") writes back too.
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()


def _opt_str(doc: dict[str, Any], key: str, what: str) -> str | None:
    v = doc.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ManifestError(f"{what}: {key!r} must be a string")
    return v


def _str_map(doc: dict[str, Any], key: str, what: str) -> dict[str, str] | None:
    v = doc.get(key)
    if v is None:
        return None
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    ):
        raise ManifestError(f"{what}: {key!r} must map strings to strings")
    return dict(v)


def _str_list(doc: dict[str, Any], key: str, what: str) -> list[str] | None:
    v = doc.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ManifestError(f"{what}: {key!r} must be a list of strings")
    return list(v)


def _digest(v: object, what: str) -> Hash:
    if not isinstance(v, str):
        raise ManifestError(f"{what}: digest must be a string")
    try:
        return Hash.parse(v)
    except InvalidDigestError as exc:
        raise ManifestError(f"{what}: {exc}") from exc


def _schema_version(doc: dict[str, Any], what: str) -> int:
    v = doc.get("schemaVersion")
    if isinstance(v, bool):
        raise ManifestError(f"{what}: schemaVersion must be 2, got {v!r}")
    if v == 1:
        raise ManifestError(f"{what}: Docker schema 1 manifests are not supported")
    if v != 2:
        raise ManifestError(f"{what}: schemaVersion must be 2, got {v!r}")
    return 2


def _put(doc: dict[str, Any], key: str, value: object) -> None:
    if value is not None:
        doc[key] = value


# --- value types -------------------------------------------------------------------


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
        if mt in (MediaType.DOCKER_MANIFEST_SCHEMA1, MediaType.DOCKER_MANIFEST_SCHEMA1_SIGNED):
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
        d: dict[str, Any] = {"schemaVersion": self.schema_version}
        _put(d, "mediaType", None if self.media_type is None else str(self.media_type))
        _put(d, "artifactType", self.artifact_type)
        d["config"] = self.config._to_dict()
        d["layers"] = [x._to_dict() for x in self.layers]
        if self.subject is not None:
            d["subject"] = self.subject._to_dict()
        _put(d, "annotations", self.annotations)
        return _dump(d)


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
        d: dict[str, Any] = {"schemaVersion": self.schema_version}
        _put(d, "mediaType", None if self.media_type is None else str(self.media_type))
        _put(d, "artifactType", self.artifact_type)
        d["manifests"] = [x._to_dict() for x in self.manifests]
        if self.subject is not None:
            d["subject"] = self.subject._to_dict()
        _put(d, "annotations", self.annotations)
        return _dump(d)


@dataclass(frozen=True, slots=True)
class RootFS:
    type: str
    diff_ids: list[Hash]


@dataclass(frozen=True, slots=True)
class History:
    created: str | None = None
    created_by: str | None = None
    author: str | None = None
    comment: str | None = None
    empty_layer: bool | None = None


_CONFIG_KEYS = {
    "architecture",
    "os",
    "os.version",
    "os.features",
    "variant",
    "created",
    "author",
    "config",
    "rootfs",
    "history",
}


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """An image configuration (OCI image config or Docker container image v1).

    Fields it does not model are kept in ``extra`` and written back by ``to_json``.
    """

    architecture: str
    os: str
    rootfs: RootFS
    os_version: str | None = None
    os_features: list[str] | None = None
    variant: str | None = None
    created: str | None = None
    author: str | None = None
    config: dict[str, Any] | None = None
    history: list[History] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes) -> ConfigFile:
        what = "config"
        doc = _load(raw, what)
        arch, os_ = doc.get("architecture", ""), doc.get("os", "")
        if not isinstance(arch, str) or not isinstance(os_, str):
            raise ManifestError(f"{what}: 'architecture' and 'os' must be strings")
        rfs = doc.get("rootfs")
        if not isinstance(rfs, dict):
            raise ManifestError(f"{what}: 'rootfs' must be an object")
        rtype = rfs.get("type", "layers")
        ids = rfs.get("diff_ids", [])
        if not isinstance(rtype, str) or not isinstance(ids, list):
            raise ManifestError(f"{what}: rootfs needs 'type' and a 'diff_ids' list")
        diff_ids = [_digest(x, f"{what} rootfs.diff_ids[{i}]") for i, x in enumerate(ids)]
        cfg = doc.get("config")
        if cfg is not None and not isinstance(cfg, dict):
            raise ManifestError(f"{what}: 'config' must be an object")
        hist_raw = doc.get("history") or []
        if not isinstance(hist_raw, list):
            raise ManifestError(f"{what}: 'history' must be a list")
        history: list[History] = []
        for i, h in enumerate(hist_raw):
            hw = f"{what} history[{i}]"
            if not isinstance(h, dict):
                raise ManifestError(f"{hw}: must be an object")
            empty = h.get("empty_layer")
            if empty is not None and not isinstance(empty, bool):
                raise ManifestError(f"{hw}: 'empty_layer' must be a boolean")
            history.append(
                History(
                    created=_opt_str(h, "created", hw),
                    created_by=_opt_str(h, "created_by", hw),
                    author=_opt_str(h, "author", hw),
                    comment=_opt_str(h, "comment", hw),
                    empty_layer=empty,
                )
            )
        return cls(
            architecture=arch,
            os=os_,
            rootfs=RootFS(type=rtype, diff_ids=diff_ids),
            os_version=_opt_str(doc, "os.version", what),
            os_features=_str_list(doc, "os.features", what),
            variant=_opt_str(doc, "variant", what),
            created=_opt_str(doc, "created", what),
            author=_opt_str(doc, "author", what),
            config=cfg,
            history=history,
            extra={k: v for k, v in doc.items() if k not in _CONFIG_KEYS},
        )

    def platform(self) -> Platform:
        return Platform(
            architecture=self.architecture,
            os=self.os,
            os_version=self.os_version,
            os_features=self.os_features,
            variant=self.variant,
        )

    def to_json(self) -> bytes:
        d: dict[str, Any] = {}
        _put(d, "created", self.created)
        _put(d, "author", self.author)
        d["architecture"] = self.architecture
        d["os"] = self.os
        _put(d, "os.version", self.os_version)
        _put(d, "os.features", self.os_features)
        _put(d, "variant", self.variant)
        _put(d, "config", self.config)
        d["rootfs"] = {"type": self.rootfs.type, "diff_ids": [str(x) for x in self.rootfs.diff_ids]}
        if self.history:
            hs = []
            for h in self.history:
                hd: dict[str, Any] = {}
                _put(hd, "created", h.created)
                _put(hd, "created_by", h.created_by)
                _put(hd, "author", h.author)
                _put(hd, "comment", h.comment)
                _put(hd, "empty_layer", h.empty_layer)
                hs.append(hd)
            d["history"] = hs
        d.update(self.extra)
        return _dump(d)
