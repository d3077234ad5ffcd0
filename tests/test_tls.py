"""TLS, the scheme probe and proxies, against real docker-registry processes on loopback.

A CA made here signs the registries' certificates (good, expired, for another
name) and a client pair; one registry asks for client certificates
(``clientcas``). A TCP counter in front of the plain-HTTP registry sees the
HTTPS probe (a connection that opens with a TLS record) apart from plain
HTTP, and a CONNECT proxy counts what goes through it. ``registry.test`` is a
non-loopback name the client's resolver (and the proxy) map to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from yarl import URL

from aiolayercache import Hash, random
from aiolayercache.remote import Client, Reference, RetryPolicy, TransportError
from aiolayercache.remote._scheme import proxy_for
from aiolayercache.remote._urls import check_target, schemes_for

from .conftest import Published, _need_registry
from .registry import Registry, free_port, start_registry

pytestmark = pytest.mark.anyio

CLI = [sys.executable, "-m", "aiolayercache"]
NAME = "registry.test"  # not loopback by name; the resolver and the proxy map it to 127.0.0.1
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


# --- a CA and its certificates ------------------------------------------------------------


def _pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CA:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, d: Path, stem: str, names: list[str], *, client: bool = False, expired: bool = False
    ) -> tuple[Path, Path, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        start, end = (NOW - 10 * DAY, NOW - 2 * DAY) if expired else (NOW - DAY, NOW + 30 * DAY)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{stem}-key.pem").write_bytes(_pem_key(key))
        return d / f"{stem}.pem", d / f"{stem}-key.pem", cert


@dataclass
class PKI:
    dir: Path
    ca_file: Path
    client: tuple[Path, Path]  # signed by the CA
    stranger: tuple[Path, Path]  # a client pair signed by another CA
    expired: x509.Certificate
    servers: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def certs_d(self, d: Path, *, client: bool = False) -> Path:
        """A certs.d directory: the CA as ``ca.crt``, the client pair as ``client.cert/key``."""
        d.mkdir(parents=True, exist_ok=True)
        (d / "ca.crt").write_bytes(self.ca_file.read_bytes())
        if client:
            (d / "client.cert").write_bytes(self.client[0].read_bytes())
            (d / "client.key").write_bytes(self.client[1].read_bytes())
        return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA("aiolayercache test CA"), CA("somebody else")
    (d / "ca.pem").write_bytes(ca.pem())
    good = ca.issue(d, "server", ["127.0.0.1", "localhost", NAME])
    old = ca.issue(d, "expired", ["127.0.0.1"], expired=True)
    wrong = ca.issue(d, "wrong", ["wrong.example"])
    client = ca.issue(d, "client", ["client"], client=True)
    stranger = other.issue(d, "stranger", ["client"], client=True)
    p = PKI(d, d / "ca.pem", client[:2], stranger[:2], old[2])
    p.servers = {"good": good[:2], "expired": old[:2], "wrong": wrong[:2]}
    return p


def _tls_registry(
    factory: pytest.TempPathFactory, data: Path, pki: PKI, kind: str, mutual: bool = False
) -> Registry:
    _need_registry()
    cert, key = pki.servers[kind]
    tls: dict[str, Any] = {"certificate": str(cert), "key": str(key)}
    if mutual:
        tls["clientcas"] = [str(pki.ca_file)]
    return start_registry(
        factory.mktemp(f"registry-tls-{kind}"), data, extra={"http": {"tls": tls}}
    )


@pytest.fixture(scope="module")
def tls_registries(
    tmp_path_factory: pytest.TempPathFactory, registry_data: Path, published: Published, pki: PKI
) -> Iterator[dict[str, Registry]]:
    regs: dict[str, Registry] = {}
    try:
        for kind in ("good", "expired", "wrong"):
            regs[kind] = _tls_registry(tmp_path_factory, registry_data, pki, kind)
        regs["mutual"] = _tls_registry(tmp_path_factory, registry_data, pki, "good", mutual=True)
        yield regs
    finally:
        for r in regs.values():
            r.stop()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No proxy, CA or certs.d of the machine running the tests."""
    for k in list(os.environ):
        if k.lower().endswith("_proxy") or k in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


async def pull(client: Client, ref: str) -> Hash:
    """Pull ``ref`` whole (manifest, config, every layer); its digest."""
    img = await client.image(ref)
    for layer in await img.layers():
        async with await layer.compressed() as s:
            async for _ in s:
                pass
    return await img.digest()


# --- loopback helpers: a TCP counter, a CONNECT proxy, a resolver ---------------------------


@dataclass
class Counter:
    """A TCP forwarder: ``tls`` connections opened with a TLS record, ``plain`` the others."""

    upstream: int
    tls: int = 0
    plain: int = 0
    port: int = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = await r.read(1)
        if first == b"\x16":
            self.tls += 1
        elif first:
            self.plain += 1
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
        uw.write(first)
        await _pipe_both(r, w, ur, uw)


@dataclass
class ConnectProxy:
    """An HTTP CONNECT proxy that counts the tunnels it opens (``registry.test`` → loopback)."""

    connects: list[str] = field(default_factory=list)
    port: int = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            w.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            w.close()
            return
        self.connects.append(target)
        host, _, port = target.rpartition(":")
        ur, uw = await asyncio.open_connection("127.0.0.1" if host == NAME else host, int(port))
        w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await _pipe_both(r, w, ur, uw)


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()


async def _pipe_both(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, ur: asyncio.StreamReader, uw: Any
) -> None:
    await asyncio.gather(_pipe(r, uw), _pipe(ur, w))


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    servers: list[asyncio.Server] = []

    async def start(thing: Counter | ConnectProxy) -> Any:
        srv = await asyncio.start_server(thing.handle, "127.0.0.1", 0)
        servers.append(srv)
        thing.port = srv.sockets[0].getsockname()[1]
        return thing

    yield start
    for srv in servers:
        srv.close()


class TestResolver(AbstractResolver):
    """``registry.test`` (and nothing else) is 127.0.0.1."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != NAME:
            raise OSError(f"{host}: not in the test resolver")
        return [
            {"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
             "proto": 0, "flags": socket.AI_NUMERICHOST}
        ]  # fmt: skip

    async def close(self) -> None:
        pass


def _port(r: Registry) -> str:
    return r.host.rpartition(":")[2]


# --- trust: CA file, certs.d, SSL_CERT_FILE ------------------------------------------------


async def test_pull_with_ca_file_cert_dir_and_certs_d(
    tls_registries: dict[str, Registry], pki: PKI, published: Published, tmp_path: Path
) -> None:
    host = tls_registries["good"].host
    ref = f"{host}/test/small:v1"
    async with Client(ca_file=pki.ca_file) as c:
        assert await pull(c, ref) == published.small_digest
    async with Client(cert_dir=pki.certs_d(tmp_path / "mine")) as c:
        assert await pull(c, ref) == published.small_digest
    # ~/.config/containers/certs.d/HOST:PORT, found without being named.
    pki.certs_d(tmp_path / "home" / ".config" / "containers" / "certs.d" / host)
    async with Client() as c:
        assert await pull(c, ref) == published.small_digest


async def test_ssl_cert_file_is_honoured(
    tls_registries: dict[str, Registry], pki: PKI, published: Published, monkeypatch: Any
) -> None:
    ref = f"{tls_registries['good'].host}/test/small:v1"
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    async with Client() as c:
        assert await pull(c, ref) == published.small_digest


async def test_push_to_a_tls_registry(tls_registries: dict[str, Registry], pki: PKI) -> None:
    img = random.image(64 * 1024, 2, seed=1414)
    ref = f"{tls_registries['good'].host}/tls/pushed:v1"
    async with Client(ca_file=pki.ca_file) as c:
        digest = await c.write(ref, img)
    assert digest == await img.digest()
    async with Client(ca_file=pki.ca_file) as c:
        assert await pull(c, ref) == digest


# --- certificate failures: typed, in plain words, not retried ------------------------------

SLOW_RETRIES = RetryPolicy(attempts=5, backoff=2.0, jitter=0.0)  # a retry would cost ≥ 2 s


async def _fails(client: Client, ref: str) -> TransportError:
    start = time.monotonic()
    with pytest.raises(TransportError) as info:
        await pull(client, ref)
    assert time.monotonic() - start < 1.5, "a TLS failure was retried"
    e = info.value
    assert e.__cause__ is None and e.__suppress_context__
    assert "[SSL" not in str(e) and "Traceback" not in str(e) and "aiohttp" not in str(e)
    return e


async def test_unknown_authority(tls_registries: dict[str, Registry]) -> None:
    host = tls_registries["good"].host
    async with Client(retry=SLOW_RETRIES) as c:
        e = await _fails(c, f"{host}/test/small:v1")
    assert f"TLS with {host} failed: certificate signed by an unknown authority" in str(e)


async def test_wrong_host_name(tls_registries: dict[str, Registry], pki: PKI) -> None:
    host = tls_registries["wrong"].host
    async with Client(ca_file=pki.ca_file, retry=SLOW_RETRIES) as c:
        e = await _fails(c, f"{host}/test/small:v1")
    assert f"TLS with {host} failed: certificate is for wrong.example, not 127.0.0.1" in str(e)


async def test_expired_certificate(tls_registries: dict[str, Registry], pki: PKI) -> None:
    host = tls_registries["expired"].host
    async with Client(ca_file=pki.ca_file, retry=SLOW_RETRIES) as c:
        e = await _fails(c, f"{host}/test/small:v1")
    when = pki.expired.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert f"TLS with {host} failed: certificate expired on {when}" in str(e)


async def test_mutual_tls(
    tls_registries: dict[str, Registry], pki: PKI, published: Published, tmp_path: Path
) -> None:
    host = tls_registries["mutual"].host
    ref = f"{host}/test/small:v1"
    pki.certs_d(tmp_path / "home" / ".config" / "containers" / "certs.d" / host, client=True)
    async with Client() as c:  # the CA and the client pair from ~/.config/containers/certs.d
        assert await pull(c, ref) == published.small_digest
    async with Client(ca_file=pki.ca_file, cert_dir=tmp_path / "empty", retry=SLOW_RETRIES) as c:
        (tmp_path / "empty").mkdir()
        e = await _fails(c, ref)
    assert f"TLS with {host} failed: the registry asked for a client certificate" in str(e)
    stranger, key = pki.stranger
    async with Client(
        ca_file=pki.ca_file, cert_file=stranger, key_file=key, retry=SLOW_RETRIES
    ) as c:
        e = await _fails(c, ref)
    assert f"TLS with {host} failed: the registry refused our client certificate" in str(e)


# --- the CLI ---------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("AIOLAYERCACHE_")}
    e.update(env)
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env=e, check=False
    )


def test_cli_pull_cert_dir_and_ssl_cert_file(
    tls_registries: dict[str, Registry], pki: PKI, tmp_path: Path
) -> None:
    ref = f"{tls_registries['good'].host}/test/small:v1"
    env = {"HOME": str(tmp_path / "home")}
    certs = pki.certs_d(tmp_path / "certs")
    ok = _cli("pull", ref, str(tmp_path / "a"), "--no-cache", "--cert-dir", str(certs), env=env)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "a" / "index.json").is_file()
    ok = _cli(
        "pull",
        ref,
        str(tmp_path / "b"),
        "--no-cache",
        env={**env, "SSL_CERT_FILE": str(pki.ca_file)},
    )
    assert ok.returncode == 0, ok.stderr
    bad = _cli("pull", ref, str(tmp_path / "c"), "--no-cache", env=env)
    assert bad.returncode != 0
    assert "certificate signed by an unknown authority" in bad.stderr
    assert "Traceback" not in bad.stderr


# --- the scheme: HTTPS first, HTTP only for loopback or insecure, found once ------------------


def test_a_public_registry_is_never_downgraded() -> None:
    public = Reference.parse("registry.example.com/app:v1")
    assert schemes_for(public, False) == ("https",)
    assert schemes_for(public, True) == ("https", "http")
    assert schemes_for(Reference.parse("127.0.0.1:5000/app"), False) == ("https", "http")
    assert schemes_for(Reference.parse("localhost:5000/app"), False) == ("https", "http")
    realm = URL("http://auth.example.com/token")
    assert check_target(realm, public, False) == "is not https"
    assert check_target(realm, public, True) is None


async def test_http_fallback_is_probed_once_per_client(
    registry: Registry, published: Published, serve: Any
) -> None:
    counter: Counter = await serve(Counter(int(_port(registry))))
    ref = f"127.0.0.1:{counter.port}/test/small:v1"
    async with Client() as c:
        async with anyio.create_task_group() as tg:
            for _ in range(8):  # concurrent first requests share one probe
                tg.start_soon(pull, c, ref)
        assert await pull(c, ref) == published.small_digest
    assert counter.tls == 1 and counter.plain >= 1
    async with Client() as c:
        await pull(c, ref)
    assert counter.tls == 2


async def test_plain_http_to_a_public_name_is_refused_unless_insecure(
    registry: Registry, published: Published, serve: Any
) -> None:
    counter: Counter = await serve(Counter(int(_port(registry))))
    ref = f"{NAME}:{counter.port}/test/small:v1"
    async with Client(resolver=TestResolver(), retry=SLOW_RETRIES) as c:
        e = await _fails(c, ref)
    assert f"TLS with {NAME}:{counter.port} failed" in str(e) and "speak TLS" in str(e)
    assert (counter.tls, counter.plain) == (1, 0)  # one handshake, no retry, no downgrade
    async with Client(resolver=TestResolver(), insecure=True) as c:
        assert await pull(c, ref) == published.small_digest
    assert counter.tls == 2 and counter.plain >= 1


# --- proxies -----------------------------------------------------------------------------------


def test_proxy_decision() -> None:
    env = {
        "HTTPS_PROXY": "http://user:pa55@proxy.corp:3128",
        "http_proxy": "proxy.corp:8080",
        "NO_PROXY": "internal.corp, .svc.example, 10.0.0.0/8, pinned.example:5000",
    }
    p = proxy_for(URL("https://ghcr.io/v2/"), env)
    assert p is not None and str(p[0]) == "http://proxy.corp:3128"
    assert p[1] == {"Proxy-Authorization": "Basic " + base64.b64encode(b"user:pa55").decode()}
    assert proxy_for(URL("http://mirror.example/v2/"), env) == (URL("http://proxy.corp:8080"), {})
    for bypassed in (
        "https://internal.corp/v2/",
        "https://a.internal.corp/v2/",
        "https://x.svc.example/v2/",
        "https://10.1.2.3:5000/v2/",
        "https://pinned.example:5000/v2/",
    ):
        assert proxy_for(URL(bypassed), env) is None, bypassed
    assert proxy_for(URL("https://pinned.example:6000/v2/"), env) is not None
    assert proxy_for(URL("https://notinternal.corp/v2/"), env) is not None
    for loopback in ("127.0.0.1:5000", "localhost:5000", "[::1]:5000", "reg.localhost"):
        assert proxy_for(URL(f"https://{loopback}/v2/"), env) is None
    assert proxy_for(URL("https://ghcr.io/v2/"), {**env, "NO_PROXY": "*"}) is None
    assert proxy_for(URL("https://ghcr.io/v2/"), {}) is None


async def test_loopback_ignores_a_dead_proxy(
    registry: Registry, published: Published, monkeypatch: Any
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HTTPS_PROXY", dead)
    monkeypatch.setenv("HTTP_PROXY", dead)
    async with Client() as c:
        assert await pull(c, f"{registry.host}/test/small:v1") == published.small_digest


async def test_https_proxy_tunnels_a_public_name(
    tls_registries: dict[str, Registry],
    pki: PKI,
    published: Published,
    serve: Any,
    monkeypatch: Any,
) -> None:
    proxy: ConnectProxy = await serve(ConnectProxy())
    port = _port(tls_registries["good"])
    ref = f"{NAME}:{port}/test/small:v1"
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    async with Client(ca_file=pki.ca_file, resolver=TestResolver()) as c:
        assert await pull(c, ref) == published.small_digest
    assert proxy.connects and set(proxy.connects) == {f"{NAME}:{port}"}
    seen = len(proxy.connects)
    monkeypatch.setenv("NO_PROXY", NAME)
    async with Client(ca_file=pki.ca_file, resolver=TestResolver()) as c:
        assert await pull(c, ref) == published.small_digest
    assert len(proxy.connects) == seen


def test_a_loopback_registry_cannot_send_credentials_to_a_remote_plain_http_realm() -> None:
    loop = Reference.parse("127.0.0.1:5000/x:y")
    assert check_target(URL("http://evil.example:5610/token"), loop, False) is not None
    assert check_target(URL("http://127.0.0.1:5610/token"), loop, False) is None
    assert check_target(URL("https://auth.example/token"), loop, False) is None


async def test_a_fifo_in_cert_dir_is_an_error_not_a_hang(
    tls_registries: dict[str, Registry], tmp_path: Path
) -> None:
    d = tmp_path / "certs"
    d.mkdir()
    os.mkfifo(d / "ca.crt")
    with anyio.fail_after(20), pytest.raises(Exception, match="not a regular file"):
        async with Client(cert_dir=d) as c:
            await pull(c, f"{tls_registries['good'].host}/test/small:v1")
