"""Arguments: the parser, the size, duration and platform types, and the exit codes.

Cheap on purpose: ``aiolayercache --help`` and a usage error load this module
and the model, not the commands (see :func:`aiolayercache.cli.main`).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from .. import __version__

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "human",
    "parse_duration",
    "parse_platform",
    "parse_size",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$")
_DURATION = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
# Spelled out, not re.IGNORECASE: that would let the Kelvin sign through as a 'k'.
_PLATFORM = re.compile(r"[A-Za-z0-9_]+/[A-Za-z0-9_]+(?:/[A-Za-z0-9_]+)?")


FLEET_ENV = "AIOLAYERCACHE_FLEET"


def add_fleet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fleet",
        metavar="REGISTRY/REPO",
        default=None,
        help=f"a cache shared by machines, in a registry repository, behind the local "
        f"cache (default: ${FLEET_ENV}; '' for none); see docs/FLEET.md",
    )


MAX_SIZE_ENV = "AIOLAYERCACHE_CACHE_MAX_SIZE"


def add_max_size_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-max-size",
        type=parse_size,
        metavar="SIZE",
        default=None,
        help=f"keep the local cache within SIZE while pulling, least recently used "
        f"entries go (500M, 10G; default: ${MAX_SIZE_ENV}, else unbounded)",
    )


class UsageError(Exception):
    """Bad arguments: exit code 2."""


def parse_size(s: str) -> int:
    """``500M``, ``2GiB``, ``1.5g``, ``1024`` → bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(s)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (try 500M or 2G)")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return int(float(m.group(1)) * mult)


def parse_duration(s: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` → seconds."""
    m = _DURATION.match(s)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {s!r} (try 7d or 12h)")
    mult = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2).lower()]
    return float(m.group(1)) * mult


def parse_platform(s: str) -> str:
    """``linux/arm64``, ``linux/arm/v7``: checked whole here, so a bad one is a usage error.

    Each part is ``[a-z0-9_]+``; capitals are read as containerd's
    ``platforms.Parse`` reads them (``LINUX/AMD64`` is ``linux/amd64``), and
    the lowercase form is returned. Nothing is trimmed: containerd refuses
    ``" linux/amd64"`` too.
    """
    if not _PLATFORM.fullmatch(s):
        raise argparse.ArgumentTypeError(
            f"not a platform: {s!r} (a platform is OS/ARCH[/VARIANT], each part "
            "letters, digits or '_', e.g. linux/amd64 or linux/arm/v7)"
        )
    return s.lower()


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _platform_options(p: argparse.ArgumentParser, all_help: str) -> None:
    """``--platform`` or ``--all-platforms`` (pull and copy)."""
    plat = p.add_mutually_exclusive_group()
    plat.add_argument(
        "--platform",
        type=parse_platform,
        metavar="OS/ARCH[/VARIANT]",
        help="which image of an index (default: this host); a single image of "
        "another platform is an error",
    )
    plat.add_argument("--all-platforms", action="store_true", help=all_help)


def _push_options(p: argparse.ArgumentParser) -> None:
    """The options copy and push share."""
    _platform_options(p, "copy a whole index (every platform)")
    p.add_argument(
        "-j", "--jobs", type=int, default=4, metavar="N", help="blobs pushed at once (default 4)"
    )
    _tls(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only the summary")
    p.add_argument("--debug", action="store_true", help="tracebacks and debug logs")


def _tls(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain HTTP (when HTTPS fails to connect) and any TLS certificate "
        "for every registry; loopback registries may always fall back to HTTP",
    )
    p.add_argument(
        "--cert-dir",
        metavar="DIR",
        help="a certs.d directory for the registry: *.crt are CA certificates, "
        "*.cert + *.key a client pair (default: ~/.config/containers/certs.d/HOST[:PORT], "
        "/etc/containers/certs.d/HOST[:PORT], /etc/docker/certs.d/HOST[:PORT])",
    )


def _registries_conf(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registries-conf",
        metavar="FILE",
        help="containers registries.conf for mirrors, rewrites and blocks of pulls "
        "(default: $CONTAINERS_REGISTRIES_CONF, ~/.config/containers/registries.conf or "
        "/etc/containers/registries.conf, as skopeo reads it)",
    )


def _login_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = "$DOCKER_CONFIG/config.json or ~/.docker/config.json"
    login = sub.add_parser(
        "login",
        help="check credentials with a registry and store them in the docker config",
        description=f"Check USER's password with REGISTRY (a request to /v2/), then store "
        f"it in {where} (other keys kept, mode 0600), as crane auth login does. Refused "
        "credentials exit 1 and write nothing.",
        epilog='example:\n  echo "$TOKEN" | aiolayercache login ghcr.io -u me --password-stdin',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    login.add_argument("registry", metavar="REGISTRY", help="host[:port], or docker.io")
    login.add_argument("-u", "--username", required=True, metavar="USER")
    login.add_argument(
        "-p", "--password", metavar="PASSWORD", help="insecure: use --password-stdin"
    )
    login.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    login.add_argument(
        "--insecure", action="store_true", help="allow plain HTTP to non-loopback registries"
    )
    login.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    logout = sub.add_parser(
        "logout",
        help="remove a registry's credentials from the docker config",
        description=f"Remove REGISTRY's entries from the auths of {where}.",
    )
    logout.add_argument("registry", metavar="REGISTRY", help="host[:port], or docker.io")
    logout.add_argument("--debug", action="store_true", help="tracebacks and debug logs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aiolayercache",
        description=(
            "Pull OCI and Docker images through a verified, shared layer cache "
            "(the format of crane --cache_path), and copy them to registries."
        ),
        epilog="Run 'aiolayercache COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pull = sub.add_parser(
        "pull",
        help="pull images into an OCI layout or a docker tarball",
        description=(
            "Pull one or more images into DEST through the layer cache. SRC is a registry "
            "reference (alpine:3.20, ghcr.io/o/r@sha256:...), oci:DIR[:REF] or "
            "docker-archive:FILE. DEST is an OCI layout directory (--format oci, the "
            "default; many images share one layout) or a docker tarball (--format tarball)."
        ),
        epilog=(
            "examples:\n"
            "  aiolayercache pull docker.io/library/alpine:3.20 alpine.tar --format tarball\n"
            "  aiolayercache pull alpine:3.20 busybox:1.36 ./images --cache-dir /var/cache/layers\n"
            "  aiolayercache pull --all-platforms alpine:3.20 ./alpine-all"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pull.add_argument("sources", metavar="SRC", nargs="+", help="images to pull")
    pull.add_argument("dest", metavar="DEST", help="OCI layout directory or tarball file")
    pull.add_argument(
        "--format",
        choices=["oci", "tarball"],
        default=None,
        help="what DEST is (default: tarball if DEST ends in .tar, else oci)",
    )
    where = pull.add_mutually_exclusive_group()
    where.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="layer cache directory (default: $AIOLAYERCACHE_CACHE_DIR or the user cache dir)",
    )
    where.add_argument("--no-cache", action="store_true", help="pull without the local layer cache")
    add_fleet_option(pull)
    add_max_size_option(pull)
    _platform_options(pull, "keep whole indexes (every platform)")
    pull.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="SRC=NAME",
        help="name SRC's image NAME in DEST instead of its own name (two different "
        "images may not share a name in one DEST)",
    )
    pull.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=4,
        metavar="N",
        help="images pulled at once, up to 4 N blobs (default 4)",
    )
    _tls(pull)
    _registries_conf(pull)
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress, only the summary")
    pull.add_argument("--debug", action="store_true", help="tracebacks and debug logs")

    copy = sub.add_parser(
        "copy",
        help="copy an image (or a whole index) to a registry, digests kept",
        description=(
            "Copy the image SRC names to the registry reference DST. SRC is anything pull "
            "takes: a registry reference, oci:DIR[:REF] or docker-archive:FILE. Manifests "
            "go up as they are (no conversion), so DST has SRC's digest. Blobs the "
            "repository has are skipped, blobs of another repository of the same registry "
            "are mounted, the rest are uploaded; the manifest DST names goes up last. A "
            "registry SRC is read through the layer cache."
        ),
        epilog=(
            "examples:\n"
            "  aiolayercache copy alpine:3.20 registry.example:5000/mirror/alpine:3.20\n"
            "  aiolayercache copy --all-platforms alpine:3.20 registry.example:5000/alpine:3.20\n"
            "  aiolayercache copy oci:./images:app:v1 registry.example:5000/app:v1"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    copy.add_argument("source", metavar="SRC", help="the image to copy")
    copy.add_argument("dest", metavar="DST", help="registry reference to copy it to")
    where = copy.add_mutually_exclusive_group()
    where.add_argument(
        "--cache-dir", metavar="DIR", help="layer cache directory (default as for pull)"
    )
    where.add_argument(
        "--no-cache", action="store_true", help="read SRC without the local layer cache"
    )
    add_fleet_option(copy)
    add_max_size_option(copy)
    _push_options(copy)
    _registries_conf(copy)

    push = sub.add_parser(
        "push",
        help="push a local OCI layout or docker archive to a registry (copy's short form)",
        description=(
            "Push the image in PATH to the registry reference REF: 'copy oci:DIR[:NAME] REF' "
            "when PATH is a directory (an OCI layout; DIR:NAME picks one image by its ref "
            "name), 'copy docker-archive:FILE REF' when it is a file. oci: and "
            "docker-archive: sources are taken as they are."
        ),
        epilog=(
            "examples:\n"
            "  aiolayercache push ./images:app:v1 registry.example:5000/app:v1\n"
            "  aiolayercache push app.tar registry.example:5000/app:v1"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("source", metavar="PATH", help="OCI layout DIR[:NAME] or docker archive FILE")
    push.add_argument("dest", metavar="REF", help="registry reference to push it to")
    push.set_defaults(
        cache_dir=None, no_cache=True, fleet="", registries_conf=False, cache_max_size=None
    )
    _push_options(push)

    _login_parsers(sub)

    cache = sub.add_parser(
        "cache",
        help="inspect and maintain the layer cache",
        description="Inspect and maintain the layer cache.",
    )
    cache.add_argument("--cache-dir", metavar="DIR", help="cache directory (default as for pull)")
    cache.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    csub = cache.add_subparsers(dest="cache_command", metavar="ACTION")

    def action(name: str, **kw: Any) -> argparse.ArgumentParser:
        # The common options are taken after the action too (``cache verify --cache-dir
        # DIR``), as git and kubectl take theirs; SUPPRESS keeps a value given before it.
        a = csub.add_parser(name, **kw)
        a.add_argument("--cache-dir", metavar="DIR", default=argparse.SUPPRESS, help="as above")
        a.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as above")
        return a

    ls = action("ls", help="list entries with size and last use")
    ls.add_argument(
        "--fleet",
        metavar="REGISTRY/REPO",
        help="list the entries of this fleet repository (from its tags) instead",
    )
    cache.set_defaults(fleet=None, insecure=False)
    action("du", help="total size and number of entries")
    action("verify", help="hash every entry again; remove bad entries and stale temp files")
    prune = action(
        "prune",
        help="remove least recently used entries",
        description="Remove entries, least recently used first, until the cache fits "
        "--max-size, and every entry unused for longer than --older-than.",
    )
    prune.add_argument("--max-size", type=parse_size, metavar="SIZE", help="e.g. 10G, 500M")
    prune.add_argument("--older-than", type=parse_duration, metavar="AGE", help="e.g. 30d, 12h")
    rm = action("rm", help="remove one entry")
    rm.add_argument("digest", metavar="DIGEST", help="sha256:<hex>")
    return p
