"""Strict JSON for the model's documents: capped, objects only, every field type checked.

Errors are :class:`ManifestError` naming the document and the field.
"""

from __future__ import annotations

import json
from typing import Any

from ._errors import InvalidDigestError, ManifestError
from ._hash import Hash

__all__ = ["MAX_DOCUMENT_BYTES"]

# Documents bigger than this are refused before parsing (RELIABILITY.md row 13).
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


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


def _put(doc: dict[str, Any], key: str, value: object) -> None:
    if value is not None:
        doc[key] = value
