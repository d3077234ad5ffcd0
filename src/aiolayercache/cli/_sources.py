"""Sources: what a ``SRC`` argument names, and the images it resolves to.

A source is a registry reference (``alpine:3.20``, ``docker://…``), an OCI
layout (``oci:DIR[:REF]``) or a docker save archive (``docker-archive:FILE``),
read as skopeo reads them.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from .. import Image, ImageIndex, layout
from .._platform import image_for_platform
from .._types import Platform, is_index_type
from ..layout import REF_NAME
from ..remote import (
    Client,
    InvalidReferenceError,
    PlatformNotFoundError,
    Reference,
    host_platform,
    platform_matches,
)
from ._args import UsageError

__all__ = ["Source", "check_platform", "dedupe", "failure", "parse_source", "resolve"]


@dataclass
class Source:
    text: str
    kind: str  # registry | oci | docker-archive
    path: str = ""
    ref: str | None = None


def parse_source(s: str) -> Source:
    if s.startswith("oci:"):
        # As skopeo reads it: the directory ends at the first ':' (the ref may hold more).
        path, sep, ref_text = s[4:].partition(":")
        ref = ref_text if sep and ref_text else None
        if not path:
            raise UsageError(f"{s!r}: oci: needs a directory (oci:DIR[:REF])")
        return Source(s, "oci", path, ref)
    if s.startswith("docker-archive:"):
        path = s[len("docker-archive:") :]
        if not path:
            raise UsageError(f"{s!r}: docker-archive: needs a file")
        return Source(s, "docker-archive", path)
    text = s[len("docker://") :] if s.startswith("docker://") else s
    try:
        Reference.parse(text)
    except InvalidReferenceError as exc:
        raise UsageError(str(exc)) from None
    return Source(s, "registry", ref=text)


def dedupe(sources: list[Source], renames: dict[str, str]) -> list[Source]:
    """The same source (and name) twice is pulled once, as crane keys images by source."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for src in sources:
        name = renames.get(src.text, "")
        if src.kind == "registry":
            assert src.ref is not None
            key: tuple[str, ...] = (src.kind, str(Reference.parse(src.ref)), name)
        else:
            key = (src.kind, os.path.abspath(src.path), src.ref or "", name)
        if key not in seen:
            seen.add(key)
            out.append(src)
    return out


async def resolve(
    src: Source, args: argparse.Namespace, client: Client
) -> list[tuple[str, Image | ImageIndex, bool]]:
    """``(name, image or index, single)`` for each image of ``src``.

    Its own errors do not name the source: the caller does (:func:`failure`).

    ``single`` is True for an image that was not chosen from an index by its
    platform: the only kind whose platform is still to be checked.
    """
    platform = args.platform or str(host_platform())
    if src.kind == "registry":
        assert src.ref is not None
        ref = Reference.parse(src.ref)
        name = f"{ref.context}:{ref.tag}" if ref.tag else str(ref.identifier)
        desc = await client.get(ref)
        if desc.is_index and args.all_platforms:
            return [(name, desc.index(), False)]
        return [(name, await desc.image(platform=platform), not desc.is_index)]
    if src.kind == "oci":
        ii = await layout.index(src.path)
        im = await ii.index_manifest()
        picks = [
            d
            for d in im.manifests
            if src.ref is None or (d.annotations or {}).get(REF_NAME) == src.ref
        ]
        if not picks:
            raise LookupError(f"no image named {src.ref!r} in the layout")
        out: list[tuple[str, Image | ImageIndex, bool]] = []
        for d in picks:
            name = (d.annotations or {}).get(REF_NAME) or d.digest.hex[:12]
            if is_index_type(d.media_type):
                child = await ii.image_index(d.digest)
                if args.all_platforms:
                    out.append((name, child, False))
                else:
                    want = Platform.from_string(platform)
                    what = f"index {name}"
                    out.append((name, await image_for_platform(child, want, what), False))
            else:
                out.append((name, await ii.image(d.digest), True))
        return out
    from .. import tarball  # only a tarball source needs the format

    imgs = await tarball.images(src.path)
    return [((img.repo_tags or [os.path.basename(src.path)])[0], img, True) for img in imgs]


def failure(src: Source, exc: BaseException) -> str:
    """``SRC: what went wrong``, the source named once, as it was given.

    An error of the library may start with the source already: a registry
    error with the reference (``host/x:v1: no image for platform …``), an
    archive's with its path. That name is not said twice; it is replaced by
    the source as the user typed it.
    """
    msg = str(exc)
    spellings = [src.text]
    if src.kind == "registry":
        assert src.ref is not None
        spellings += [src.ref, str(Reference.parse(src.ref))]
    else:
        spellings += [src.path, os.path.abspath(src.path)]
    for name in spellings:
        if msg.startswith(f"{name}: "):
            return f"{src.text}: {msg[len(name) + 2 :]}"
    return f"{src.text}: {msg}"


async def check_platform(img: Image, platform: str) -> None:
    """An explicit ``--platform`` that a single image does not match is an error.

    Its config says where it runs; a config that says nothing is let through.
    The error does not name the source: the caller does (:func:`failure`).
    """
    cfg = await img.config_file()
    if not cfg.os or not cfg.architecture:
        return
    want = Platform.from_string(platform)
    have = Platform(
        architecture=cfg.architecture, os=cfg.os, variant=cfg.variant, os_version=cfg.os_version
    )
    if not platform_matches(want, have):
        raise PlatformNotFoundError(
            f"--platform {want} asked for, but this is a single-platform image "
            f"for {have} (not an index with a {want} image)"
        )
