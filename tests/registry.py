"""Real parts for the remote tests: Debian's docker-registry, a token server, a fault proxy.

Everything listens on loopback addresses only. The registry is the real
distribution 2.8 binary with temp storage; faults come from an aiohttp proxy
in front of it that forwards everything it is not told to break.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import gzip
import json
import os
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from aiolayercache import Hash, Image, ImageIndex

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    proc: subprocess.Popen[bytes]
    host: str  # host:port
    root: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start_registry(
    workdir: Path,
    data: Path,
    auth: dict[str, Any] | None = None,
    *,
    extra: dict[str, Any] | None = None,
) -> Registry:
    """Start ``docker-registry serve`` on a free loopback port; wait for ``/v2/``.

    ``extra`` is merged into the config's top level (``proxy`` for a pull-through
    mirror, ``http`` keys such as ``tls``).
    """
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(data)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }
    if auth:
        config["auth"] = auth
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    cfg = workdir / "config.yml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    log = open(workdir / "registry.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=log, stderr=log)
    tls = config["http"].get("tls")
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/"
    # Readiness only: any TLS answer will do (the test's certificate may be expired or for
    # another name; with ``clientcas`` the handshake itself fails, once the server is up).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"docker-registry exited: {(workdir / 'registry.log').read_text()[-2000:]}"
            )
        try:
            urllib.request.urlopen(url, timeout=1, context=ctx if tls else None)
            break
        except urllib.error.HTTPError:
            break  # 401: up, and asking for auth
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLError):
                break  # a TLS alert (a client certificate wanted): up
            time.sleep(0.05)
        except ssl.SSLError:
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("docker-registry did not answer on /v2/ within 20 s")
    return Registry(proc, f"127.0.0.1:{port}", data)


# --- pushing test images (the registry is the real one; this is a small client) ---------


async def _push_blob(s: aiohttp.ClientSession, base: str, repo: str, h: Hash, data: bytes) -> None:
    async with s.head(f"{base}/v2/{repo}/blobs/{h}") as r:
        if r.status == 200:
            return
    async with s.post(f"{base}/v2/{repo}/blobs/uploads/") as r:
        assert r.status == 202, await r.text()
        loc = r.headers["Location"]
    sep = "&" if "?" in loc else "?"
    url = loc if loc.startswith("http") else base + loc
    async with s.put(
        f"{url}{sep}digest={h}",
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    ) as r:
        assert r.status == 201, await r.text()


async def _push_manifest(
    s: aiohttp.ClientSession, base: str, repo: str, ref: str, raw: bytes, media_type: str
) -> None:
    async with s.put(
        f"{base}/v2/{repo}/manifests/{ref}", data=raw, headers={"Content-Type": media_type}
    ) as r:
        assert r.status == 201, await r.text()


async def push_image(host: str, repo: str, tag: str | None, img: Image) -> Hash:
    """Push a random (in-memory) image; returns its digest."""
    base = f"http://{host}"
    blobs: dict[Hash, bytes] = img._blobs.blobs  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as s:
        for h, data in blobs.items():
            await _push_blob(s, base, repo, h, data)
        raw = await img.raw_manifest()
        digest = await img.digest()
        await _push_manifest(s, base, repo, tag or str(digest), raw, await img.media_type())
        if tag:
            await _push_manifest(s, base, repo, str(digest), raw, await img.media_type())
    return digest


async def push_index(host: str, repo: str, tag: str, ii: ImageIndex) -> Hash:
    """Push a random index: every blob, every child manifest by digest, then the index."""
    base = f"http://{host}"
    store = ii._blobs  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as s:
        for h, data in store.blobs.items():
            await _push_blob(s, base, repo, h, data)
        im = await ii.index_manifest()
        for d in im.manifests:
            await _push_manifest(
                s, base, repo, str(d.digest), store.manifests[d.digest], d.media_type
            )
        await _push_manifest(s, base, repo, tag, await ii.raw_manifest(), await ii.media_type())
    return await ii.digest()


# --- a server in a background thread (so sync fixtures can own it) ---------------------


class BackgroundServer:
    """An aiohttp app served on its own event loop in a thread, at ``host:port``."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host
        self.port = free_port(host)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, self.host, self.port).start()

        self.loop.run_until_complete(start())
        self._ready.set()
        self.loop.run_forever()
        assert self._runner is not None
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    def start(self) -> BackgroundServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("server did not start")
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


# --- token server ------------------------------------------------------------------------


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class TokenServer:
    """Issues RS256 JWTs the real registry trusts (its cert is the registry's root bundle)."""

    def __init__(self, workdir: Path, users: dict[str, str]) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aiolayercache test token")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        workdir.mkdir(parents=True, exist_ok=True)
        self.bundle = workdir / "token-root.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._der = self.cert.public_bytes(serialization.Encoding.DER)
        self.users = users
        self.requests = 0
        self.field = "token"  # or "access_token"
        self.expires_in: int | None = 300
        self.issuer = "aiolayercache-test-issuer"
        # Misbehaviours for the next requests, one per request (tests/reliability):
        # ("status", code), ("body", bytes) (HTML content type), ("chunked", bytes),
        # ("json", object), ("redirect", "host:port").
        self.script: list[tuple[str, Any]] = []
        self.seen_auth: list[str] = []  # the Authorization header of each request ("" if none)
        self.extra: dict[str, Any] = {}  # fields added to, or replacing, each token body
        self.service = "aiolayercache-test-registry"
        app = web.Application()
        app.router.add_get("/token", self.handle)
        self.server = BackgroundServer(app)

    @property
    def realm(self) -> str:
        return f"http://{self.server.address}/token"

    def registry_auth(self) -> dict[str, Any]:
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.bundle),
            }
        }

    async def _misbehave(self, request: web.Request, kind: str, arg: Any) -> web.StreamResponse:
        if kind == "status":
            return web.json_response({"details": "injected"}, status=arg)
        if kind == "body":
            return web.Response(body=arg, content_type="text/html")
        if kind == "json":
            return web.json_response(arg)
        if kind == "redirect":
            return web.Response(status=307, headers={"Location": f"http://{arg}{request.path_qs}"})
        if kind == "chunked":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(arg), 64 * 1024):
                await resp.write(arg[i : i + 64 * 1024])
            await resp.write_eof()
            return resp
        raise ValueError(f"unknown token server misbehaviour {kind!r}")

    def _sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._der).decode()]}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.seen_auth.append(request.headers.get("Authorization", ""))
        if self.script:
            kind, arg = self.script.pop(0)
            return await self._misbehave(request, kind, arg)
        user = ""
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(user) != pw:
                return web.json_response({"details": "bad credentials"}, status=401)
        elif self.users:
            return web.json_response({"details": "credentials required"}, status=401)
        access = []
        for scope in request.query.getall("scope", []):
            typ, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": typ, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": request.query.get("service", ""),
            "exp": now + 600,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        body: dict[str, Any] = {self.field: self._sign(claims)}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        body.update(self.extra)
        return web.json_response(body)


# --- fault proxy -------------------------------------------------------------------------


Fault = Callable[[web.Request], Any]
_HOP_HEADERS = ("content-length", "transfer-encoding", "content-encoding", "connection", "date")


@dataclass
class Rule:
    """Apply ``fault`` to the next ``times`` requests whose path contains ``match``."""

    match: str
    fault: str
    times: int = 1
    arg: Any = None
    method: str | None = "GET"


@dataclass
class ProxyStats:
    requests: Counter[str] = field(default_factory=Counter)
    blob_bytes: int = 0
    range_headers: list[str] = field(default_factory=list)
    authorization_seen: list[str] = field(default_factory=list)
    manifest_bytes: int = 0  # bodies of GET .../manifests/... answered
    streamed: int = 0  # bytes sent by the "stream" fault


class FaultProxy:
    """An aiohttp reverse proxy in front of the registry that breaks what it is told to.

    Faults: ``status`` (answer ``arg`` = (code, headers) without forwarding),
    ``cut`` (send ``arg`` bytes of the body, then drop the connection),
    ``cut_chunked`` (the same, chunked), ``short_chunked`` (end a chunked body
    cleanly after ``arg`` bytes), ``no_range`` (forward without the Range
    header), ``bad_range`` (answer a Range with a 206 starting elsewhere),
    ``flip`` (same length, one byte changed), ``stall`` (sleep ``arg`` s before
    the body), ``redirect`` (307 to the origin ``arg``), ``gzip`` (send the body
    gzip-encoded), ``body`` (replace the body with ``arg``, keep headers),
    ``header`` (set headers ``arg`` on the forwarded response), ``drop_upload``
    (read ``arg`` bytes of the request body, then hang up), ``delay``
    (sleep ``arg`` s before forwarding: added latency; give it a large
    ``times`` and ``method=None`` to delay every request).
    """

    def __init__(
        self,
        upstream: str,
        host: str = "127.0.0.1",
        *,
        upstream_auth: str | None = None,
        reject_auth: bool = False,
    ) -> None:
        self.upstream = upstream
        self.upstream_auth = upstream_auth  # what a presigned URL would grant
        self.reject_auth = reject_auth  # answer 400 to any Authorization, as S3 does
        self.rules: list[Rule] = []
        self.stats = ProxyStats()
        app = web.Application(client_max_size=1 << 30)  # uploads pass through
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = BackgroundServer(app, host)
        self._session: aiohttp.ClientSession | None = None

    @property
    def address(self) -> str:
        return self.server.address

    def reset(self) -> None:
        self.rules.clear()
        self.stats = ProxyStats()

    def add(
        self, match: str, fault: str, arg: Any = None, times: int = 1, method: str | None = "GET"
    ):
        self.rules.append(Rule(match, fault, times, arg, method))

    def _take(self, request: web.Request) -> Rule | None:
        for r in self.rules:
            if r.times > 0 and r.match in request.path and r.method in (None, request.method):
                r.times -= 1
                return r
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        self.stats.requests[f"{request.method} {request.path}"] += 1
        if "Range" in request.headers:
            self.stats.range_headers.append(request.headers["Range"])
        if "Authorization" in request.headers:
            self.stats.authorization_seen.append(request.path)
        if self.reject_auth and "Authorization" in request.headers:
            return web.Response(status=400, text="two auth mechanisms")
        rule = self._take(request)
        fault = rule.fault if rule else None
        if fault == "status":  # arg = (code, headers[, error code])
            code, headers, *more = rule.arg  # type: ignore[union-attr]
            return web.json_response(
                {"errors": [{"code": more[0] if more else "UNAVAILABLE", "message": "injected"}]},
                status=code,
                headers=headers,
            )
        if fault == "drop_upload":  # read arg bytes of the request body, then hang up
            await request.content.read(rule.arg)  # type: ignore[union-attr]
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)
        if fault == "redirect":
            location = f"http://{rule.arg}{request.path_qs}"  # type: ignore[union-attr]
            return web.Response(status=307, headers={"Location": location})
        # Host is kept: the registry builds upload Locations from it, so uploads come
        # back through this proxy as they would through a load balancer.
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding")
        }
        if fault == "no_range":
            headers.pop("Range", None)
        if self.upstream_auth:
            headers["Authorization"] = self.upstream_auth
        body = await request.read()
        if fault == "delay":
            await asyncio.sleep(rule.arg)  # type: ignore[union-attr]
        async with self._session.request(
            request.method,
            f"http://{self.upstream}{request.path_qs}",
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as up:
            data = await up.read()
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP_HEADERS}
            status = up.status
        if "/blobs/" in request.path and request.method == "GET":
            self.stats.blob_bytes += len(data)
        if "/manifests/" in request.path and request.method == "GET":
            self.stats.manifest_bytes += len(data)
        if fault == "header":
            out_headers.update(rule.arg)  # type: ignore[union-attr]
        if fault == "body":
            data = rule.arg  # type: ignore[union-attr]
        if fault == "flip":
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        if fault == "bad_range":
            status = 206
            out_headers["Content-Range"] = f"bytes 5-{len(data) - 1}/{len(data)}"
            data = data[5:]
        if fault == "gzip":
            data = gzip.compress(data)
            out_headers["Content-Encoding"] = "gzip"
        more = await self._more_faults(request, rule, status, out_headers, data)
        if more is not None:
            return more
        if fault == "stall":
            await asyncio.sleep(rule.arg)  # type: ignore[union-attr]
        if fault == "throttle":  # send the body slowly: arg = seconds between 64 KiB pieces
            resp = web.StreamResponse(status=status, headers=out_headers)
            resp.content_length = len(data)
            await resp.prepare(request)
            for i in range(0, len(data), 64 * 1024):
                await resp.write(data[i : i + 64 * 1024])
                await asyncio.sleep(rule.arg)  # type: ignore[union-attr]
            await resp.write_eof()
            return resp
        if fault == "pause":
            # arg = (n, reached, release), two threading.Events: send the headers and n
            # bytes, set `reached` ("offset reached"), hold the rest until `release` is
            # set or the client is gone (a test killed it), at most 60 s.
            n, reached, release = rule.arg  # type: ignore[union-attr]
            resp = web.StreamResponse(status=status, headers=out_headers)
            resp.content_length = len(data)
            await resp.prepare(request)  # a StreamResponse sends its headers at once
            await resp.write(data[:n])
            reached.set()
            deadline = time.monotonic() + 60
            while not release.is_set() and time.monotonic() < deadline:
                if request.transport is None or request.transport.is_closing():
                    return resp
                await asyncio.sleep(0.01)
            try:
                await resp.write(data[n:])
                await resp.write_eof()
            except ConnectionResetError:
                pass  # the client died just before the release
            return resp
        if fault in ("cut", "cut_chunked", "short_chunked"):
            n = rule.arg  # type: ignore[union-attr]
            resp = web.StreamResponse(status=status, headers=out_headers)
            if fault == "cut":
                resp.content_length = len(data)
            else:
                resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(data[:n])
            if fault == "short_chunked":
                await resp.write_eof()
                return resp
            await asyncio.sleep(0.01)
            assert request.transport is not None
            request.transport.close()
            return resp
        return web.Response(status=status, body=data, headers=out_headers)

    async def _more_faults(
        self,
        request: web.Request,
        rule: Rule | None,
        status: int,
        out_headers: dict[str, str],
        data: bytes,
    ) -> web.StreamResponse | None:
        """Faults for tests/reliability; None to go on with the forwarded response.

        ``drop_header`` (remove the headers named in ``arg``), ``add_headers``
        (``arg`` = [(name, value), ...], repeats allowed, replacing those names),
        ``content_length``
        (cut or pad the body by ``arg`` bytes; Content-Length agrees with what is
        sent), ``chunked`` (send the body, or ``arg``, chunked: no Content-Length),
        ``content_range`` (answer 206 with Content-Range ``arg``; None: no
        Content-Range; "multipart": a multipart/byteranges Content-Type instead),
        ``encoding`` (Content-Encoding ``arg``; gzip and deflate bodies are encoded,
        others sent as they are), ``rst`` (send ``arg`` bytes of a fixed-length body,
        then reset the connection: SO_LINGER 0 and close), ``stall_mid`` (``arg`` =
        (n, s): send n bytes, then nothing for s seconds, then the rest), ``stream``
        (``arg`` = (size, length): ``size`` generated bytes in 64 KiB pieces, with
        Content-Length ``length``, or chunked when it is None; when ``length`` is
        less than ``size`` the bytes past it follow on the connection anyway (a lying
        Content-Length); stops when the client goes away; counted in ``stats.streamed``).
        """
        if rule is None:
            return None
        fault, arg = rule.fault, rule.arg
        if fault == "drop_header":
            for name in arg:
                for k in [k for k in out_headers if k.lower() == name.lower()]:
                    del out_headers[k]
            return None
        if fault == "add_headers":
            names = {k.lower() for k, _ in arg}
            multi = CIMultiDict((k, v) for k, v in out_headers.items() if k.lower() not in names)
            for k, v in arg:
                multi.add(k, v)
            return web.Response(status=status, body=data, headers=multi)
        if fault == "content_length":
            body = data[: len(data) + arg] if arg < 0 else data + b"\0" * arg
            return web.Response(status=status, body=body, headers=out_headers)
        if fault == "content_range":
            for k in [k for k in out_headers if k.lower() == "content-range"]:
                del out_headers[k]
            if arg == "multipart":
                out_headers["Content-Type"] = "multipart/byteranges; boundary=aiolayercache"
            elif arg is not None:
                out_headers["Content-Range"] = arg
            return web.Response(status=206, body=data, headers=out_headers)
        if fault == "encoding":
            body = {"gzip": gzip.compress, "deflate": zlib.compress}.get(arg, bytes)(data)
            out_headers["Content-Encoding"] = arg
            return web.Response(status=status, body=body, headers=out_headers)
        if fault not in ("chunked", "rst", "stall_mid", "stream"):
            return None
        resp = web.StreamResponse(status=status, headers=out_headers)
        try:
            if fault == "chunked":
                body = data if arg is None else arg
                resp.enable_chunked_encoding()
                await resp.prepare(request)
                for i in range(0, len(body), 64 * 1024):
                    await resp.write(body[i : i + 64 * 1024])
            elif fault == "rst":
                resp.content_length = len(data)
                await resp.prepare(request)
                await resp.write(data[:arg])
                await asyncio.sleep(0.05)  # let the client read what was sent
                assert request.transport is not None
                sock = request.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                request.transport.close()
                return resp
            elif fault == "stall_mid":
                n, seconds = arg
                resp.content_length = len(data)
                await resp.prepare(request)
                await resp.write(data[:n])
                await asyncio.sleep(seconds)
                await resp.write(data[n:])
            else:
                size, length = arg
                if length is None:
                    resp.enable_chunked_encoding()
                else:
                    resp.content_length = length
                await resp.prepare(request)
                piece = bytes(range(256)) * 256
                sent = 0
                while sent < size:
                    if request.transport is None or request.transport.is_closing():
                        return resp
                    n = min(len(piece), size - sent)
                    if length is not None and sent >= length:
                        request.transport.write(piece[:n])  # past the Content-Length
                        await asyncio.sleep(0)
                    else:
                        await resp.write(piece[:n])
                    sent += n
                    self.stats.streamed += n
            await resp.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            pass  # the client went away, as it may
        return resp

    def start(self) -> FaultProxy:
        self.server.start()
        return self

    def stop(self) -> None:
        if self._session is not None:
            fut = asyncio.run_coroutine_threadsafe(self._session.close(), self.server.loop)
            fut.result(5)
        self.server.stop()


@contextlib.contextmanager
def running_proxy(upstream: str, **options: Any) -> Iterator[FaultProxy]:
    """The one way tests get a fault proxy: started in front of ``upstream``, stopped after."""
    px = FaultProxy(upstream, **options).start()
    try:
        yield px
    finally:
        px.stop()


def htpasswd(path: Path, users: dict[str, str]) -> None:
    import bcrypt

    lines = [
        f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for u, p in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")


def registry_available() -> bool:
    return os.path.exists(REGISTRY_BIN)
