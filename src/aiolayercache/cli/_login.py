"""``aiolayercache login`` and ``logout``: credentials in the docker config, as crane writes them.

``login`` first asks the registry's ``/v2/`` with the credentials (basic, or
a bearer token for no scope, as docker does) and writes nothing if they are
refused; then it stores ``{"auth": base64(user:password)}`` under ``auths`` in
``$DOCKER_CONFIG/config.json`` (or ``~/.docker/config.json``), keeping every
other key, mode 0600, replaced atomically. ``logout`` removes the registry's
entries (all its spellings). Credential helpers are neither written to nor
erased: a ``credsStore`` or ``credHelpers`` entry for the registry is said.
The password is never printed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio.to_thread

from ..remote import Client, Credentials, InvalidReferenceError, Reference
from ..remote._credentials import HUB, HUB_SERVER, docker_config_path, parse_auth_key
from ._args import EXIT_OK, UsageError

__all__ = ("login", "logout", "parse_registry")


def parse_registry(text: str) -> str:
    """REGISTRY as typed (``host[:port]``, ``https://host``, a Docker Hub name) → its name."""
    host, path = parse_auth_key(text)
    if path:
        raise UsageError(f"REGISTRY {text!r}: a registry is host[:port], without a path")
    try:
        return Reference.parse(f"{host}/x").registry
    except InvalidReferenceError:
        raise UsageError(f"REGISTRY {text!r} is not a registry host[:port]") from None


MAX_CONFIG = 16 * 1024 * 1024


def _key(registry: str) -> str:
    """The ``auths`` key docker writes: its v1 URL for Docker Hub, else ``host[:port]``."""
    return HUB_SERVER if registry == HUB else registry


def _load(path: Path) -> dict[str, Any]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {}
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CONFIG:
        raise UsageError(f"{path} is not a regular file of at most 16 MiB; not touching it")
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a JSON object; not changing it")
    return doc


def _save(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path``: a 0600 temp file beside it, fsync, rename."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent="\t")
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _helper_note(doc: dict[str, Any], registry: str) -> str | None:
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        for key, name in helpers.items():
            if isinstance(key, str) and parse_auth_key(key) == (registry, ""):
                return f"credHelpers names docker-credential-{name} for {registry}"
    if isinstance(doc.get("credsStore"), str) and doc["credsStore"]:
        return f"credsStore names docker-credential-{doc['credsStore']}"
    return None


def _store(path: Path, registry: str, creds: Credentials) -> str | None:
    doc = _load(path)
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        auths = doc["auths"] = {}
    for k in [k for k in auths if isinstance(k, str) and parse_auth_key(k) == (registry, "")]:
        del auths[k]
    raw = f"{creds.username}:{creds.password}".encode()
    auths[_key(registry)] = {"auth": base64.b64encode(raw).decode()}
    _save(path, doc)
    return _helper_note(doc, registry)


def _erase(path: Path, registry: str) -> bool:
    doc = _load(path)
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        return False
    gone = [k for k in auths if isinstance(k, str) and parse_auth_key(k) == (registry, "")]
    for k in gone:
        del auths[k]
    if gone:
        _save(path, doc)
    return bool(gone)


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        if args.password is not None:
            raise UsageError("-p and --password-stdin are exclusive")
        pw = sys.stdin.read()
        return pw.removesuffix("\n").removesuffix("\r")
    if args.password is not None:
        print(
            "aiolayercache: WARNING! -p/--password on the command line is insecure "
            "(other users may see it); use --password-stdin",
            file=sys.stderr,
        )
        return str(args.password)
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    raise UsageError("give the password with --password-stdin (or -p)")


async def login(args: argparse.Namespace) -> int:
    """Check USER's password with the registry, then store it in the docker config."""
    registry = parse_registry(args.registry)
    password = _password(args)
    if not args.username or not password:
        raise UsageError("login needs a user name (-u) and a non-empty password")
    creds = Credentials(username=args.username, password=password)
    ref = Reference.parse(f"{registry}/x")
    async with Client(
        credentials={registry: creds},
        docker_config=False,
        registries_conf=False,
        insecure=args.insecure,
    ) as client:
        # " ": no scope. A login asks for a token for no repository, as docker does.
        resp = await client.request(ref, "GET", "/v2/", what=f"login to {registry}", scope=" ")
        resp.release()
    path = docker_config_path()
    note = await anyio.to_thread.run_sync(_store, path, registry, creds)
    if note is not None:
        print(
            f"aiolayercache: {path}: {note}, which is asked first; the credentials "
            "written to auths are used when it has none",
            file=sys.stderr,
        )
    print(f"aiolayercache: the password is stored unencrypted in {path}", file=sys.stderr)
    print("Login Succeeded")
    return EXIT_OK


async def logout(args: argparse.Namespace) -> int:
    """Remove REGISTRY's entries from the docker config's ``auths``."""
    registry = parse_registry(args.registry)
    path = docker_config_path()
    if await anyio.to_thread.run_sync(_erase, path, registry):
        print(f"Removing login credentials for {registry}")
        return EXIT_OK
    print(f"Not logged in to {registry}", file=sys.stderr)
    return EXIT_OK
