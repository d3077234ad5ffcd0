"""The registry client: one aiohttp session, auth, retries, manifests and resumable blobs."""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import logging
import math
import platform as _platform
import random as _random
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import anyio
from anyio.abc import ByteReceiveStream
from yarl import URL

from .. import partial
from .._errors import DigestMismatchError, ManifestError, SizeMismatchError
from .._hash import Hash
from .._protocols import Image, ImageIndex
from .._types import (
    MAX_DOCUMENT_BYTES,
    Descriptor,
    IndexManifest,
    MediaType,
    Platform,
    is_image_type,
    is_index_type,
)
from ..streams import CHUNK_SIZE, ChunkStream, VerifyingStream
from ._auth import Challenge, Credentials, load_docker_config, parse_challenges
from ._errors import PlatformNotFoundError, RemoteError, TransportError, UnauthorizedError
from ._reference import Reference

__all__ = ["Client", "RemoteDescriptor", "RetryPolicy", "host_platform"]

log = logging.getLogger("aiolayercache.remote")

MAX_TOKEN_BYTES = 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
MAX_REDIRECTS = 5

MANIFEST_ACCEPT = ", ".join(
    [
        MediaType.OCI_IMAGE_INDEX,
        MediaType.OCI_MANIFEST_SCHEMA1,
        MediaType.DOCKER_MANIFEST_LIST,
        MediaType.DOCKER_MANIFEST_SCHEMA2,
        f"{MediaType.DOCKER_MANIFEST_SCHEMA1_SIGNED};q=0.1",
        f"{MediaType.DOCKER_MANIFEST_SCHEMA1};q=0.1",
    ]
)
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_NET_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, OSError)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_TOKEN_VALUE = re.compile(r"[\x21-\x7e]+")


def redact(url: URL | str) -> str:
    """``url`` without user info and query string (presigned URLs carry secrets there)."""
    u = URL(str(url))
    if u.user or u.password:
        u = u.with_user(None)
    if u.query_string:
        return str(u.with_query(None)) + "?<redacted>"
    return str(u)


def host_platform() -> Platform:
    """This machine's platform as docker names it (``linux/amd64``, ``linux/arm64/v8``, …)."""
    machine = _platform.machine().lower()
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
    system = _platform.system().lower() or "linux"
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


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often idempotent requests are tried again.

    ``attempts`` tries in all per request, with exponential backoff from
    ``backoff`` seconds (times ``factor``, at most ``max_backoff``, plus up to
    ``jitter`` of it at random). A ``Retry-After`` is honoured up to
    ``retry_after_cap`` seconds. A blob cut off mid-stream is resumed at most
    ``resumes`` times in all, and given up when two resumes in a row made no
    progress. Retries to one registry share ``retry_budget`` tokens across
    every task of the client: each retry spends one, each answered request
    (not 408/429/5xx) refunds ``retry_refund``; with none left, a request
    fails at its first error, so a thousand tasks in a 5xx storm send about
    a thousand requests plus the budget, not a thousand times ``attempts``.
    A quota 429 (``ratelimit-remaining: 0`` with a wait past
    ``retry_after_cap``) is not retried.
    """

    attempts: int = 5
    backoff: float = 0.5
    factor: float = 2.0
    max_backoff: float = 10.0
    jitter: float = 0.25
    retry_after_cap: float = 60.0
    resumes: int = 10
    retry_budget: float = 10.0
    retry_refund: float = 0.2

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            # Capped, then jittered: tasks told the same Retry-After do not return in step.
            base = max(0.0, min(retry_after, self.retry_after_cap))
        else:
            base = min(self.max_backoff, self.backoff * self.factor**attempt)
        return base + base * self.jitter * _random.random()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (seconds or HTTP-date); None if unusable."""
    if not value:
        return None
    v = value.strip()
    try:
        secs = float(v)
    except ValueError:
        pass
    else:
        if secs != secs or secs < 0:  # NaN or negative
            return None
        return secs
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)


def _codes(body: bytes) -> tuple[list[str], str]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return [], ""
    codes, messages = [], []
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
        for e in doc["errors"][:20]:
            if isinstance(e, dict):
                if isinstance(e.get("code"), str):
                    codes.append(e["code"][:100])
                if isinstance(e.get("message"), str):
                    messages.append(e["message"][:300])
    return codes, "; ".join(messages)


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host literal names as the resolver reads it, or None for a name.

    Covers what ``ipaddress`` alone misses: the legacy IPv4 forms the C resolver
    accepts (``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``,
    ``169.254.43518``) and IPv4-mapped IPv6 (``::ffff:169.254.169.254``).
    """
    h = host.strip("[]").split("%", 1)[0]
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(h)
    except ValueError:
        if not h or not all(c.isalnum() or c == "." for c in h) or not h[0].isdigit():
            return None
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(h))
        except (OSError, ValueError):
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_link_local(host: str) -> bool:
    ip = _literal_ip(host)
    if ip is None:
        return False
    return ip.is_link_local or ip.is_multicast or ip.is_unspecified


def _is_private(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    ip = _literal_ip(h)
    if ip is None:
        return False
    return ip.is_private or ip.is_loopback


def _origin(u: URL) -> tuple[str, str, int | None]:
    return (u.scheme, u.host or "", u.port)


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, what: str) -> bytes:
    if resp.content_length is not None and resp.content_length > cap:
        raise RemoteError(
            f"{what}: {resp.content_length} bytes is over the {cap}-byte cap",
            method=resp.method,
            url=redact(resp.url),
            status=resp.status,
        )
    buf = bytearray()
    while True:
        data = await resp.content.read(min(CHUNK_SIZE, cap + 1 - len(buf)))
        if not data:
            return bytes(buf)
        buf += data
        if len(buf) > cap:
            raise RemoteError(
                f"{what}: body is over the {cap}-byte cap",
                method=resp.method,
                url=redact(resp.url),
                status=resp.status,
            )


class _Token:
    __slots__ = ("expires", "value")

    def __init__(self, value: str, expires: float) -> None:
        self.value = value
        self.expires = expires


class Client:
    """A registry client: one pooled aiohttp session, tokens cached per scope, retries.

    Use as an async context manager (``async with remote.Client() as c``) or
    close with :meth:`aclose`. ``credentials`` maps registry names
    (``ghcr.io``, ``localhost:5000``, ``docker.io``) to :class:`Credentials`
    (or is one, for every registry); ``docker_config`` reads
    ``~/.docker/config.json`` / ``$DOCKER_CONFIG`` for registries not given
    explicitly. Plain HTTP is used for loopback registries and when
    ``insecure`` is true; HTTPS otherwise.
    """

    def __init__(
        self,
        *,
        credentials: Mapping[str, Credentials] | Credentials | None = None,
        docker_config: bool = True,
        insecure: bool = False,
        retry: RetryPolicy | None = None,
        limit_per_host: int = 16,
        connect_timeout: float = 30.0,
        read_timeout: float = 60.0,
        user_agent: str = "aiolayercache/0.1",
    ) -> None:
        self._credentials = credentials
        self._docker_config = docker_config
        self.insecure = insecure
        self.retry = retry or RetryPolicy()
        self._limit_per_host = limit_per_host
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._token_locks: dict[tuple[str, str], anyio.Lock] = {}
        self._creds_cache: dict[str, Credentials] = {}
        self._budget: dict[str, float] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<remote.Client insecure={self.insecure} tokens={len(self._tokens)}>"

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            s, self._session = self._session, None
            await s.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("this remote.Client is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=self._limit_per_host)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers={"User-Agent": self._user_agent},
                auto_decompress=True,
                trust_env=False,
            )
        return self._session

    # --- credentials and tokens ----------------------------------------------------

    def _creds(self, registry: str) -> Credentials:
        if registry in self._creds_cache:
            return self._creds_cache[registry]
        c: Credentials | None = None
        if isinstance(self._credentials, Credentials):
            c = self._credentials
        elif self._credentials is not None:
            c = self._credentials.get(registry)
        if c is None and self._docker_config:
            c = load_docker_config(registry)
        c = c or Credentials()
        self._creds_cache[registry] = c
        return c

    def _scheme(self, ref: Reference) -> str:
        return "http" if self.insecure or ref.is_loopback else "https"

    def _check_realm(self, ref: Reference, realm: str) -> URL:
        try:
            u = URL(realm)
        except ValueError:
            raise UnauthorizedError(f"{ref.context}: bad token realm") from None
        if u.scheme not in ("http", "https") or not u.host:
            raise UnauthorizedError(f"{ref.context}: token realm {redact(u)} is not an http(s) URL")
        if u.scheme == "http" and not (self.insecure or ref.is_loopback):
            raise UnauthorizedError(f"{ref.context}: token realm {redact(u)} is not https")
        if u.user or u.password:
            raise UnauthorizedError(f"{ref.context}: token realm carries user info")
        if _is_link_local(u.host):
            raise UnauthorizedError(f"{ref.context}: token realm {redact(u)} is link-local")
        if _is_private(u.host) and not _is_private(ref.host):
            raise UnauthorizedError(
                f"{ref.context}: token realm {redact(u)} is private but the registry is not"
            )
        return u

    async def _token(self, ref: Reference, ch: Challenge, scope: str, stale: str | None) -> str:
        key = (ref.endpoint, scope)
        lock = self._token_locks.setdefault(key, anyio.Lock())
        async with lock:
            tok = self._tokens.get(key)
            fresh = tok is not None and tok.expires > time.monotonic()
            if tok is not None and fresh and f"Bearer {tok.value}" != stale:
                return tok.value
            tok = await self._fetch_token(ref, ch, scope)
            self._tokens[key] = tok
            return tok.value

    async def _fetch_token(self, ref: Reference, ch: Challenge, scope: str) -> _Token:
        realm = ch.params.get("realm")
        if not realm:
            raise UnauthorizedError(f"{ref.context}: bearer challenge without a realm")
        url = self._check_realm(ref, realm)
        creds = self._creds(ref.registry)
        query: dict[str, str] = {}
        if ch.params.get("service"):
            query["service"] = ch.params["service"]
        query["scope"] = scope
        headers: dict[str, str] = {}
        if creds.identity_token:
            form = dict(query)
            form.update(
                grant_type="refresh_token",
                refresh_token=creds.identity_token,
                client_id="aiolayercache",
            )
            resp = await self._send("POST", url, headers=headers, data=form, registry=ref)
        else:
            if not creds.empty:
                headers["Authorization"] = creds.basic()
            resp = await self._send("GET", url.update_query(query), headers=headers, registry=ref)
        async with resp:
            if resp.status in (401, 403):
                raise UnauthorizedError(
                    f"{ref.context}: token server refused"
                    f"{' the credentials' if not creds.empty else ' anonymous access'}",
                    method=resp.method,
                    url=redact(resp.url),
                    status=resp.status,
                )
            if resp.status != 200:
                raise await self._error(resp, f"{ref.context}: token request failed")
            body = await _read_capped(resp, MAX_TOKEN_BYTES, "token response")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            doc = None
        value = None
        if isinstance(doc, dict):
            value = doc.get("token") or doc.get("access_token")
        if not isinstance(value, str) or not value:
            raise UnauthorizedError(
                f"{ref.context}: token response has no token", url=redact(url), status=200
            )
        if not _TOKEN_VALUE.fullmatch(value):
            # It goes into an Authorization header: no spaces, controls or non-ASCII.
            raise UnauthorizedError(
                f"{ref.context}: token response has a malformed token", url=redact(url), status=200
            )
        expires_in = doc.get("expires_in") if isinstance(doc, dict) else None
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
            expires_in = 60
        try:
            expires_in = float(expires_in)
        except OverflowError:  # an int too big for a float
            expires_in = 60.0
        if not math.isfinite(expires_in):
            expires_in = 60.0
        expires_in = max(expires_in, 60.0)
        # Refresh a little before the server's expiry.
        return _Token(value, time.monotonic() + expires_in * 0.9 - 5)

    async def _auth_header(self, ref: Reference, scope: str, stale: str | None) -> str | None:
        ch = self._challenges.get(ref.endpoint)
        if ch is None:
            return None
        if ch.scheme == "bearer":
            return "Bearer " + await self._token(ref, ch, scope, stale)
        if ch.scheme == "basic":
            creds = self._creds(ref.registry)
            if creds.empty:
                return None
            return creds.basic()
        return None

    # --- sending -------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: URL,
        *,
        headers: Mapping[str, str],
        registry: Reference,
        data: Any = None,
        retry_statuses: frozenset[int] = _RETRY_STATUSES,
    ) -> aiohttp.ClientResponse:
        """Send with retries on network errors and retryable statuses; redirects by hand.

        The caller owns (and must close) the response, whatever its status.
        """
        session = self._get_session()
        policy = self.retry
        last_exc: BaseException | None = None
        for attempt in range(policy.attempts):
            try:
                resp = await self._send_following(session, method, url, headers, registry, data)
            except aiohttp.ClientResponseError as exc:
                # A response aiohttp cannot parse (status line, oversized header, an
                # encoding it cannot decode). ``from None``: its request info holds headers.
                raise RemoteError(
                    f"malformed response: {exc.message}", method=method, url=redact(url)
                ) from None
            except _NET_ERRORS as exc:
                if isinstance(exc, RemoteError):
                    raise
                last_exc = exc
                if attempt + 1 >= policy.attempts or not self._spend(registry):
                    break
                delay = policy.delay(attempt)
                log.debug("%s %s: %s; retrying in %.2fs", method, redact(url), exc, delay)
                await anyio.sleep(delay)
                continue
            except aiohttp.ClientError as exc:  # an URL aiohttp refuses (a redirect's target)
                detail = getattr(exc, "description", None) or type(exc).__name__
                raise RemoteError(
                    f"request failed: {detail}", method=method, url=redact(url)
                ) from None
            if resp.status not in retry_statuses:
                self._refund(registry)
            if resp.status in retry_statuses and attempt + 1 < policy.attempts:
                ra = parse_retry_after(resp.headers.get("Retry-After"))
                quota = resp.headers.get("ratelimit-remaining", "").strip().startswith("0")
                if resp.status == 429 and quota and (ra is None or ra > policy.retry_after_cap):
                    return resp  # an exhausted quota: waiting the cap out would not help
                if not self._spend(registry):
                    return resp  # the registry's shared retry budget is spent
                delay = policy.delay(attempt, ra)
                resp.release()
                log.debug(
                    "%s %s: HTTP %d; retrying in %.2fs", method, redact(url), resp.status, delay
                )
                await anyio.sleep(delay)
                continue
            return resp
        raise TransportError(
            f"no response after {attempt + 1} attempts: {type(last_exc).__name__}: {last_exc}",
            method=method,
            url=redact(url),
        ) from last_exc

    def _spend(self, registry: Reference) -> bool:
        """Take one retry from the registry's shared budget; False when none is left."""
        left = self._budget.get(registry.endpoint, self.retry.retry_budget)
        if left < 1:
            return False
        self._budget[registry.endpoint] = left - 1
        return True

    def _refund(self, registry: Reference) -> None:
        left = self._budget.get(registry.endpoint)
        if left is not None:
            self._budget[registry.endpoint] = min(
                self.retry.retry_budget, left + self.retry.retry_refund
            )

    async def _send_following(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        registry: Reference,
        data: Any,
    ) -> aiohttp.ClientResponse:
        start = url
        hdrs = dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            resp = await session.request(
                method, url, headers=hdrs, data=data, allow_redirects=False
            )
            if resp.status not in (301, 302, 303, 307, 308) or method not in ("GET", "HEAD"):
                return resp
            location = resp.headers.get("Location")
            resp.release()
            if not location:
                raise RemoteError("redirect without Location", method=method, url=redact(url))
            try:
                nxt = url.join(URL(location))
            except ValueError:
                raise RemoteError(
                    "redirect to a malformed Location", method=method, url=redact(url)
                ) from None
            if nxt.scheme not in ("http", "https") or not nxt.host:
                raise RemoteError(
                    f"refusing redirect to {redact(nxt)}", method=method, url=redact(url)
                )
            if _is_link_local(nxt.host):
                raise RemoteError(
                    f"refusing redirect to link-local address {redact(nxt)}",
                    method=method,
                    url=redact(url),
                )
            if _is_private(nxt.host) and not _is_private(registry.host):
                raise RemoteError(
                    f"refusing redirect from a public registry to private address {redact(nxt)}",
                    method=method,
                    url=redact(url),
                )
            if _origin(nxt) != _origin(start):
                # Credentials never follow a redirect to another origin.
                hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
            url = nxt
        raise RemoteError(f"more than {MAX_REDIRECTS} redirects", method=method, url=redact(start))

    async def _error(self, resp: aiohttp.ClientResponse, message: str) -> RemoteError:
        try:
            body = await _read_capped(resp, MAX_ERROR_BYTES, "error body")
        except (RemoteError, *_NET_ERRORS):
            body = b""
        codes, detail = _codes(body)
        cls = UnauthorizedError if resp.status in (401, 403) else RemoteError
        return cls(
            f"{message}{': ' + detail if detail else ''}",
            method=resp.method,
            url=redact(resp.url),
            status=resp.status,
            codes=codes,
        )

    async def _request(
        self,
        ref: Reference,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        what: str,
    ) -> aiohttp.ClientResponse:
        """A registry API request with auth; raises a typed error unless the status is ``ok``."""
        url = URL.build(scheme=self._scheme(ref), authority=ref.endpoint, path=path, encoded=True)
        scope = f"repository:{ref.repository}:pull"
        sent: str | None = None
        for _ in range(2):
            hdrs = dict(headers or {})
            auth = await self._auth_header(ref, scope, sent)
            if auth:
                hdrs["Authorization"] = auth
            resp = await self._send(method, url, headers=hdrs, registry=ref)
            if resp.status == 401 and sent is None:
                challenges = parse_challenges(
                    ", ".join(resp.headers.getall("WWW-Authenticate", []))
                )
                ch = next((c for c in challenges if c.scheme == "bearer"), None) or next(
                    (c for c in challenges if c.scheme == "basic"), None
                )
                if ch is not None:
                    resp.release()
                    self._challenges[ref.endpoint] = ch
                    sent = auth or ""
                    continue
            if resp.status in ok:
                return resp
            try:
                raise await self._error(resp, f"{what} failed")
            finally:
                resp.release()
        raise AssertionError("unreachable")  # pragma: no cover

    # --- manifests -----------------------------------------------------------------

    async def _manifest(
        self, ref: Reference, identifier: str, expect: Hash | None
    ) -> tuple[bytes, str, Hash]:
        path = f"/v2/{ref.repository}/manifests/{identifier}"
        resp = await self._request(
            ref, "GET", path, headers={"Accept": MANIFEST_ACCEPT}, what=f"manifest {ref}"
        )
        async with resp:
            try:
                raw = await _read_capped(resp, MAX_DOCUMENT_BYTES, f"manifest {ref}")
            except _NET_ERRORS as exc:
                raise TransportError(
                    f"reading manifest {ref}: {exc}", url=redact(resp.url)
                ) from exc
            content_type = resp.content_type or ""
        algorithm = expect.algorithm if expect is not None else "sha256"
        digest = Hash.of(raw, algorithm)
        if expect is not None and digest != expect:
            raise DigestMismatchError(f"manifest {ref}", expect, digest)
        return raw, _media_type(raw, content_type, str(ref)), digest

    async def get(self, ref: str | Reference) -> RemoteDescriptor:
        """Fetch the manifest or index ``ref`` names; the result can become either."""
        r = Reference.parse(ref) if isinstance(ref, str) else ref
        raw, media_type, digest = await self._manifest(r, r.identifier, r.digest)
        desc = Descriptor(media_type=media_type, size=len(raw), digest=digest)
        return RemoteDescriptor(self, r, desc, raw)

    async def image(self, ref: str | Reference, *, platform: Platform | str | None = None) -> Image:
        """The image ``ref`` names; an index is resolved to ``platform`` (default: this host)."""
        return await (await self.get(ref)).image(platform=platform)

    async def index(self, ref: str | Reference) -> ImageIndex:
        """The index ``ref`` names (a ``ManifestError`` if it is an image)."""
        return (await self.get(ref)).index()

    # --- blobs ---------------------------------------------------------------------

    async def open_blob(self, ref: Reference, desc: Descriptor) -> ByteReceiveStream:
        """A stream of blob ``desc``: verified against digest and size, resumed when cut."""
        stream = _BlobStream(self, ref, desc)
        await stream.start()
        return VerifyingStream(
            stream, desc.digest, desc.size, what=f"blob {ref.context}@{desc.digest}"
        )

    async def _open_blob_response(
        self, ref: Reference, desc: Descriptor, offset: int
    ) -> aiohttp.ClientResponse:
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        return await self._request(
            ref,
            "GET",
            f"/v2/{ref.repository}/blobs/{desc.digest}",
            headers=headers,
            ok=(200, 206),
            what=f"blob {ref.context}@{desc.digest}",
        )


def _media_type(raw: bytes, content_type: str, what: str) -> str:
    """The manifest's media type from Content-Type and body; refuse schema 1 and conflicts."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ManifestError(f"manifest {what}: not valid JSON") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"manifest {what}: not a JSON object")
    body_type: str | None = doc["mediaType"] if isinstance(doc.get("mediaType"), str) else None
    schema1 = (MediaType.DOCKER_MANIFEST_SCHEMA1, MediaType.DOCKER_MANIFEST_SCHEMA1_SIGNED)
    if content_type in schema1 or body_type in schema1 or doc.get("schemaVersion") == 1:
        raise ManifestError(f"manifest {what}: Docker schema 1 manifests are not supported")
    known = is_image_type(content_type) or is_index_type(content_type)
    if known and body_type is not None and body_type != content_type:
        raise ManifestError(
            f"manifest {what}: mediaType {body_type} does not match Content-Type {content_type}"
        )
    if known:
        return content_type
    if body_type is not None:
        return body_type
    if "manifests" in doc:
        return MediaType.OCI_IMAGE_INDEX
    return MediaType.OCI_MANIFEST_SCHEMA1


class _BlobStream(ChunkStream):
    """The body of a blob GET, resumed with ``Range`` from the byte reached when cut off."""

    def __init__(self, client: Client, ref: Reference, desc: Descriptor) -> None:
        super().__init__()
        self._client = client
        self._ref = ref
        self._desc = desc
        self._resp: aiohttp.ClientResponse | None = None
        self.offset = 0  # bytes handed out
        self._skip = 0  # bytes to drop from the current body (a 200 answer to a Range)
        self.resumes = 0
        self._stalled = 0
        self._resumed_at = 0

    async def start(self) -> None:
        self._resp = await self._open(0)

    async def _open(self, offset: int) -> aiohttp.ClientResponse:
        resp = await self._client._open_blob_response(self._ref, self._desc, offset)
        url = redact(resp.url)
        encoded = "Content-Encoding" in resp.headers and resp.headers["Content-Encoding"] not in (
            "identity",
            "",
        )
        if encoded and resp.headers["Content-Encoding"].lower() not in ("gzip", "deflate"):
            resp.release()
            raise RemoteError(
                f"unsupported Content-Encoding {resp.headers['Content-Encoding']!r}",
                url=url,
                status=resp.status,
            )
        self._skip = 0
        if resp.status == 206:
            m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
            if not m or int(m.group(1)) != offset:
                resp.release()
                # A wrong range answer: start again from zero and drop what we have.
                log.debug("blob %s: bad Content-Range; restarting from 0", url)
                resp = await self._client._open_blob_response(self._ref, self._desc, 0)
                if resp.status != 200:
                    resp.release()
                    raise RemoteError("server answers Range requests wrongly", url=url)
                self._skip = offset
        elif offset:
            self._skip = offset  # 200: the server ignored Range
        expected = self._desc.size - offset + self._skip
        if not encoded and resp.content_length is not None and resp.content_length != expected:
            resp.release()
            raise SizeMismatchError(f"blob {url} (Content-Length)", expected, resp.content_length)
        return resp

    async def _resume(self, exc: BaseException | None, reached: int) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        # No progress since the last resume counts as a stall; two in a row end it.
        self._stalled = self._stalled + 1 if reached == self._resumed_at else 0
        self._resumed_at = reached
        self.resumes += 1
        policy = self._client.retry
        what = f"blob {self._ref.context}@{self._desc.digest}"
        if self.resumes > policy.resumes or self._stalled >= 2:
            raise TransportError(
                f"{what} cut off at byte {reached} of {self._desc.size}; gave up after "
                f"{self.resumes - 1} resumes: {exc}"
            ) from exc
        log.debug("%s cut off at byte %d (%s); resuming", what, reached, exc)
        await anyio.sleep(policy.delay(max(0, self._stalled - 1)) if self._stalled else 0)
        self._resp = await self._open(reached)

    async def _next(self) -> bytes | None:
        # Gather what the socket hands over (readany: no copy) and join it once per
        # ~1 MiB: every byte is copied once, not twice.
        parts: list[bytes] = []
        got = 0
        size = self._desc.size

        def take() -> bytes:
            nonlocal parts, got
            out = parts[0] if len(parts) == 1 else b"".join(parts)
            self.offset += got
            parts, got = [], 0
            return out

        while got < CHUNK_SIZE:
            resp = self._resp
            if resp is None:
                await self._resume(None, self.offset + got)
                continue
            try:
                data = await resp.content.readany()
            except _NET_ERRORS as exc:
                if isinstance(exc, RemoteError):
                    raise
                out = take()
                await self._resume(exc, self.offset)
                if out:
                    return out
                continue
            if not data:
                if self.offset + got < size:
                    out = take()
                    await self._resume(ConnectionError("body ended early"), self.offset)
                    if out:
                        return out
                    continue
                break
            if self._skip:
                drop = min(self._skip, len(data))
                self._skip -= drop
                data = data[drop:]
                if not data:
                    continue
            parts.append(data)
            got += len(data)
        return take() if got else None

    async def _aclose(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None


class RemoteDescriptor:
    """What ``get`` returns: a manifest's descriptor and raw bytes; becomes an image or index."""

    def __init__(self, client: Client, ref: Reference, desc: Descriptor, raw: bytes) -> None:
        self.client = client
        self.ref = ref
        self.descriptor = desc
        self.raw_manifest = raw

    def __repr__(self) -> str:
        return f"<remote {self.ref} {self.descriptor.media_type} {self.descriptor.digest}>"

    @property
    def media_type(self) -> str:
        return self.descriptor.media_type

    @property
    def digest(self) -> Hash:
        return self.descriptor.digest

    @property
    def is_index(self) -> bool:
        return is_index_type(self.descriptor.media_type)

    def _open_blob(self, ref: Reference) -> partial.BlobOpener:
        async def open_blob(desc: Descriptor) -> ByteReceiveStream:
            return await self.client.open_blob(ref, desc)

        return open_blob

    def _fetch_manifest(self, ref: Reference) -> partial.ManifestFetcher:
        async def fetch(desc: Descriptor) -> bytes:
            raw, _, _ = await self.client._manifest(ref, str(desc.digest), desc.digest)
            return raw

        return fetch

    def index(self) -> ImageIndex:
        if not self.is_index:
            raise ManifestError(f"{self.ref} is an image ({self.media_type}), not an index")
        return partial.index(
            self.raw_manifest,
            self._fetch_manifest(self.ref),
            self._open_blob(self.ref),
            media_type=self.media_type,
        )

    async def image(self, *, platform: Platform | str | None = None) -> Image:
        if not self.is_index:
            return partial.image(
                self.raw_manifest, self._open_blob(self.ref), media_type=self.media_type
            )
        want = (
            Platform.from_string(platform)
            if isinstance(platform, str)
            else (platform or host_platform())
        )
        im = IndexManifest.parse(self.raw_manifest)
        for d in im.manifests:
            if d.platform is not None and platform_matches(want, d.platform):
                child = d
                break
        else:
            have = ", ".join(str(d.platform) for d in im.manifests if d.platform) or "none"
            raise PlatformNotFoundError(
                f"{self.ref}: no image for platform {want} (the index has: {have})"
            )
        if is_index_type(child.media_type):
            raise ManifestError(f"{self.ref}: child {child.digest} for {want} is an index")
        raw, media_type, _ = await self.client._manifest(self.ref, str(child.digest), child.digest)
        return partial.image(raw, self._open_blob(self.ref), media_type=media_type)


# Per event loop, the client used when the caller passes none; closed at loop shutdown.
_DEFAULTS: dict[int, Client] = {}


async def _holder(client: Client, key: int) -> Any:
    try:
        yield
    finally:
        _DEFAULTS.pop(key, None)
        _HOLDERS.pop(key, None)
        await client.aclose()


_HOLDERS: dict[int, Any] = {}


async def default_client() -> Client:
    """The shared client of the running event loop (closed when the loop shuts down)."""
    loop = asyncio.get_running_loop()
    key = id(loop)
    client = _DEFAULTS.get(key)
    if client is None or client._closed:
        client = Client()
        _DEFAULTS[key] = client
        holder = _holder(client, key)
        await holder.__anext__()
        _HOLDERS[key] = holder  # asyncio.run's shutdown_asyncgens closes it, and the client
    return client
