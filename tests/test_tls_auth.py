"""A TLS registry (private CA) that asks for a password: helpers, auth files and login over TLS."""

# ruff: noqa: F811 - the pki fixture is imported from test_tls and named as a parameter

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiolayercache.remote import Client, UnauthorizedError

from .conftest import USERS, Published, _need_registry
from .registry import Registry, htpasswd, start_registry
from .test_tls import PKI, pki, pull  # noqa: F401 - pki: the fixture, shared

pytestmark = pytest.mark.anyio

((USER, PASSWORD),) = USERS.items()


@pytest.fixture(scope="module")
def tls_auth_registry(
    tmp_path_factory: pytest.TempPathFactory, registry_data: Path, published: Published, pki: PKI
) -> Iterator[Registry]:
    _need_registry()
    work = tmp_path_factory.mktemp("registry-tls-auth")
    htpasswd(work / "htpasswd", USERS)
    cert, key = pki.servers["good"]
    reg = start_registry(
        work,
        registry_data,
        {"htpasswd": {"realm": "aiolayercache-tls", "path": str(work / "htpasswd")}},
        extra={"http": {"tls": {"certificate": str(cert), "key": str(key)}}},
    )
    yield reg
    reg.stop()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: PKI) -> Path:
    """An isolated HOME whose certs.d trusts the test CA; no other credentials."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    for var in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "REGISTRY_AUTH_FILE", "SSL_CERT_FILE"):
        monkeypatch.delenv(var, raising=False)
    for k in list(os.environ):
        if k.lower().endswith("_proxy"):
            monkeypatch.delenv(k)
    return h


async def test_a_credential_helper_over_tls(
    tls_auth_registry: Registry,
    published: Published,
    pki: PKI,
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = tls_auth_registry.host
    ref = f"{host}/test/small:v1"
    async with Client(ca_file=pki.ca_file) as c:
        with pytest.raises(UnauthorizedError):
            await pull(c, ref)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    helper = bin_ / "docker-credential-tlstest"
    answer = json.dumps({"Username": USER, "Secret": PASSWORD})
    helper.write_text(f"#!/bin/sh\ncat > /dev/null\nprintf '%s' '{answer}'\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"credHelpers": {host: "tlstest"}}))
    async with Client(ca_file=pki.ca_file) as c:
        assert await pull(c, ref) == published.small_digest


def test_login_over_tls_then_pull(
    tls_auth_registry: Registry, published: Published, pki: PKI, home: Path, tmp_path: Path
) -> None:
    host = tls_auth_registry.host
    pki.certs_d(home / ".config" / "containers" / "certs.d" / host)  # trusted, not named
    cli = [sys.executable, "-m", "aiolayercache"]
    env = dict(os.environ)
    out = subprocess.run(
        [*cli, "login", host, "-u", USER, "--password-stdin"],
        input=PASSWORD, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    config = tmp_path / "docker" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    pulled = subprocess.run(
        [*cli, "pull", "-q", f"{host}/test/small:v1", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert len(index["manifests"]) == 1
