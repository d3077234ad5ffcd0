"""Credentials, WWW-Authenticate challenges and the docker config file."""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Challenge", "Credentials", "load_docker_config", "parse_challenges"]


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and password, or an identity (refresh) token. Never shown in reprs."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def __repr__(self) -> str:
        kind = "identity token" if self.identity_token else "password"
        return f"Credentials(username={self.username!r}, <{kind} hidden>)"

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    @property
    def empty(self) -> bool:
        return not (self.username or self.password or self.identity_token)


_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


def _host_of_key(key: str) -> str:
    k = key
    for prefix in ("https://", "http://"):
        if k.startswith(prefix):
            k = k[len(prefix) :]
    return k.split("/", 1)[0]


def load_docker_config(registry: str, path: str | os.PathLike[str] | None = None) -> Credentials:
    """Credentials for ``registry`` from the docker config file.

    The file is ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``.

    Reads ``auths`` entries with ``auth`` (base64 ``user:password``),
    ``username``/``password`` or ``identitytoken``. Credential helpers
    (``credsStore``, ``credHelpers``) are not run. Returns empty credentials
    when there is no file or no entry.
    """
    if path is None:
        base = os.environ.get("DOCKER_CONFIG")
        p = Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"
    else:
        p = Path(path)
    try:
        if p.stat().st_size > 1024 * 1024:
            return Credentials()
        doc = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError):
        return Credentials()
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return Credentials()
    hub = registry in ("docker.io", "index.docker.io", "registry-1.docker.io")
    for key, entry in auths.items():
        if not isinstance(key, str) or not isinstance(entry, dict):
            continue
        host = _host_of_key(key)
        if not (host == registry or (hub and (key in _HUB_KEYS or host in _HUB_KEYS))):
            continue
        user, pw = entry.get("username") or "", entry.get("password") or ""
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
        token = entry.get("identitytoken") or ""
        if not all(isinstance(x, str) for x in (user, pw, token)):
            continue
        return Credentials(username=user, password=pw, identity_token=token)
    return Credentials()


@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a scheme (lowercased) and its parameters."""

    scheme: str
    params: dict[str, str]


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(rf"\s*({_TOKEN})\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|({_TOKEN}))\s*")
_SCHEME = re.compile(rf"\s*({_TOKEN})(?:\s+|$|(?=,))")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value (RFC 7235): several challenges, quoted strings.

    Unparseable parts end the parse; what was read so far is returned.
    """
    out: list[Challenge] = []
    pos = 0
    n = len(header)
    while pos < n:
        while pos < n and header[pos] in " ,":
            pos += 1
        m = _SCHEME.match(header, pos)
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while pos < n:
            pm = _PARAM.match(header, pos)
            if not pm:
                break
            key = pm.group(1).lower()
            val = pm.group(2)
            val = re.sub(r"\\(.)", r"\1", val) if val is not None else pm.group(3)
            params.setdefault(key, val)
            pos = pm.end()
            if pos < n and header[pos] == ",":
                pos += 1
                # A comma can end this challenge: does a new scheme follow?
                nxt = _SCHEME.match(header, pos)
                if nxt and not _PARAM.match(header, pos):
                    break
        out.append(Challenge(scheme, params))
    return out
