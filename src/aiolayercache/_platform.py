"""Platforms as docker matches them: this host's, the matching rule, and one picker."""

from __future__ import annotations

import platform as _stdlib_platform

from ._errors import ManifestError, PlatformNotFoundError
from ._protocols import Image, ImageIndex
from ._types import Platform, is_index_type

__all__ = ["host_platform", "image_for_platform", "platform_matches"]


def host_platform() -> Platform:
    """This machine's platform as docker names it (``linux/amd64``, ``linux/arm64/v8``, …)."""
    machine = _stdlib_platform.machine().lower()
    arch, variant = {
        "x86_64": ("amd64", None),
        "amd64": ("amd64", None),
        "aarch64": ("arm64", "v8"),
        "arm64": ("arm64", "v8"),
        "armv7l": ("arm", "v7"),
        "armv6l": ("arm", "v6"),
        "i386": ("386", None),
        "i686": ("386", None),
        "ppc64le": ("ppc64le", None),
        "s390x": ("s390x", None),
        "riscv64": ("riscv64", None),
    }.get(machine, (machine, None))
    system = _stdlib_platform.system().lower() or "linux"
    return Platform(architecture=arch, os=system, variant=variant)


def _norm_variant(arch: str, variant: str | None) -> str | None:
    if arch == "arm64" and variant in (None, "", "v8"):
        return "v8"
    if arch == "arm" and variant in (None, ""):
        return "v7"
    return variant or None


def platform_matches(want: Platform, have: Platform) -> bool:
    """docker's rule: same os and architecture; the variant too when one is asked for."""
    if want.os != have.os or want.architecture != have.architecture:
        return False
    if want.variant or want.architecture in ("arm", "arm64"):
        wv = _norm_variant(want.architecture, want.variant)
        hv = _norm_variant(have.architecture, have.variant)
        if want.variant and wv != hv:
            return False
    return not (want.os_version and have.os_version and want.os_version != have.os_version)


async def image_for_platform(ii: ImageIndex, want: Platform, what: str) -> Image:
    """The first image of ``ii`` whose platform matches ``want`` (docker's rule).

    ``what`` names the index in errors. Raises :class:`PlatformNotFoundError`
    (listing the index's platforms) when no child matches, and
    :class:`ManifestError` when the matching child is itself an index.
    """
    manifests = (await ii.index_manifest()).manifests
    for d in manifests:
        if d.platform is not None and platform_matches(want, d.platform):
            break
    else:
        have = ", ".join(str(d.platform) for d in manifests if d.platform) or "none"
        raise PlatformNotFoundError(f"{what}: no image for platform {want} (the index has: {have})")
    if is_index_type(d.media_type):
        raise ManifestError(f"{what}: child {d.digest} for {want} is an index")
    return await ii.image(d.digest)
