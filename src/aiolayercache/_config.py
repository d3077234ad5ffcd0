"""Image configurations of the model: ConfigFile, RootFS and History, parsed strictly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._errors import ManifestError
from ._hash import Hash
from ._json import _digest, _dump, _load, _opt_str, _put, _str_list
from ._manifest import Platform

__all__ = ["ConfigFile", "History", "RootFS"]


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
