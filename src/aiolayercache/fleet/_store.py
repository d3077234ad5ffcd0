"""``RegistryCache``: a layer cache that lives in one repository of an OCI registry."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import ByteReceiveStream
from yarl import URL

from .._errors import AioLayerCacheError, LayerNotFoundError
from .._hash import Hash
from .._protocols import Layer
from .._types import Descriptor
from .._wrap import LayerWrapper
from ..cache import CacheStats
from ..remote import Client, RemoteError, TransportError, default_client
from ..remote._errors import read_capped
from ..remote._reference import Reference
from ..remote._write import Pusher
from ..streams import BytesStream, VerifyingStream
from ._claims import Claims
from ._entries import (
    EMPTY,
    EMPTY_DIGEST,
    EMPTY_MEDIA_TYPE,
    MANIFEST_TYPE,
    EntryInfo,
    claim_manifest,
    entry_manifest,
    entry_tag,
    hash_of_tag,
    kind_of,
    parse_claim,
    parse_entry,
    quarantine_tag,
)
from ._read import fleet_layer, open_entry
from ._upload import UploadSink

__all__ = ["RegistryCache"]

log = logging.getLogger("aiolayercache.fleet")

# Entries smaller than this are fetched without a claim: a second fetch costs less.
CLAIM_MIN = 1024 * 1024
MAX_ENTRY_MANIFEST = 64 * 1024
MAX_TAG_LIST = 64 * 1024 * 1024
MAX_TAG_PAGES = 10_000
# Seconds an entry whose stored bytes failed their digest stays untagged.
QUARANTINE = 86400.0
# What a fleet that cannot be read raises (a refused request, no answer, a malformed manifest).
FLEET_ERRORS = (AioLayerCacheError, OSError, TimeoutError)

Opener = Callable[[], Awaitable[ByteReceiveStream]]


class RegistryCache:
    """A :class:`~aiolayercache.cache.Cache` on one registry repository, shared by machines.

    ``repo`` names the repository (``cache.example:5000/layer-cache``). An
    entry is a blob of it named by its hash, kept alive by a manifest tagged
    ``sha256-<hex>``. ``get`` finds the tag and returns a layer that streams
    the blob, verified (a blob that fails its digest is condemned: its tag is
    deleted, so the next read goes to the origin); ``put`` returns a layer
    whose streams upload as the caller reads and tag the entry only after the
    bytes verified. The fleet never fails a read that could go on: a registry
    that cannot be read is a miss, one that cannot take a write is counted in
    ``write_errors`` (one warning), and after a transport failure the fleet is
    skipped for ``down_for`` seconds (a lookup that takes ``lookup_timeout``
    seconds counts as one). With ``claims`` (default), machines
    that miss the same entry at once wait for the one that claimed it instead
    of all fetching it from the origin (see ``_claims``); a claim lapses
    ``claim_ttl`` seconds after its owner stops renewing it.
    """

    label = "fleet"

    def __init__(
        self,
        repo: str | Reference,
        *,
        client: Client | None = None,
        claims: bool = True,
        claim_ttl: float = 10.0,
        claim_max_wait: float = 60.0,
        stall_timeout: float = 10.0,
        commit_timeout: float = 60.0,
        down_for: float = 30.0,
        lookup_timeout: float = 2.0,
    ) -> None:
        self.repo = Reference.parse(repo) if isinstance(repo, str) else repo
        self._client = client
        self.claims = Claims(self, claim_ttl, claim_max_wait) if claims else None
        self.stall_timeout = stall_timeout
        self.commit_timeout = commit_timeout
        self.down_for = down_for
        self.lookup_timeout = lookup_timeout
        self.write_errors = 0
        self.read_errors = 0
        self._stats = CacheStats()
        self._down_until = 0.0
        self._no_writes_until = 0.0
        self._warned: set[str] = set()
        self._empty_ready = False
        self._behind: set[asyncio.Task[None]] = set()
        self._empty_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"RegistryCache({self.repo.registry}/{self.repo.repository})"

    async def client(self) -> Client:
        if self._client is None:
            self._client = await default_client()
        return self._client

    # --- warnings and the fleet's health ----------------------------------------------

    def _warn_once(self, kind: str, msg: str) -> None:
        if kind in self._warned:
            log.debug("%s", msg)
        else:
            self._warned.add(kind)
            log.warning("%s", msg)

    def stats(self) -> CacheStats:
        """What this cache did since it was made (``write_errors``: uploads the fleet did
        not take; its ``read_errors`` are counted apart)."""
        s = self._stats
        return CacheStats(s.hits, s.misses, s.bytes_served, s.bytes_written, 0, self.write_errors)

    def served(self, size: int) -> None:
        self._stats.bytes_served += size

    def unreadable(self, exc: BaseException, *, down: bool = False) -> None:
        self.read_errors += 1
        if down or isinstance(exc, (OSError, TimeoutError, TransportError)):
            self._down_until = time.monotonic() + self.down_for
        why = str(exc) or type(exc).__name__
        self._warn_once("read", f"fleet {self!r} cannot be read ({why}); going on without it")

    def behind(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._behind.add(task)
        task.add_done_callback(self._behind.discard)

    async def flush(self) -> None:
        """Wait until the uploads that finish behind their reads are done (or failed).

        A read that filled the fleet returns its last chunk as soon as the bytes
        verified; closing the blob's session and tagging the entry follow. Call
        this before the client closes (a command does, before it exits).
        """
        while self._behind:
            await asyncio.wait(set(self._behind))

    def write_failed(self, h: Hash, exc: BaseException) -> None:
        self.write_errors += 1
        refused = isinstance(exc, RemoteError) and exc.status in (401, 403, 405, 429, 507)
        if refused or isinstance(exc, (TransportError, OSError, TimeoutError)):
            # Refused (no push right, read-only, a quota, full) or gone: stop for a while.
            self._no_writes_until = time.monotonic() + self.down_for
        why = str(exc) or type(exc).__name__
        self._warn_once("write", f"fleet {self!r} did not take {h} ({why}); going on without it")

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    # --- the repository (the Manifests protocol of claims) ------------------------------

    async def pusher(self) -> Pusher:
        return Pusher(await self.client(), self.repo)

    async def read_tag(self, tag: str) -> bytes | None:
        # Bounded: a fleet that does not answer (retrying a refused connection) is down,
        # and a pull should not wait on it longer than this.
        with anyio.fail_after(self.lookup_timeout):
            return await self._read_tag(tag)

    async def _read_tag(self, tag: str) -> bytes | None:
        c = await self.client()
        resp = await c.request(
            self.repo,
            "GET",
            f"/v2/{self.repo.repository}/manifests/{tag}",
            headers={"Accept": MANIFEST_TYPE},
            ok=(200, 404),
            what=f"fleet tag {tag} in {self.repo.context}",
        )
        async with resp:
            if resp.status == 404:
                return None
            return await read_capped(resp, MAX_ENTRY_MANIFEST, f"fleet tag {tag}")

    async def put_tag(self, tag: str, raw: bytes) -> Hash:
        await self.ready()
        pusher = await self.pusher()
        try:
            await pusher.manifest(tag, raw, MANIFEST_TYPE)
        except RemoteError as exc:
            if exc.status != 400:
                raise
            # distribution may not see yet a blob that several machines uploaded at once
            # (MANIFEST_BLOB_UNKNOWN, DIGEST_INVALID): once more, a moment later.
            await anyio.sleep(0.25)
            await pusher.manifest(tag, raw, MANIFEST_TYPE)
        return Hash.of(raw)

    async def delete_manifest(self, digest: Hash) -> None:
        c = await self.client()
        resp = await c.request(
            self.repo,
            "DELETE",
            f"/v2/{self.repo.repository}/manifests/{digest}",
            ok=(200, 202, 404),
            scope=f"repository:{self.repo.repository}:delete",
            what=f"deleting fleet manifest {digest} from {self.repo.context}",
        )
        resp.release()

    async def ready(self) -> None:
        # The entry manifests' config ({}): a blob of the repository, put once.
        async with self._empty_lock:
            if self._empty_ready:
                return
            desc = Descriptor(media_type=EMPTY_MEDIA_TYPE, size=len(EMPTY), digest=EMPTY_DIGEST)

            async def empty() -> ByteReceiveStream:
                return BytesStream(EMPTY)

            await (await self.pusher()).blob(desc, empty)
            self._empty_ready = True

    async def tag_entry(self, h: Hash, size: int, media_type: str, kind: str) -> None:
        bad = await self.read_tag(quarantine_tag(h))
        held = parse_claim(bad) if bad is not None else None
        if held is not None and held.live:
            log.debug("fleet %r: %s is quarantined; not tagged", self, h)
            return
        await self.put_tag(entry_tag(h), entry_manifest(h, size, media_type, kind))
        self._stats.bytes_written += size

    async def lookup(self, h: Hash) -> EntryInfo | None:
        raw = await self.read_tag(entry_tag(h))
        if raw is None:
            return None
        return parse_entry(raw, h, f"fleet entry {entry_tag(h)} in {self.repo.context}")

    # --- the Cache protocol ---------------------------------------------------------------

    async def get(self, h: Hash) -> Layer:
        """The entry ``h`` as a layer streaming from the registry; ``LayerNotFoundError``
        when the repository has no such entry, or cannot be read."""
        info: EntryInfo | None = None
        if not self.down:
            try:
                info = await self.lookup(h)
            except FLEET_ERRORS as exc:  # unreachable, refused, or a malformed entry manifest
                self.unreadable(exc)
        if info is None:
            self._stats.misses += 1
            raise LayerNotFoundError(f"{h} is not in {self!r}")
        self._stats.hits += 1
        return fleet_layer(self, info)

    async def drop(self, h: Hash, why: str) -> None:
        """Delete entry ``h``'s tag (its bytes are wrong for good) and quarantine it for a
        day (see ``_entries``); never raises."""
        self._warn_once("corrupt", f"fleet {self!r}: entry {h} dropped: {why}")
        with anyio.move_on_after(self.stall_timeout):
            try:
                bad = claim_manifest("quarantine", time.time() + QUARANTINE)
                await self.put_tag(quarantine_tag(h), bad)
                raw = await self.read_tag(entry_tag(h))
                if raw is not None:
                    await self.delete_manifest(Hash.of(raw))
            except FLEET_ERRORS as exc:
                log.debug("fleet %r: dropping %s: %s", self, h, exc)

    async def put(self, layer: Layer) -> Layer:
        """A layer whose streams upload to the fleet as they are read (lazily)."""
        return _FleetTee(self, layer)

    async def delete(self, h: Hash) -> None:
        """Delete the manifest that keeps entry ``h``; ``LayerNotFoundError`` if none does."""
        raw = await self.read_tag(entry_tag(h))
        if raw is None:
            raise LayerNotFoundError(f"{h} is not in {self!r}")
        await self.delete_manifest(Hash.of(raw))

    async def entries(self) -> list[Hash]:
        """The hashes of the entries the repository holds (from its tags)."""
        c = await self.client()
        found: list[Hash] = []
        path: str | URL | None = f"/v2/{self.repo.repository}/tags/list"
        seen: set[str] = set()
        while path is not None:
            if str(path) in seen or len(seen) >= MAX_TAG_PAGES:
                raise RemoteError(f"{self!r}: the tag list's pages do not end")
            seen.add(str(path))
            resp = await c.request(
                self.repo, "GET", path, ok=(200, 404), what=f"tags of {self.repo.context}"
            )
            async with resp:
                if resp.status == 404:
                    return found
                doc = json.loads(await read_capped(resp, MAX_TAG_LIST, f"tags of {self!r}"))
                nxt = resp.links.get("next")
            tags = doc.get("tags") if isinstance(doc, dict) else None
            for tag in tags if isinstance(tags, list) else []:
                h = hash_of_tag(str(tag))
                if h is not None:
                    found.append(h)
            path = URL(str(nxt["url"])) if nxt and "url" in nxt else None
            if path is not None and path.is_absolute() and path.authority != self.repo.endpoint:
                raise RemoteError(f"{self!r}: the tag list's next page is on another host")
        return found

    async def fill(
        self, h: Hash, size: int | None, media_type: str, kind: str, upstream: Opener
    ) -> ByteReceiveStream:
        """A stream of ``upstream`` that uploads to entry ``h`` as it is read."""
        if self.down or time.monotonic() < self._no_writes_until:
            return await upstream()
        release = None
        if self.claims is not None and (size is None or size >= CLAIM_MIN):
            try:
                got = await self.claims.claim_or_wait(h)
            except FLEET_ERRORS as exc:
                self.write_failed(h, exc)  # the fleet cannot take this fill
                return await upstream()
            if isinstance(got, EntryInfo):
                try:
                    return await open_entry(
                        self, Descriptor(media_type=got.media_type, size=got.size, digest=h)
                    )
                except LayerNotFoundError:
                    return await upstream()
            if got is not None:
                held = got

                async def release_claim() -> None:
                    with anyio.move_on_after(self.stall_timeout):
                        try:
                            await held.release()
                        except Exception as exc:  # (a closed client too): the claim lapses
                            log.debug("fleet %r: releasing claim on %s: %s", self, h, exc)

                release = release_claim
        try:
            inner = await upstream()
        except BaseException:
            if release is not None:
                with anyio.CancelScope(shield=True):
                    await release()
            raise
        sink = UploadSink(self, h, size, media_type, kind, settled=release)
        return VerifyingStream(inner, h, size, what=str(h), sinks=[sink])


class _FleetTee(LayerWrapper):
    """What ``RegistryCache.put`` returns: streams that fill the fleet as they are read."""

    def __init__(self, fleet: RegistryCache, inner: Layer) -> None:
        super().__init__(inner)
        self._fleet = fleet

    def __repr__(self) -> str:
        return f"<{self._inner!r} filling {self._fleet!r}>"

    async def compressed(self) -> ByteReceiveStream:
        h, size, mt = await self._inner.digest(), await self._inner.size(), await self.media_type()
        return await self._fleet.fill(
            h, size, str(mt), kind_of(str(mt), False), self._inner.compressed
        )

    async def uncompressed(self) -> ByteReceiveStream:
        h, mt = await self._inner.diff_id(), await self.media_type()
        return await self._fleet.fill(h, None, str(mt), "uncompressed", self._inner.uncompressed)
