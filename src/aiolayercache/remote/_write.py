"""Pushing: blobs, then child manifests, then the tagged manifest, per the distribution spec.

Each blob is asked for with ``HEAD`` first and skipped when the repository
has it; mounted from the source repository when the image was read from
another repository of the same registry (``POST ?mount=&from=``); otherwise
uploaded in a session: ``POST``, then one ``PUT ?digest=`` for a small blob,
or one streamed ``PATCH`` and a closing ``PUT ?digest=``. The bytes stream
from the source, verified as they go, so memory stays flat for any layer
size. A failed upload is cancelled (``DELETE`` of its session) and tried
again in a new session. Manifests go up with their own media type and their
exact bytes (digests are kept), children before their index, the tagged one
last, so a reader never sees a manifest whose blobs are missing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import anyio
from anyio.abc import ByteReceiveStream
from yarl import URL

from .._errors import AioLayerCacheError, ManifestError, first_error
from .._hash import Hash
from .._protocols import Image, ImageIndex, Layer
from .._types import MAX_INDEX_DEPTH, Descriptor, is_index_type
from ..streams import BytesStream, VerifyingStream, read_all
from ._descriptor import source_of
from ._errors import RemoteError, TransportError
from ._protocols import Sender
from ._reference import Reference

__all__ = ["PushStats", "Pusher", "delete", "write", "write_layer"]

log = logging.getLogger("aiolayercache.remote")

# Blobs up to this size go up in one PUT (read whole); bigger ones stream in one PATCH.
MONOLITHIC_MAX = 4 * 1024 * 1024
# Upload sessions tried per blob before the push fails.
UPLOAD_ATTEMPTS = 3

Opener = Callable[[], Awaitable[ByteReceiveStream]]


@dataclass(slots=True)
class PushStats:
    """What a push did: blobs uploaded, skipped (the registry had them), mounted from
    another repository, the bytes uploaded, and the manifests put."""

    blobs_pushed: int = 0
    blobs_skipped: int = 0
    blobs_mounted: int = 0
    bytes_pushed: int = 0
    manifests: int = 0


def _with_digest(location: URL, h: Hash) -> URL:
    # Appended as text: the session's own query (``_state``) must stay byte for byte.
    raw = str(location)
    return URL(f"{raw}{'&' if '?' in raw else '?'}digest={h}", encoded=True)


class Pusher:
    """One push into ``repo`` (a reference whose repository receives the blobs)."""

    def __init__(
        self,
        client: Sender,
        repo: Reference,
        *,
        concurrency: int = 4,
        mount_from: Reference | None = None,
        stats: PushStats | None = None,
    ) -> None:
        self.client = client
        self.repo = repo
        self.stats = stats if stats is not None else PushStats()
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._done: dict[Hash, anyio.Event] = {}
        self._mount_from = (
            mount_from
            if mount_from is not None
            and mount_from.registry == repo.registry
            and mount_from.repository != repo.repository
            else None
        )
        self._scope = f"repository:{repo.repository}:pull,push"
        if self._mount_from is not None:
            self._scope += f" repository:{self._mount_from.repository}:pull"

    def _blobs_path(self, h: Hash) -> str:
        return f"/v2/{self.repo.repository}/blobs/{h}"

    # --- blobs ---------------------------------------------------------------------

    async def blob(self, desc: Descriptor, open_: Opener) -> None:
        """Make blob ``desc`` present in the repository (once per push, however asked)."""
        h = desc.digest
        event = self._done.get(h)
        if event is not None:
            await event.wait()
            return
        event = self._done[h] = anyio.Event()
        try:
            async with self._limiter:
                await self._blob(desc, open_)
        except BaseException:
            del self._done[h]  # a later ask tries again
            raise
        finally:
            event.set()

    async def _blob(self, desc: Descriptor, open_: Opener) -> None:
        if await self._exists(desc):
            self.stats.blobs_skipped += 1
            return
        location: URL | None = None
        if self._mount_from is not None:
            location = await self._mount(desc.digest, self._mount_from)
            if location is None:
                self.stats.blobs_mounted += 1
                return
        for attempt in range(UPLOAD_ATTEMPTS):
            if location is None:
                location = await self.start_upload()
            try:
                await self._upload(location, desc, open_)
                return
            except (RemoteError, AioLayerCacheError, OSError) as exc:
                with anyio.CancelScope(shield=True):
                    await self.cancel_upload(location)
                location = None
                if attempt + 1 >= UPLOAD_ATTEMPTS:
                    raise
                log.warning(
                    "push %s: blob %s: %s; a new upload session", self.repo, desc.digest, exc
                )
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self.cancel_upload(location)
                raise

    async def _exists(self, desc: Descriptor) -> bool:
        resp = await self.client.request(
            self.repo,
            "HEAD",
            self._blobs_path(desc.digest),
            ok=(200, 404),
            scope=self._scope,
            what=f"checking blob {desc.digest} in {self.repo.context}",
        )
        async with resp:
            return resp.status == 200 and resp.content_length in (None, desc.size)

    async def _mount(self, h: Hash, source: Reference) -> URL | None:
        """Mount ``h`` from ``source``; None when mounted, else the session to upload into."""
        path = URL.build(
            path=f"/v2/{self.repo.repository}/blobs/uploads/",
            query={"mount": str(h), "from": source.repository},
        )
        resp = await self.client.request(
            self.repo,
            "POST",
            path,
            ok=(201, 202),
            scope=self._scope,
            what=f"mounting blob {h} into {self.repo.context}",
        )
        async with resp:
            if resp.status == 201:
                return None
            return self._location(resp.headers.get("Location"))

    async def start_upload(self) -> URL:
        """Open an upload session (``POST``); its location."""
        resp = await self.client.request(
            self.repo,
            "POST",
            f"/v2/{self.repo.repository}/blobs/uploads/",
            ok=(202,),
            scope=self._scope,
            what=f"starting an upload to {self.repo.context}",
        )
        async with resp:
            return self._location(resp.headers.get("Location"))

    def _location(self, value: str | None) -> URL:
        if not value:
            raise RemoteError(f"{self.repo.context}: upload session without a Location")
        try:
            return URL(value, encoded=True)
        except ValueError:
            raise RemoteError(f"{self.repo.context}: malformed upload Location") from None

    async def cancel_upload(self, location: URL | None) -> None:
        """Abandon an upload session (``DELETE``); a registry that cannot is not an error."""
        if location is None:
            return
        try:
            resp = await self.client.request(
                self.repo,
                "DELETE",
                location,
                ok=(200, 202, 204, 404),
                scope=self._scope,
                what="cancelling an upload",
                resend=False,
            )
            resp.release()
        except (RemoteError, TransportError) as exc:
            log.debug("push %s: cancelling %s: %s", self.repo, location, exc)

    async def _upload(self, location: URL, desc: Descriptor, open_: Opener) -> None:
        h = desc.digest
        stream = VerifyingStream(await open_(), h, desc.size, what=f"blob {h}")
        if desc.size <= MONOLITHIC_MAX:
            await self.finish_upload(location, h, await read_all(stream))
        else:
            sent = 0

            async def body() -> AsyncIterator[bytes]:
                nonlocal sent
                async with stream:
                    async for chunk in stream:
                        sent += len(chunk)
                        yield chunk

            location = await self.patch_upload(location, body())
            if sent != desc.size:
                what = f"uploading blob {h} to {self.repo.context}"
                raise RemoteError(f"{what}: sent {sent} of {desc.size} bytes")
            await self.finish_upload(location, h)
        self.stats.blobs_pushed += 1
        self.stats.bytes_pushed += desc.size

    async def patch_upload(self, location: URL, body: AsyncIterator[bytes]) -> URL:
        """Send ``body`` as one streamed ``PATCH`` (never re-sent); the next location."""
        patched = await self.client.request(
            self.repo,
            "PATCH",
            location,
            headers={"Content-Type": "application/octet-stream"},
            data=body,
            ok=(202, 204),
            scope=self._scope,
            what=f"uploading to {self.repo.context}",
            resend=False,
        )
        async with patched:
            return self._location(patched.headers.get("Location") or str(location))

    async def finish_upload(self, location: URL, h: Hash, data: bytes | None = None) -> None:
        """Close a session with ``PUT ?digest=`` (carrying ``data``, if any): the blob exists."""
        what = f"uploading blob {h} to {self.repo.context}"
        resp = await self.client.request(
            self.repo,
            "PUT",
            _with_digest(location, h),
            headers={"Content-Type": "application/octet-stream"} if data is not None else None,
            data=data,
            ok=(201, 204),
            scope=self._scope,
            what=what,
        )
        await self._check_stored(resp, h, what)

    @staticmethod
    async def _check_stored(resp: aiohttp.ClientResponse, h: Hash, what: str) -> None:
        async with resp:
            got = resp.headers.get("Docker-Content-Digest")
            if got and got != str(h):
                raise RemoteError(f"{what}: the registry stored it as {got}")

    # --- manifests -------------------------------------------------------------------

    async def manifest(self, identifier: str, raw: bytes, media_type: str) -> None:
        """Put a manifest with its exact bytes under a tag or its digest."""
        resp = await self.client.request(
            self.repo,
            "PUT",
            f"/v2/{self.repo.repository}/manifests/{identifier}",
            headers={"Content-Type": media_type},
            data=raw,
            ok=(201, 204),
            scope=self._scope,
            what=f"putting manifest {identifier} into {self.repo.context}",
        )
        async with resp:
            got = resp.headers.get("Docker-Content-Digest")
            want = str(Hash.of(raw))
            if got and got != want:
                raise RemoteError(f"{self.repo.context}: manifest stored as {got}, not {want}")
        self.stats.manifests += 1

    async def image(self, img: Image, identifier: str | None) -> Hash:
        """Every blob of ``img`` (in parallel), then its manifest; returns its digest."""
        m = await img.manifest()
        raw = await img.raw_manifest()
        digest = Hash.of(raw)
        raw_config = await img.raw_config_file()

        async def config() -> ByteReceiveStream:
            return BytesStream(raw_config)

        layers: list[Layer] = await img.layers()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.blob, m.config, config)
                for desc, layer in zip(m.layers, layers, strict=True):
                    tg.start_soon(self.blob, desc, layer.compressed)
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        await self.manifest(identifier or str(digest), raw, await img.media_type())
        return digest

    async def index(self, ii: ImageIndex, identifier: str | None, depth: int = 0) -> Hash:
        """Every child (by digest, in parallel), then the index itself; returns its digest."""
        if depth > MAX_INDEX_DEPTH:
            raise ManifestError(f"{self.repo}: indexes nested more than {MAX_INDEX_DEPTH} deep")
        raw = await ii.raw_manifest()
        children = (await ii.index_manifest()).manifests
        seen: set[Hash] = set()

        async def child(d: Descriptor) -> None:
            if is_index_type(d.media_type):
                await self.index(await ii.image_index(d.digest), str(d.digest), depth + 1)
            else:
                await self.image(await ii.image(d.digest), str(d.digest))

        try:
            async with anyio.create_task_group() as tg:
                for d in children:
                    if d.digest not in seen:
                        seen.add(d.digest)
                        tg.start_soon(child, d)
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        digest = Hash.of(raw)
        await self.manifest(identifier or str(digest), raw, await ii.media_type())
        return digest


async def write(
    client: Sender,
    ref: Reference,
    target: Image | ImageIndex,
    *,
    concurrency: int = 4,
    stats: PushStats | None = None,
) -> Hash:
    """Push ``target`` to ``ref`` (see :meth:`Client.write`); the digest put."""
    pusher = Pusher(client, ref, concurrency=concurrency, mount_from=source_of(target), stats=stats)
    tag = None if ref.digest is not None else ref.identifier
    if isinstance(target, ImageIndex) and not isinstance(target, Image):
        digest = await pusher.index(target, tag)
    else:
        digest = await pusher.image(target, tag)
    if ref.digest is not None and ref.digest != digest:
        raise ManifestError(f"{ref}: pushed {digest}, not the digest the reference names")
    return digest


async def write_layer(client: Sender, repo: Reference, layer: Layer) -> None:
    """Push one layer's compressed blob to the repository ``repo`` names."""
    media_type, size, digest = await layer.media_type(), await layer.size(), await layer.digest()
    desc = Descriptor(media_type=media_type, size=size, digest=digest)
    await Pusher(client, repo).blob(desc, layer.compressed)


async def delete(client: Sender, ref: Reference, digest: Hash) -> None:
    """Delete manifest ``digest`` from ``ref``'s repository."""
    resp = await client.request(
        ref,
        "DELETE",
        f"/v2/{ref.repository}/manifests/{digest}",
        ok=(200, 202),
        scope=f"repository:{ref.repository}:delete",
        what=f"deleting {ref.context}@{digest}",
    )
    resp.release()
