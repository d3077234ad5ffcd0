"""Image references, parsed as docker parses them."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .._errors import AioLayerCacheError, InvalidDigestError
from .._hash import Hash

__all__ = ["DOCKER_HUB", "InvalidReferenceError", "Reference", "is_loopback_host"]

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)  # docker's \w is ASCII
_HOSTNAME = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*"
)
_PORT = re.compile(r"[0-9]{1,5}")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_DIGEST_START = re.compile(r"sha(?:256|512):")
FORM = "a reference is [HOST[:PORT]/]NAME[:TAG][@DIGEST], e.g. ghcr.io/org/app:1.0"


class InvalidReferenceError(AioLayerCacheError, ValueError):
    """A string is not a valid image reference; the message names it."""


def _check_domain(domain: str, ref: str) -> None:
    host, port = domain, None
    if domain.startswith("["):
        end = domain.find("]")
        if end < 0:
            raise InvalidReferenceError(f"invalid reference {ref!r}: unclosed '[' in registry")
        try:
            ipaddress.IPv6Address(domain[1:end])
        except ValueError:
            raise InvalidReferenceError(
                f"invalid reference {ref!r}: bad IPv6 address {domain[1:end]!r}"
            ) from None
        rest = domain[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise InvalidReferenceError(f"invalid reference {ref!r}: bad registry {domain!r}")
            port = rest[1:]
    else:
        if domain.count(":") > 1:
            raise InvalidReferenceError(
                f"invalid reference {ref!r}: IPv6 registry addresses need brackets"
            )
        host, _, p = domain.partition(":")
        port = p if ":" in domain else None
        if not _HOSTNAME.fullmatch(host):
            raise InvalidReferenceError(f"invalid reference {ref!r}: bad registry host {host!r}")
    if port is not None and (not _PORT.fullmatch(port) or not 0 < int(port) < 65536):
        raise InvalidReferenceError(f"invalid reference {ref!r}: bad port {port!r}")


def _userinfo_end(s: str) -> int:
    """Where ``user[:password]@`` ends in ``s`` (the index of its ``@``), or -1.

    In a reference ``@`` is followed only by a digest, which has no ``/``; so
    an ``@`` with a ``/`` after it ends user info (``user:pw@host/x``). The
    last such ``@`` is taken: a password may hold ``@`` and ``/`` too.
    """
    slash = s.rfind("/")
    return s.rfind("@", 0, slash) if slash > 0 else -1


def _shown(s: str) -> str:
    """``s`` as error messages show it: with what may be a password masked.

    When what follows the first ``@`` does not start like a digest, the text
    before the last ``@`` may be ``user:password``: everything after its first
    ``:`` is masked.
    """
    at = s.rfind("@")
    if at < 0 or _DIGEST_START.match(s.partition("@")[2]):
        return s
    user, colon, _ = s[:at].partition(":")
    return f"{user}{':***' if colon else ''}@{s[at + 1 :]}"


@dataclass(frozen=True, slots=True)
class Reference:
    """``[registry/]repository[:tag][@digest]``, normalised as docker does.

    Docker Hub names get ``docker.io`` and, for one-component names,
    ``library/``; a reference with neither tag nor digest gets ``latest``.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: Hash | None = None

    @classmethod
    def parse(cls, s: str) -> Reference:
        if not isinstance(s, str) or not s:
            raise InvalidReferenceError(f"invalid reference {s!r}: empty")
        shown = _shown(s)
        at = _userinfo_end(s)
        if at >= 0:
            raise InvalidReferenceError(
                f"invalid reference {'<credentials>@' + s[at + 1 : at + 201]!r}: credentials "
                "do not belong in a reference (log in with docker login or podman login "
                f"instead); {FORM}"
            )
        scheme = _SCHEME.match(s)
        if scheme:
            raise InvalidReferenceError(
                f"invalid reference {shown[:200]!r}: a reference has no scheme; drop "
                f"{scheme.group()!r} (https is used, or http for a loopback or insecure "
                f"registry); {FORM}"
            )
        if len(s) > 4096 or any(c.isspace() or ord(c) < 32 for c in s):
            raise InvalidReferenceError(f"invalid reference {shown[:200]!r}: bad characters")
        rest, digest = s, None
        if "@" in rest:
            rest, _, d = rest.partition("@")
            try:
                digest = Hash.parse(d)
            except InvalidDigestError as exc:
                if shown == s:
                    why, cause = f": {exc}", exc
                else:  # exc would echo what follows '@', which may be part of a password
                    why = " (if what comes before '@' is user:password, credentials do not "
                    why += "belong in a reference)"
                    cause = None
                raise InvalidReferenceError(
                    f"invalid reference {shown!r}: '@' must be followed by a digest "
                    f"(sha256:<64 hex>){why}; {FORM}"
                ) from cause
        tag = None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise InvalidReferenceError(f"invalid reference {s!r}: bad tag {tag!r}")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            domain, path = first, remainder
            _check_domain(domain, s)
        else:
            domain, path = DOCKER_HUB, rest
        if domain == "index.docker.io":
            domain = DOCKER_HUB
        if domain == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        if not path or not all(_COMPONENT.fullmatch(c) for c in path.split("/")):
            raise InvalidReferenceError(
                f"invalid reference {s!r}: repository {path!r} must be lowercase "
                "components of [a-z0-9] joined by '.', '_', '__' or '-'"
            )
        if len(domain) + 1 + len(path) > 255:
            raise InvalidReferenceError(f"invalid reference {s[:200]!r}: name too long")
        if tag is None and digest is None:
            tag = "latest"
        return cls(domain, path, tag, digest)

    @property
    def identifier(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        assert self.tag is not None
        return self.tag

    @property
    def endpoint(self) -> str:
        """The ``host[:port]`` to talk to (Docker Hub's API lives on registry-1.docker.io)."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    @property
    def host(self) -> str:
        r = self.registry
        if r.startswith("["):
            return r[1 : r.index("]")]
        return r.partition(":")[0]

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def with_digest(self, h: Hash) -> Reference:
        return Reference(self.registry, self.repository, self.tag, h)

    @property
    def context(self) -> str:
        """``registry/repository``."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        s = self.context
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


def is_loopback_host(host: str) -> bool:
    """``localhost`` (and ``*.localhost``) or a loopback address literal (brackets allowed)."""
    h = host.strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
