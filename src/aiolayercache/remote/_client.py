"""The registry client: one aiohttp session and the request chain (auth → retry → redirects).

The rules live beside it: the URL policy in ``_urls``, the token flow in
``_auth``, retries in ``_retry``, error bodies in ``_errors``; blob streams
(``_blob``) and descriptors (``_descriptor``) call the client through the
protocols of ``_protocols``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import aiohttp
import anyio
from aiohttp.abc import AbstractResolver
from anyio.abc import ByteReceiveStream
from yarl import URL

from .._hash import Hash
from .._protocols import Image, ImageIndex, Layer
from .._types import Descriptor, Platform
from . import _write
from ._auth import (
    MAX_TOKEN_BYTES,
    Challenge,
    Credentials,
    CredentialStore,
    Token,
    TokenCache,
    check_realm,
    parse_challenges,
    parse_token,
    token_request,
)
from ._blob import open_blob
from ._descriptor import RemoteDescriptor
from ._errors import (
    NET_ERRORS,
    RemoteError,
    TransportError,
    UnauthorizedError,
    error_from_response,
    read_capped,
    redact,
)
from ._helpers import HELPER_TIMEOUT
from ._mirrors import make_router, manifest_at
from ._reference import Reference
from ._retry import RETRY_STATUSES, RetryBudget, RetryPolicy, is_exhausted_quota, parse_retry_after
from ._scheme import Reach
from ._tls import TLSConfig
from ._urls import check_target, origin
from ._write import PushStats

__all__ = ["Client"]

log = logging.getLogger("aiolayercache.remote")


class Client:
    """A registry client: one pooled aiohttp session, tokens cached per scope, retries.

    Use as an async context manager (``async with remote.Client() as c``) or
    close with :meth:`aclose`. ``credentials`` maps registry names
    (``ghcr.io``, ``localhost:5000``, ``docker.io``) to :class:`Credentials`
    (or is one, for every registry); ``docker_config`` searches the auth
    files and credential helpers (each helper given ``helper_timeout``
    seconds) for registries not given explicitly (``_credentials``). HTTPS
    first; plain HTTP only for loopback registries and when ``insecure`` is
    true (which also accepts any certificate), after HTTPS fails to connect
    (``_scheme``). TLS trusts the system store, ``ca_file`` and the
    registry's certs.d directory (or ``cert_dir``), and presents
    ``cert_file``/``key_file`` or the certs.d pair (``_tls``);
    ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` are honoured except for
    loopback. ``resolver`` replaces aiohttp's
    DNS resolver for the session. Pulls try ``mirrors`` (name prefix → mirror
    locations) and those of ``registries_conf`` (a path; None: as skopeo finds
    it; False: none) before the origin; pushes do not (``_mirrors``).
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
        resolver: AbstractResolver | None = None,
        mirrors: Mapping[str, Sequence[str]] | None = None,
        registries_conf: str | os.PathLike[str] | Literal[False] | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        cert_dir: str | os.PathLike[str] | None = None,
        helper_timeout: float = HELPER_TIMEOUT,
    ) -> None:
        if key_file is not None and cert_file is None:
            raise ValueError("key_file needs cert_file")
        self._router = make_router(mirrors, registries_conf)
        if self._router is not None:
            credentials = self._router.credentials(credentials)
        self._credentials = CredentialStore(
            credentials, files=docker_config, helper_timeout=helper_timeout
        )
        self.insecure = insecure
        self.retry = retry or RetryPolicy()
        self._limit_per_host = limit_per_host
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._user_agent = user_agent
        self._resolver = resolver
        self._reach = Reach(TLSConfig(ca_file, cert_file, key_file, cert_dir), connect_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._challenges: dict[str, Challenge] = {}
        self._tokens = TokenCache()
        self._budget = RetryBudget()
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

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran; a closed client sends nothing."""
        return self._closed

    @property
    def tokens(self) -> TokenCache:
        """The bearer tokens this client holds, per ``(endpoint, scope)`` (read only)."""
        return self._tokens

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("this remote.Client is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0, limit_per_host=self._limit_per_host, resolver=self._resolver
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers={"User-Agent": self._user_agent},
                auto_decompress=True,
                trust_env=False,
            )
        return self._session

    def _insecure(self, ref: Reference) -> bool:
        r = self._router
        return self.insecure or (r is not None and r.is_insecure(ref.registry))

    # --- auth: credentials, challenges, tokens --------------------------------------

    async def _fetch_token(self, ref: Reference, ch: Challenge, scope: str) -> Token:
        realm = ch.params.get("realm")
        if not realm:
            raise UnauthorizedError(f"{ref.context}: bearer challenge without a realm")
        url = check_realm(realm, ref, self._insecure(ref))
        creds = await self._credentials.get(ref)
        req = token_request(url, ch, scope, creds)
        resp = await self._send(req.method, req.url, headers=req.headers, data=req.form, ref=ref)
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
                raise await error_from_response(resp, f"{ref.context}: token request failed")
            body = await read_capped(resp, MAX_TOKEN_BYTES, "token response")
        return parse_token(body, ref.context, url)

    async def _auth_header(self, ref: Reference, scope: str, stale: str | None) -> str | None:
        ch = self._challenges.get(ref.endpoint)
        if ch is None:
            return None
        if ch.scheme == "bearer":
            bearer = ch

            async def fetch() -> Token:
                return await self._fetch_token(ref, bearer, scope)

            token = await self._tokens.get_or_fetch((ref.endpoint, scope), stale, fetch)
            return "Bearer " + token
        if ch.scheme == "basic":
            creds = await self._credentials.get(ref)
            if not (creds.username or creds.password):  # none, or an identity token only
                return None
            return creds.basic()
        return None

    async def request(
        self,
        ref: Reference,
        method: str,
        path: str | URL,
        *,
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        what: str,
        scope: str | None = None,
        data: Any = None,
        resend: bool = True,
        query: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """A registry API request with auth; raises a typed error unless the status is ``ok``.

        ``path`` is a path on the registry, or a URL it gave (an upload location:
        credentials go only to the registry's own origin). ``scope`` is the token
        scope (default: pull from ``ref``'s repository). With ``resend=False`` (a
        streamed body, which cannot be sent twice) nothing is retried or re-sent.
        ``query`` is added to a registry path (``ns`` for a mirror).
        """
        insecure = self._insecure(ref)
        scheme = await self._reach.scheme(self._get_session(), ref, insecure)
        home = URL.build(scheme=scheme, authority=ref.endpoint, encoded=True)
        if isinstance(path, URL):
            url = home.join(path)
            reason = check_target(url, ref, insecure, credentials=False)
            if reason is not None:
                raise RemoteError(f"refusing {redact(url)}, which {reason}", method=method)
        else:
            url = URL.build(scheme=scheme, authority=ref.endpoint, path=path, encoded=True)
            if query:
                url = url.with_query(query)
        scope = scope or f"repository:{ref.repository}:pull"
        sent: str | None = None
        for _ in range(2 if resend else 1):
            hdrs = dict(headers or {})
            auth = await self._auth_header(ref, scope, sent)
            if auth and origin(url) == origin(home):
                hdrs["Authorization"] = auth
            resp = await self._send(
                method, url, headers=hdrs, ref=ref, data=data, attempts=None if resend else 1
            )
            if resp.status == 401 and sent is None and resend:
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
                raise await error_from_response(resp, f"{what} failed")
            finally:
                resp.release()
        raise AssertionError("unreachable")  # pragma: no cover

    # --- retry ---------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: URL,
        *,
        headers: Mapping[str, str],
        ref: Reference,
        data: Any = None,
        attempts: int | None = None,
    ) -> aiohttp.ClientResponse:
        """Send with retries on network errors and retryable statuses; redirects by hand.

        The caller owns (and must close) the response, whatever its status.
        """
        session = self._get_session()
        policy = self.retry
        if attempts is not None:
            policy = dataclasses.replace(policy, attempts=attempts)
        last_exc: BaseException | None = None
        for attempt in range(policy.attempts):
            try:
                resp = await self._reach.send(
                    session, method, url, headers, ref, self._insecure(ref), data
                )
            except aiohttp.ClientResponseError as exc:
                # A response aiohttp cannot parse (status line, oversized header, an
                # encoding it cannot decode). ``from None``: its request info holds headers.
                raise RemoteError(
                    f"malformed response: {exc.message}", method=method, url=redact(url)
                ) from None
            except NET_ERRORS as exc:
                if isinstance(exc, RemoteError):
                    raise
                last_exc = exc
                if attempt + 1 >= policy.attempts or not self._budget.spend(ref.endpoint, policy):
                    break
                delay = policy.delay(attempt)
                log.debug("%s %s: %s; retrying in %.2fs", method, redact(url), exc, delay)
                await anyio.sleep(delay)
                continue
            except aiohttp.ClientError as exc:  # an URL aiohttp refuses (a redirect's target)
                detail = type(exc).__name__
                if isinstance(exc, aiohttp.InvalidURL) and exc.description:
                    detail = str(exc.description)
                raise RemoteError(
                    f"request failed: {detail}", method=method, url=redact(url)
                ) from None
            if resp.status not in RETRY_STATUSES:
                self._budget.refund(ref.endpoint, policy)
            if resp.status in RETRY_STATUSES and attempt + 1 < policy.attempts:
                ra = parse_retry_after(resp.headers.get("Retry-After"))
                if is_exhausted_quota(resp.status, resp.headers, ra, policy):
                    return resp  # an exhausted quota: waiting the cap out would not help
                if not self._budget.spend(ref.endpoint, policy):
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

    # --- manifests and blobs (the Fetcher and BlobSource protocols) -----------------

    async def fetch_manifest(
        self, ref: Reference, identifier: str, expect: Hash | None
    ) -> tuple[bytes, str, Hash]:
        """The raw manifest ``identifier`` names, its media type and digest (checked)."""
        if self._router is not None:
            return await self._router.fetch_manifest(self, ref, identifier, expect)
        return await manifest_at(self, ref, ref, identifier, expect)

    async def get(self, ref: str | Reference) -> RemoteDescriptor:
        """Fetch the manifest or index ``ref`` names; the result can become either."""
        r = Reference.parse(ref) if isinstance(ref, str) else ref
        raw, media_type, digest = await self.fetch_manifest(r, r.identifier, r.digest)
        desc = Descriptor(media_type=media_type, size=len(raw), digest=digest)
        return RemoteDescriptor(self, r, desc, raw)

    async def image(self, ref: str | Reference, *, platform: Platform | str | None = None) -> Image:
        """The image ``ref`` names; an index is resolved to ``platform`` (default: this host)."""
        return await (await self.get(ref)).image(platform=platform)

    async def index(self, ref: str | Reference) -> ImageIndex:
        """The index ``ref`` names (a ``ManifestError`` if it is an image)."""
        return (await self.get(ref)).index()

    async def open_blob(self, ref: Reference, desc: Descriptor) -> ByteReceiveStream:
        """A stream of blob ``desc``: verified against digest and size, resumed when cut."""
        if self._router is not None:
            return await self._router.open_blob(self, ref, desc)
        return await open_blob(self, ref, desc)

    async def open_blob_response(
        self, ref: Reference, desc: Descriptor, offset: int
    ) -> aiohttp.ClientResponse:
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        return await self.request(
            ref,
            "GET",
            f"/v2/{ref.repository}/blobs/{desc.digest}",
            headers=headers,
            ok=(200, 206),
            what=f"blob {ref.context}@{desc.digest}",
        )

    # --- pushing (``_write``; the client is its Sender) ------------------------------

    async def write(
        self,
        ref: str | Reference,
        target: Image | ImageIndex,
        *,
        concurrency: int = 4,
        stats: PushStats | None = None,
    ) -> Hash:
        """Push ``target`` (an image or a whole index) to ``ref``; the digest put.

        Blobs go first (in parallel, ``concurrency`` at a time; skipped when
        present, mounted when ``target`` was read from another repository of
        the same registry), then child manifests, then the manifest ``ref``
        names (its tag, or its digest).
        """
        r = Reference.parse(ref) if isinstance(ref, str) else ref
        return await _write.write(self, r, target, concurrency=concurrency, stats=stats)

    async def write_layer(self, repo: str | Reference, layer: Layer) -> None:
        """Push one layer's compressed blob to ``repo`` (a repository; a tag is ignored)."""
        r = Reference.parse(repo) if isinstance(repo, str) else repo
        await _write.write_layer(self, r, layer)

    async def tag(self, ref: str | Reference, new_tag: str) -> None:
        """Tag the manifest ``ref`` names as ``new_tag`` in the same repository."""
        r = Reference.parse(ref) if isinstance(ref, str) else ref
        raw, media_type, _ = await manifest_at(self, r, r, r.identifier, r.digest)
        await _write.Pusher(self, r).manifest(new_tag, raw, media_type)

    async def delete(self, ref: str | Reference) -> None:
        """Delete the manifest ``ref`` names (a tag is resolved to its digest first)."""
        r = Reference.parse(ref) if isinstance(ref, str) else ref
        digest = r.digest or (await manifest_at(self, r, r, r.identifier, None))[2]
        await _write.delete(self, r, digest)
