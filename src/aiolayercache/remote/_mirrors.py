"""Pulls through mirrors: which endpoints a name resolves to, and falling back on a miss.

A :class:`Router` turns the user's reference into endpoints once per
``(registry, repository)``: the mirrors of the ``[[registry]]`` table whose
prefix matches longest (each rewritten as containers/image rewrites it), then
the origin (``location``, or the name itself). A manifest or blob is asked of
each in turn; a mirror's miss (404), refusal (401/403), error (no response,
5xx after retries) or wrong bytes sends the request on to the next, the
origin last, whose error is the one raised. Requests to a mirror carry
``?ns=<origin registry>`` as containerd sends it; credentials and tokens are
the mirror host's own. Everything is still verified: a manifest asked for by
digest against the digest, a blob against its digest and size. A mirror that
served a wrong blob is marked bad for that digest (a warning, once), so the
caller's next read of it (the layout and tarball writers read a blob once
more after a mismatch) goes to the origin. A mirror that gave no response is
skipped for :data:`MIRROR_DOWN_SECONDS`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp
import anyio
from anyio.abc import ByteReceiveStream
from yarl import URL

from .._errors import DigestMismatchError, ManifestError
from .._hash import Hash
from .._types import Descriptor
from ..streams import BytesStream, VerifyingStream, read_all
from ._auth import Credentials
from ._blob import BlobStream, open_blob
from ._descriptor import MANIFEST_ACCEPT, read_manifest
from ._errors import RemoteError, TransportError
from ._reference import InvalidReferenceError, Reference
from ._registries_conf import (
    RegistriesConf,
    RegistriesConfError,
    RegistryEntry,
    load_registries_conf,
)
from ._retry import RetryPolicy

__all__ = [
    "MIRROR_DOWN_SECONDS",
    "BlockedError",
    "Endpoint",
    "Requester",
    "Route",
    "Router",
    "make_router",
    "manifest_at",
]

log = logging.getLogger("aiolayercache.remote")

MIRROR_DOWN_SECONDS = 30.0
MAX_ROUTES = 4096
SMALL_BLOB = 1 << 20  # read whole from a mirror and verified before it is handed out
# Seconds a mirror may take to answer (headers; a small blob whole) before the next
# endpoint is tried: a mirror that hangs costs this, not the client's retries.
MIRROR_TIMEOUT = 10.0


def _named(exc: Exception) -> Exception:
    """``exc``, or a RemoteError saying what a bare timeout was."""
    if isinstance(exc, TimeoutError):  # (down: skipped for a while, as a refused one)
        return TransportError(f"no answer within {MIRROR_TIMEOUT:g} s")
    return exc


class BlockedError(RemoteError):
    """registries.conf blocks pulls of this name (``blocked = true``); nothing was sent."""


async def manifest_at(
    client: Requester,
    at: Reference,
    name: Reference,
    identifier: str,
    expect: Hash | None,
    query: Mapping[str, str] | None = None,
) -> tuple[bytes, str, Hash]:
    """Manifest ``identifier`` from the repository ``at`` (errors say ``name``): raw, type, digest.

    Its digest is checked against ``expect`` when given.
    """
    path = f"/v2/{at.repository}/manifests/{identifier}"
    hdrs = {"Accept": MANIFEST_ACCEPT}
    resp = await client.request(at, "GET", path, headers=hdrs, what=f"manifest {name}", query=query)
    async with resp:
        return await read_manifest(resp, str(name), expect)


class Requester(Protocol):
    """What the router needs of the client: one authenticated request, and its retry policy."""

    @property
    def retry(self) -> RetryPolicy: ...

    async def request(
        self,
        ref: Reference,
        method: str,
        path: str | URL,
        *,
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        what: str,
        query: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse: ...

    async def open_blob_response(
        self, ref: Reference, desc: Descriptor, offset: int
    ) -> aiohttp.ClientResponse: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a pull may go: a registry and repository (no tag, no digest)."""

    ref: Reference
    mirror: bool = False
    query: Mapping[str, str] | None = None  # {"ns": origin registry} for a mirror
    by_digest: bool = True  # used for pulls by digest
    by_tag: bool = True  # used for pulls by tag


@dataclass(frozen=True, slots=True)
class Route:
    """The endpoints of one ``(registry, repository)``, mirrors first, origin last."""

    origin: Endpoint
    mirrors: tuple[Endpoint, ...] = ()
    blocked: RegistryEntry | None = None
    direct: bool = False  # no mirrors and no rewrite: the user's name as it is

    def endpoints(self, by_digest: bool) -> list[Endpoint]:
        ms = [m for m in self.mirrors if (m.by_digest if by_digest else m.by_tag)]
        return [*ms, self.origin]


def _rewrite(name: str, end: int, location: str, source: str) -> Reference:
    try:
        return Reference.parse(location + name[end:])
    except InvalidReferenceError as exc:
        msg = f"{source}: location {location!r} rewrites {name}: {exc}"
        raise RegistriesConfError(msg) from None


def _registry_of(location: str, source: str) -> str:
    return _rewrite("/x", 0, location.partition("/")[0], source).registry


class _OriginsOnly(Mapping[str, Credentials]):
    """One :class:`Credentials` for every registry but the mirrors (which get their own)."""

    def __init__(self, creds: Credentials, mirrors: frozenset[str]) -> None:
        self._creds = creds
        self._mirrors = mirrors

    def __getitem__(self, registry: str) -> Credentials:
        if registry in self._mirrors:
            raise KeyError(registry)
        return self._creds

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class Router:
    """The registries.conf tables in effect for one client, and what it learnt of mirrors."""

    def __init__(self, conf: RegistriesConf) -> None:
        self.conf = conf
        self._routes: dict[tuple[str, str], Route] = {}
        self._bad: set[tuple[str, Hash]] = set()  # (mirror registry, digest) that lied
        self._down: dict[str, float] = {}  # mirror registry -> monotonic time it may return
        entries = conf.entries
        self._mirror_hosts = frozenset(
            _registry_of(m.location, e.source) for e in entries for m in e.mirrors
        )
        self._insecure_hosts = frozenset(
            [_registry_of(m.location, e.source) for e in entries for m in e.mirrors if m.insecure]
            + [_registry_of(e.location, e.source) for e in entries if e.insecure and e.location]
        )
        self._insecure_wild = tuple(e for e in entries if e.insecure and not e.location)

    def credentials(
        self, given: Mapping[str, Credentials] | Credentials | None
    ) -> Mapping[str, Credentials] | None:
        """``given`` as the client should hold it: one Credentials for all is not for mirrors."""
        if isinstance(given, Credentials):
            return _OriginsOnly(given, self._mirror_hosts)
        return given

    def is_insecure(self, registry: str) -> bool:
        """True when registries.conf says ``insecure = true`` for ``registry`` (plain HTTP)."""
        if registry in self._insecure_hosts:
            return True
        return any(e.match_end(registry) >= 0 for e in self._insecure_wild)

    def route(self, ref: Reference) -> Route:
        key = (ref.registry, ref.repository)
        r = self._routes.get(key)
        if r is None:
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            r = self._routes[key] = self._resolve(ref)
        if r.blocked is not None:
            e = r.blocked
            raise BlockedError(
                f"{ref}: pulls are blocked by {e.source} ([[registry]] prefix {e.prefix!r})"
            )
        return r

    def _resolve(self, ref: Reference) -> Route:
        name = ref.context
        bare = Reference(ref.registry, ref.repository)
        found = self.conf.find(name)
        if found is None:
            return Route(Endpoint(bare), direct=True)
        e, end = found
        origin = bare if not e.location else _rewrite(name, end, e.location, e.source)
        mirrors = []
        for m in e.mirrors:
            mref = _rewrite(name, end, m.location, e.source)
            mirrors.append(
                Endpoint(
                    Reference(mref.registry, mref.repository),
                    mirror=True,
                    query={"ns": ref.registry},
                    by_digest=m.serves(True, e.mirror_by_digest_only),
                    by_tag=m.serves(False, e.mirror_by_digest_only),
                )
            )
        origin_ep = Endpoint(Reference(origin.registry, origin.repository))
        direct = not mirrors and origin_ep.ref == bare
        return Route(origin_ep, tuple(mirrors), e if e.blocked else None, direct)

    # --- what was learnt: mirrors that are down, or lied about a digest ------------------

    def _usable(self, ep: Endpoint, digest: Hash | None) -> bool:
        if not ep.mirror:
            return True
        until = self._down.get(ep.ref.registry)
        if until is not None:
            if time.monotonic() < until:
                return False
            del self._down[ep.ref.registry]
        return digest is None or (ep.ref.registry, digest) not in self._bad

    def _failed(self, ep: Endpoint, what: str, exc: Exception) -> None:
        down = isinstance(exc, TransportError) or (
            isinstance(exc, RemoteError) and (exc.status or 0) >= 500
        )
        if down and ep.ref.registry not in self._down:
            log.warning(
                "mirror %s: %s; using the next endpoint for %.0f s",
                ep.ref.registry,
                exc,
                MIRROR_DOWN_SECONDS,
            )
            self._down[ep.ref.registry] = time.monotonic() + MIRROR_DOWN_SECONDS
        else:
            log.debug("mirror %s: %s: %s; trying the next endpoint", ep.ref.registry, what, exc)

    def condemn(self, ep: Endpoint, digest: Hash, exc: Exception) -> None:
        """Mark mirror ``ep`` bad for ``digest``: it served bytes that do not match it."""
        key = (ep.ref.registry, digest)
        if key not in self._bad:
            self._bad.add(key)
            log.warning(
                "mirror %s served wrong bytes for %s (%s); reading it from elsewhere",
                ep.ref.registry,
                digest,
                exc,
            )

    # --- manifests and blobs -------------------------------------------------------------

    async def fetch_manifest(
        self, client: Requester, ref: Reference, identifier: str, expect: Hash | None
    ) -> tuple[bytes, str, Hash]:
        """Manifest ``identifier`` of ``ref``: from the first endpoint that has it right."""
        for ep in self.route(ref).endpoints(ref.digest is not None):
            if not self._usable(ep, expect):
                continue
            try:
                with anyio.fail_after(MIRROR_TIMEOUT if ep.mirror else None):
                    return await manifest_at(client, ep.ref, ref, identifier, expect, ep.query)
            except DigestMismatchError as exc:
                if not ep.mirror or expect is None:
                    raise
                self.condemn(ep, expect, exc)
            except (RemoteError, ManifestError, TimeoutError) as exc:
                if not ep.mirror:
                    raise
                self._failed(ep, f"manifest {identifier}", _named(exc))
        raise AssertionError("unreachable: the origin is always tried")  # pragma: no cover

    async def open_blob(
        self, client: Requester, ref: Reference, desc: Descriptor
    ) -> ByteReceiveStream:
        """Blob ``desc`` of ``ref``, verified; from a mirror when one has it right."""
        route = self.route(ref)
        if route.direct:
            return await open_blob(client, ref, desc)
        eps = [e for e in route.endpoints(ref.digest is not None) if self._usable(e, desc.digest)]
        what = f"blob {ref.context}@{desc.digest}"
        if desc.size <= SMALL_BLOB:
            # Small (a config): read whole from each mirror in turn and verified before
            # any byte is handed out, so wrong bytes cost no caller a retry.
            while eps[0].mirror:
                try:
                    with anyio.fail_after(MIRROR_TIMEOUT):
                        stream = BlobStream(_Blobs(client, self, eps[:1], what), ref, desc)
                        await stream.start()
                        v = VerifyingStream(stream, desc.digest, desc.size, what=what)
                        data = await read_all(v)
                except DigestMismatchError as exc:
                    self.condemn(eps[0], desc.digest, exc)
                except (RemoteError, TimeoutError) as exc:
                    self._failed(eps[0], what, _named(exc))
                else:
                    return VerifyingStream(BytesStream(data), desc.digest, desc.size, what=what)
                eps.pop(0)
        source = _Blobs(client, self, eps, what)
        stream = BlobStream(source, ref, desc)
        while True:
            try:
                await stream.start()
                break
            except DigestMismatchError as exc:  # a Content-Length that is not the blob's size
                if not source.current.mirror:
                    raise
                self.condemn(source.current, desc.digest, exc)
                source.skip()

        async def condemn_used() -> None:
            for ep in source.used:
                self.condemn(ep, desc.digest, DigestMismatchError(source.what, desc.digest, "?"))

        return VerifyingStream(
            stream, desc.digest, desc.size, what=source.what, on_mismatch=condemn_used
        )


class _Blobs:
    """A BlobSource over a route's endpoints: the current one, or the next when it fails."""

    def __init__(self, client: Requester, router: Router, eps: list[Endpoint], what: str) -> None:
        self._client = client
        self._router = router
        self._eps = eps
        self.what = what
        self.used: list[Endpoint] = []  # mirrors that served bytes of this stream

    @property
    def retry(self) -> RetryPolicy:
        return self._client.retry

    @property
    def current(self) -> Endpoint:
        return self._eps[0]

    def skip(self) -> None:
        if len(self._eps) > 1:
            self._eps.pop(0)

    async def open_blob_response(
        self, ref: Reference, desc: Descriptor, offset: int
    ) -> aiohttp.ClientResponse:
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        while True:
            ep = self._eps[0]
            try:
                with anyio.fail_after(MIRROR_TIMEOUT if ep.mirror else None):
                    resp = await self._client.request(
                        ep.ref,
                        "GET",
                        f"/v2/{ep.ref.repository}/blobs/{desc.digest}",
                        headers=headers,
                        ok=(200, 206),
                        what=self.what,
                        query=ep.query,
                    )
            except (RemoteError, TimeoutError) as exc:
                if not ep.mirror or len(self._eps) == 1:
                    raise
                self._router._failed(ep, self.what, _named(exc))
                self.skip()
                continue
            if ep.mirror and ep not in self.used:
                self.used.append(ep)
            return resp


def make_router(
    mirrors: Mapping[str, Sequence[str]] | None,
    registries_conf: str | os.PathLike[str] | Literal[False] | None,
) -> Router | None:
    """The router for ``Client(mirrors=..., registries_conf=...)``; None when nothing applies.

    None (no table, no mirror) keeps the client on its direct path: no cost per request.
    """
    conf = RegistriesConf() if registries_conf is False else load_registries_conf(registries_conf)
    if mirrors:
        conf = conf.with_mirrors(mirrors)
    return Router(conf) if conf.entries else None
