"""What a fleet entry looks like in the registry: a blob, and a small manifest tagged for it.

An entry ``h`` is the blob ``h`` of the fleet repository, kept alive by an OCI
image manifest tagged ``sha256-<hex>`` whose one layer is that blob (the
registry's garbage collection keeps what a tagged manifest references; its
retention rules can expire the tags by pattern and age). The manifest's
config is the OCI empty descriptor (``{}``). Annotations say what the entry
is (``compressed``, ``uncompressed`` or ``config``) and its media type.

A quarantine (``bad-sha256-<hex>``, the same shape as a claim, expiring a
day later) marks an entry whose stored bytes failed their digest: the
registry keeps a blob it has under its digest (a new upload of the right
bytes does not replace it) until its garbage collection removes it, so the
entry is not tagged again meanwhile.

A claim (``claim-sha256-<hex>``) is a manifest without layers that says one
process is filling ``h`` until a time: others wait for the entry instead of
fetching the same bytes from the origin at once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .._errors import ManifestError
from .._hash import Hash
from .._types import MediaType

__all__ = [
    "EMPTY",
    "EMPTY_DIGEST",
    "EMPTY_MEDIA_TYPE",
    "Claim",
    "EntryInfo",
    "claim_manifest",
    "claim_tag",
    "entry_manifest",
    "entry_tag",
    "hash_of_tag",
    "parse_claim",
    "parse_entry",
    "quarantine_tag",
]

EMPTY = b"{}"
EMPTY_DIGEST = Hash.of(EMPTY)
EMPTY_MEDIA_TYPE = str(MediaType.OCI_EMPTY_JSON)
MANIFEST_TYPE = str(
    MediaType.OCI_MANIFEST_SCHEMA1
)  # (the name follows ggcr: it is the OCI manifest)
_CONFIG_TYPES = (MediaType.OCI_CONFIG_JSON, MediaType.DOCKER_CONFIG_JSON)
KIND = "dev.aiolayercache.entry.kind"
OWNER = "dev.aiolayercache.claim.owner"
EXPIRES = "dev.aiolayercache.claim.expires"
# A tag is [A-Za-z0-9_][A-Za-z0-9._-]{0,127}: ``sha256-`` and 64 hex digits fit.
_PREFIX = "sha256-"


def entry_tag(h: Hash) -> str:
    return f"{h.algorithm}-{h.hex}"


def claim_tag(h: Hash) -> str:
    return f"claim-{h.algorithm}-{h.hex}"


def quarantine_tag(h: Hash) -> str:
    return f"bad-{h.algorithm}-{h.hex}"


def hash_of_tag(tag: str) -> Hash | None:
    """The hash an entry tag names; None for any other tag."""
    if not tag.startswith(_PREFIX):
        return None
    try:
        return Hash.parse(f"sha256:{tag[len(_PREFIX) :]}")
    except ValueError:
        return None


def _empty_config() -> dict[str, Any]:
    return {"mediaType": EMPTY_MEDIA_TYPE, "digest": str(EMPTY_DIGEST), "size": len(EMPTY)}


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def kind_of(media_type: str, keyed_by_diff_id: bool) -> str:
    if keyed_by_diff_id:
        return "uncompressed"
    return "config" if media_type in _CONFIG_TYPES else "compressed"


def entry_manifest(h: Hash, size: int, media_type: str, kind: str) -> bytes:
    """The manifest that keeps entry ``h`` alive."""
    layer = {"mediaType": media_type, "digest": str(h), "size": size}
    return _dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": _empty_config(),
            "layers": [layer],
            "annotations": {KIND: kind},
        }
    )


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """An entry as its manifest describes it."""

    digest: Hash
    size: int
    media_type: str
    kind: str  # compressed, uncompressed or config


def _load(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"{what}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{what}: not a JSON object")
    return doc


def parse_entry(raw: bytes, h: Hash, what: str) -> EntryInfo:
    """The entry ``h`` that manifest ``raw`` keeps; a ``ManifestError`` if it keeps another."""
    doc = _load(raw, what)
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise ManifestError(f"{what}: not a fleet entry (one layer expected)")
    layer = layers[0]
    if layer.get("digest") != str(h):
        raise ManifestError(f"{what}: keeps {layer.get('digest')!r}, not {h}")
    size, media_type = layer.get("size"), layer.get("mediaType")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{what}: bad size {size!r}")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestError(f"{what}: bad mediaType {media_type!r}")
    annotations = doc.get("annotations")
    kind = annotations.get(KIND) if isinstance(annotations, dict) else None
    if kind not in ("compressed", "uncompressed", "config"):
        kind = "compressed"
    return EntryInfo(h, size, media_type, str(kind))


@dataclass(frozen=True, slots=True)
class Claim:
    owner: str
    expires: float  # unix time

    @property
    def live(self) -> bool:
        return self.expires > time.time()


def claim_manifest(owner: str, expires: float) -> bytes:
    return _dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": _empty_config(),
            "layers": [],
            "annotations": {OWNER: owner, EXPIRES: f"{expires:.3f}"},
        }
    )


def parse_claim(raw: bytes) -> Claim | None:
    """The claim manifest ``raw`` holds; None when it is not one (then nobody holds it)."""
    try:
        doc = _load(raw, "claim")
        annotations = doc.get("annotations")
        if not isinstance(annotations, dict):
            return None
        owner, expires = annotations.get(OWNER), float(annotations.get(EXPIRES, "nan"))
    except (ManifestError, ValueError, TypeError):
        return None
    if not isinstance(owner, str) or expires != expires:  # NaN: not a claim
        return None
    return Claim(owner, expires)
