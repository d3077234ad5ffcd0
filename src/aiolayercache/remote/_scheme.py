"""How the client reaches a registry: the scheme, the TLS context, the proxy, redirects.

HTTPS first, for every registry. A loopback registry or one marked insecure
(:func:`~._urls.schemes_for`) falls back to plain HTTP when HTTPS fails to
connect, as go-containerregistry's ping does; never on a certificate
failure. The answer is found once per registry per client, by one probe
(``GET /v2/`` over HTTPS) that concurrent first requests share; a registry
that could not be reached at all is probed again on the next request.

Proxies come from ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``
(:func:`proxy_for`), never for a loopback host.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import os
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import anyio
from yarl import URL

from ._errors import NET_ERRORS, RemoteError, TransportError, redact
from ._reference import Reference, is_loopback_host
from ._tls import CLIENT_CERT_ALERTS, TLSConfig, build_context, describe, probe_context, tls_problem
from ._urls import check_target, origin, schemes_for

__all__ = ["MAX_REDIRECTS", "Reach", "is_loopback_host", "proxy_for"]

MAX_REDIRECTS = 5
Proxy = tuple[URL, dict[str, str]]  # the proxy and its Proxy-Authorization, if any


def _env_proxies(env: Mapping[str, str]) -> dict[str, str]:
    """``{"https": ..., "http": ..., "no": ...}`` from ``*_PROXY``; lower case wins (urllib)."""
    out: dict[str, str] = {}
    for upper in (True, False):
        for k, v in env.items():
            if v and k.endswith("_PROXY" if upper else "_proxy") and k.isupper() == upper:
                if upper and k == "HTTP_PROXY" and "REQUEST_METHOD" in env:
                    continue  # httpoxy: under CGI, HTTP_PROXY comes from a request header
                out[k[: -len("_proxy")].lower()] = v
    return out


def _bypass(host: str, port: int | None, no_proxy: str) -> bool:
    """``NO_PROXY`` names ``host``: ``*``, a name or ``.suffix``, an IP or CIDR, ``:port``."""
    host = host.strip("[]").lower().rstrip(".")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if entry == "*":
            return True
        name, sep, want = entry.rpartition(":") if entry.count(":") == 1 else ("", "", "")
        if sep and want.isdigit():
            if port != int(want):
                continue
            entry = name
        entry = entry.strip("[]").rstrip(".")
        if not entry:
            continue
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        bare = entry.lstrip("*").lstrip(".")
        if host == bare or host.endswith("." + bare):
            return True
    return False


def proxy_for(url: URL, env: Mapping[str, str] | None = None) -> Proxy | None:
    """The proxy for ``url`` from the environment and its ``Proxy-Authorization``; or None.

    ``HTTPS_PROXY`` for https URLs, ``HTTP_PROXY`` for http (lower case
    first, as ``urllib.request.getproxies``), unless ``NO_PROXY`` names the
    host; never for a loopback host. ``env`` replaces ``os.environ`` (tests).
    """
    host = url.host
    if not host or is_loopback_host(host):
        return None
    proxies = _env_proxies(os.environ if env is None else env)
    if _bypass(host, url.port, proxies.get("no", "")):
        return None
    raw = proxies.get(url.scheme)
    if not raw:
        return None
    p = URL(raw if "://" in raw else f"http://{raw}")
    headers: dict[str, str] = {}
    if p.user:
        pair = f"{p.user}:{p.password or ''}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    return p.with_user(None), headers


class Reach:
    """Per client: the scheme per registry, one TLS context per host, the proxy per origin."""

    def __init__(self, tls: TLSConfig, probe_timeout: float) -> None:
        self._tls = tls
        self._probe_timeout = aiohttp.ClientTimeout(total=probe_timeout)
        self._probe_ssl = probe_context()
        self._schemes: dict[str, str] = {}
        self._contexts: dict[tuple[str, bool, bool], tuple[ssl.SSLContext, bool]] = {}
        self._proxies: dict[tuple[str, str | None, int | None], Proxy | None] = {}
        self._locks: dict[object, anyio.Lock] = {}
        self.probes = 0  # HTTPS probes sent (tests, benchmarks)

    def _lock(self, key: object) -> anyio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = anyio.Lock()
        return lock

    # --- scheme ------------------------------------------------------------------

    async def scheme(self, session: aiohttp.ClientSession, ref: Reference, insecure: bool) -> str:
        """``https``, or ``http`` for a registry that may and must fall back to it."""
        if "http" not in schemes_for(ref, insecure):
            return "https"
        known = self._schemes.get(ref.endpoint)
        if known is not None:
            return known
        async with self._lock(("scheme", ref.endpoint)):
            known = self._schemes.get(ref.endpoint)
            if known is not None:
                return known
            found = await self._probe(session, ref, insecure)
            if found is not None:
                self._schemes[ref.endpoint] = found
            return found or "http"

    async def _probe(
        self, session: aiohttp.ClientSession, ref: Reference, insecure: bool
    ) -> str | None:
        """``https`` if the registry speaks TLS, ``http`` if not, None if nothing listens.

        The probe checks no certificate (it sends nothing but ``GET /v2/``, and
        loading the system store would cost more than the probe): any
        certificate problem is found, and reported, by the first real request,
        which is then over HTTPS. A TLS alert (a client certificate wanted)
        counts as TLS spoken.
        """
        url = URL.build(scheme="https", authority=ref.endpoint, path="/v2/", encoded=True)
        self.probes += 1
        proxy = self._proxy(url)
        try:
            resp = await session.get(
                url,
                allow_redirects=False,
                ssl=self._probe_ssl,
                proxy=None if proxy is None else proxy[0],
                proxy_headers=None if proxy is None else proxy[1],
                timeout=self._probe_timeout,
            )
        except NET_ERRORS as exc:
            err = tls_problem(exc)
            if err is not None and err.reason in CLIENT_CERT_ALERTS:
                return "https"
            if isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
                exc, aiohttp.ClientSSLError
            ):
                return None  # never connected: ask again next time
            return "http"
        resp.release()
        return "https"

    # --- TLS and proxies -------------------------------------------------------------

    async def _context(
        self, url: URL, ref: Reference, insecure: bool, diagnostic: bool = False
    ) -> tuple[ssl.SSLContext, bool]:
        """The context for ``url``: the registry's own (certs.d, client pair) or a plain one."""
        home = _home(ref)
        own = url.host == home.host and url.port == home.port
        name = ref.registry if own else _authority(url)
        verify = not (own and insecure)
        key = (name, verify, diagnostic)
        ctx = self._contexts.get(key)
        if ctx is not None:
            return ctx
        async with self._lock(("tls", *key)):
            ctx = self._contexts.get(key)
            if ctx is None:
                cfg = self._tls
                if not own:  # a blob store a registry redirects to: no client certificate
                    cfg = dataclasses.replace(cfg, cert_file=None, key_file=None, cert_dir=None)
                ctx = await anyio.to_thread.run_sync(
                    lambda: build_context(name, cfg, verify=verify, diagnostic=diagnostic)
                )
                self._contexts[key] = ctx
            return ctx

    def _proxy(self, url: URL) -> Proxy | None:
        key = (url.scheme, url.host, url.port)
        if key not in self._proxies:
            self._proxies[key] = proxy_for(url)
        return self._proxies[key]

    # --- sending ------------------------------------------------------------------

    async def _request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        data: Any,
        ref: Reference,
        insecure: bool,
    ) -> aiohttp.ClientResponse:
        """One request, no redirects; a TLS failure is a :class:`TransportError` in plain words."""
        ssl_arg: ssl.SSLContext | bool = True
        client_cert = False
        if url.scheme == "https":
            ssl_arg, client_cert = await self._context(url, ref, insecure)
        proxy = self._proxy(url)
        try:
            return await session.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                ssl=ssl_arg,
                proxy=None if proxy is None else proxy[0],
                proxy_headers=None if proxy is None else proxy[1],
            )
        except NET_ERRORS as exc:
            err = tls_problem(exc)
            if err is None:
                raise
            diag = None
            if proxy is None and isinstance(err, ssl.SSLCertVerificationError):
                diag = (await self._context(url, ref, insecure, diagnostic=True))[0]
            why = await describe(
                err, url.host or "", url.port or 443, client_cert=client_cert, diagnostic=diag
            )
            raise TransportError(why, method=method, url=redact(url)) from None

    async def send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        ref: Reference,
        insecure: bool,
        data: Any,
    ) -> aiohttp.ClientResponse:
        """Send, following a GET's or HEAD's redirects by hand (each target checked)."""
        start = url
        hdrs = dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self._request(session, method, url, hdrs, data, ref, insecure)
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
            reason = check_target(nxt, ref, insecure, credentials=False)
            if reason is not None:
                raise RemoteError(
                    f"refusing redirect to {redact(nxt)}, which {reason}",
                    method=method,
                    url=redact(url),
                )
            if origin(nxt) != origin(start):
                # Credentials never follow a redirect to another origin.
                hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
            url = nxt
        raise RemoteError(f"more than {MAX_REDIRECTS} redirects", method=method, url=redact(start))


def _home(ref: Reference) -> URL:
    return URL.build(scheme="https", authority=ref.endpoint, encoded=True)


def _authority(url: URL) -> str:
    """``HOST[:PORT]`` as certs.d names it: the port only when it is not the default."""
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return host if url.explicit_port is None else f"{host}:{url.explicit_port}"
