"""Credentials and where they come from, in skopeo's order.

1. ``Client(credentials=...)``;
2. ``$REGISTRY_AUTH_FILE`` (when set, it replaces 3-5);
3. ``$XDG_RUNTIME_DIR/containers/auth.json``;
4. ``$XDG_CONFIG_HOME/containers/auth.json`` (default ``~/.config/containers/auth.json``);
5. the docker config, ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``.

Each file is read in docker's order: ``credHelpers[registry]``, then
``credsStore``, then ``auths``. The first step with credentials wins; a file
or a helper without an entry passes on to the next. ``auths`` keys may be
``host``, ``host:port``, ``https://host``, ``http://host/v2/`` (the whole
registry) or ``host/namespace/repo``, matched per repository by longest
prefix as containers/image does. Docker Hub's names (``docker.io``,
``index.docker.io``, ``registry-1.docker.io``, ``https://index.docker.io/v1/``)
are one registry; its helpers are asked for ``https://index.docker.io/v1/``.

Lookups are lazy: the client asks only when a registry answered a 401
challenge, so an anonymous pull reads no file and runs no helper.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread

from ._helpers import HELPER_TIMEOUT, Helpers
from ._reference import Reference

__all__ = (
    "HUB_SERVER",
    "CredentialStore",
    "Credentials",
    "auth_files",
    "docker_config_path",
    "file_steps",
    "helper_server",
    "load_docker_config",
    "normalize_registry",
    "parse_auth_key",
)

log = logging.getLogger("aiolayercache.remote")

MAX_AUTH_FILE_BYTES = 1024 * 1024
HUB = "docker.io"
HUB_SERVER = "https://index.docker.io/v1/"
_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


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


# A step of the search: credentials found, or the name of a helper to ask.
Step = Credentials | str


def normalize_registry(host: str) -> str:
    """``docker.io`` for any of Docker Hub's names; any other host as it is."""
    return HUB if host.lower() in _HUB_NAMES else host


def helper_server(registry: str) -> str:
    """What a helper is asked for: ``https://index.docker.io/v1/`` for Docker Hub, else the host."""
    return HUB_SERVER if normalize_registry(registry) == HUB else registry


def parse_auth_key(key: str) -> tuple[str, str]:
    """An ``auths`` key as ``(registry, repository prefix)``; ``""`` means the whole registry.

    A key with a scheme (``https://host/v1/``) names a registry, whatever
    its path (containers/image's legacy keys); so do ``host/v1/`` and ``host/v2/``.
    """
    k = key.strip()
    stripped = k.removeprefix("http://").removeprefix("https://")
    host, _, path = stripped.partition("/")
    path = path.strip("/")
    if stripped != k or path in ("v1", "v2"):
        path = ""
    return normalize_registry(host), path


def _entry(entry: Mapping[str, Any]) -> Credentials | None:
    """One ``auths`` entry: ``auth`` (base64 ``user:password``), ``username`` and
    ``password``, or ``identitytoken``; None if it holds nothing usable."""
    user, pw = entry.get("username") or "", entry.get("password") or ""
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
    token = entry.get("identitytoken") or ""
    if not all(isinstance(x, str) for x in (user, pw, token)):
        return None
    c = Credentials(username=user, password=pw, identity_token=token)
    return None if c.empty else c


def _auths(auths: object, registry: str, repository: str) -> Credentials | None:
    """The ``auths`` entry for ``registry/repository`` with the longest matching key."""
    if not isinstance(auths, dict):
        return None
    best, best_len = None, -1
    for key, entry in auths.items():
        if not isinstance(key, str) or not isinstance(entry, dict):
            continue
        host, prefix = parse_auth_key(key)
        if host != registry or len(prefix) <= best_len:
            continue
        if prefix and not (repository == prefix or repository.startswith(prefix + "/")):
            continue
        c = _entry(entry)
        if c is not None:
            best, best_len = c, len(prefix)
    return best


def file_steps(doc: Mapping[str, Any], registry: str, repository: str) -> list[Step]:
    """What one auth file says for ``registry/repository``, in docker's order.

    ``credHelpers[registry]``, then ``credsStore`` (helper names), then the
    best ``auths`` entry.
    """
    reg = normalize_registry(registry)
    steps: list[Step] = []
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        for key, name in helpers.items():
            ok = isinstance(key, str) and isinstance(name, str) and name
            if ok and parse_auth_key(key) == (reg, ""):
                steps.append(name)
                break
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        steps.append(store)
    c = _auths(doc.get("auths"), reg, repository)
    if c is not None:
        steps.append(c)
    return steps


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _sources() -> list[tuple[str, Path]]:
    """The files to search, first first, each with the name it goes by in logs."""
    explicit = os.environ.get("REGISTRY_AUTH_FILE")
    if explicit:
        return [("$REGISTRY_AUTH_FILE", Path(explicit))]
    out = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        out.append(("$XDG_RUNTIME_DIR/containers/auth.json", Path(runtime)))
    config_home = os.environ.get("XDG_CONFIG_HOME")
    home = Path(config_home) if config_home else Path.home() / ".config"
    out.append(("containers/auth.json in the config home", home))
    out = [(name, d / "containers" / "auth.json") for name, d in out]
    out.append(("the docker config", docker_config_path()))
    return out


def auth_files() -> list[Path]:
    """The files to search, first first (skopeo's order; ``$REGISTRY_AUTH_FILE`` alone if set)."""
    return [p for _, p in _sources()]


def _read(path: Path) -> dict[str, Any] | None:
    """An auth file's JSON object; None (with a warning if it exists but is bad) otherwise."""
    try:
        # O_NONBLOCK: a FIFO put where the file goes must not hang the lookup.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                log.warning("%s: not a regular file; its credentials are ignored", path)
                return None
            data = f.read(MAX_AUTH_FILE_BYTES + 1)
    except OSError:  # absent (the usual case) or unreadable
        return None
    doc: object = None
    if len(data) <= MAX_AUTH_FILE_BYTES:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            doc = None
    if not isinstance(doc, dict):
        log.warning("%s: not a JSON object of at most 1 MiB; its credentials are ignored", path)
        return None
    return doc


def _plan(registry: str, repository: str) -> list[tuple[str, Step]]:
    """Every step of the search for ``registry/repository``, with where it comes from."""
    out: list[tuple[str, Step]] = []
    for name, path in _sources():
        doc = _read(path)
        if doc is not None:
            out.extend((name, step) for step in file_steps(doc, registry, repository))
    return out


def load_docker_config(registry: str, path: str | os.PathLike[str] | None = None) -> Credentials:
    """The ``auths`` credentials for ``registry`` in one docker config file; helpers are not run.

    The file is ``path``, else ``$DOCKER_CONFIG/config.json``, else
    ``~/.docker/config.json``. Empty credentials when there is no file or
    no entry. :class:`CredentialStore` does the whole search.
    """
    doc = _read(Path(path) if path is not None else docker_config_path())
    if doc is None:
        return Credentials()
    return _auths(doc.get("auths"), normalize_registry(registry), "") or Credentials()


class CredentialStore:
    """Credentials per repository: the given ones, else the first source with some, else none.

    ``credentials`` maps registry names to :class:`Credentials` or is one for
    every registry. With ``files`` false nothing else is read and no helper
    runs. Each repository is looked up once; each helper runs once per
    registry, within ``helper_timeout`` seconds.
    """

    def __init__(
        self,
        credentials: Mapping[str, Credentials] | Credentials | None,
        *,
        files: bool,
        helper_timeout: float = HELPER_TIMEOUT,
    ) -> None:
        self._given = credentials
        self._files = files
        self.helpers = Helpers(helper_timeout)
        self._cache: dict[tuple[str, str], Credentials] = {}

    async def get(self, ref: Reference) -> Credentials:
        """The credentials for ``ref``'s repository (empty for none).

        :raises CredentialHelperError: a helper the search reached failed.
        """
        if isinstance(self._given, Credentials):
            return self._given
        if self._given is not None:
            c = self._given.get(ref.registry)
            if c is not None:
                return c
        if not self._files:
            return Credentials()
        key = (ref.registry, ref.repository)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = await self._search(ref)
        return found

    async def _search(self, ref: Reference) -> Credentials:
        plan = await anyio.to_thread.run_sync(_plan, ref.registry, ref.repository)
        for source, step in plan:
            if isinstance(step, str):
                got = await self.helpers.get(step, helper_server(ref.registry))
                if got is None:
                    continue
                source = f"{source}: docker-credential-{step}"
                user, secret = got
                step = (
                    Credentials(identity_token=secret)
                    if user == "<token>"
                    else Credentials(username=user, password=secret)
                )
            log.debug("credentials for %s from %s", ref.context, source)
            return step
        return Credentials()
