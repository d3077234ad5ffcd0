"""Claims: one machine fetches an entry from the origin while the others wait for the fleet.

Without them, machines that miss the same entry at once would each fetch it
from the origin. A claim is a manifest tagged ``claim-sha256-<hex>`` naming
its owner and a time it expires. A machine that finds a live claim of
another polls for the entry's tag until it appears (then reads it from the
fleet), the claim goes away or expires (then it fetches the origin itself).
A registry has no "create if absent", so two machines may claim at once:
each puts its claim, waits a moment, and reads the tag back; the last put
wins for both. The race this leaves (a read back before the other's put)
costs one extra origin fetch, never a wrong byte: entries are verified.
"""

from __future__ import annotations

import secrets
import time
from typing import Protocol

import anyio

from .._hash import Hash
from ._entries import Claim, EntryInfo, claim_manifest, claim_tag, parse_claim

__all__ = ["Claims", "Manifests"]

# Seconds between putting a claim and reading it back (two machines' puts both land).
SETTLE = 0.1
# Bytes per second a claimer is assumed to get at least from the origin: sets its lease.
LEASE_RATE = 10 * 1024 * 1024


class Manifests(Protocol):
    """The little of the fleet repository a claim needs."""

    async def read_tag(self, tag: str) -> bytes | None: ...
    async def put_tag(self, tag: str, raw: bytes) -> Hash: ...
    async def ready(self) -> None: ...
    async def delete_manifest(self, digest: Hash) -> None: ...
    async def lookup(self, h: Hash) -> EntryInfo | None: ...


class Claims:
    """Claims on entries of one fleet repository, for one process."""

    def __init__(self, repo: Manifests, lease: float) -> None:
        self._repo = repo
        self.lease = lease
        self.owner = secrets.token_hex(12)
        self.waits = 0  # entries read from the fleet after waiting for another's claim

    async def _current(self, h: Hash) -> Claim | None:
        raw = await self._repo.read_tag(claim_tag(h))
        return parse_claim(raw) if raw is not None else None

    async def claim_or_wait(self, h: Hash, size: int | None) -> Hash | EntryInfo | None:
        """Claim ``h``, or wait for whoever holds it.

        Returns the digest of our claim's manifest (we fetch; release it when
        done), the entry another machine put while we waited (read it from the
        fleet), or None (fetch from the origin without a claim).
        """
        await self._repo.ready()  # what a claim's manifest needs is there: the put is quick
        held = await self._current(h)
        if held is None or not held.live:
            lease = self.lease + (size or 0) / LEASE_RATE
            mine = await self._repo.put_tag(
                claim_tag(h), claim_manifest(self.owner, time.time() + lease)
            )
            await anyio.sleep(SETTLE)
            held = await self._current(h)
            if held is None or held.owner == self.owner:
                return mine
        return await self._wait(h, held)

    async def _wait(self, h: Hash, held: Claim) -> EntryInfo | None:
        delay = 0.05
        polls = 0
        deadline = min(held.expires, time.time() + self.lease + 60)
        while time.time() < deadline:
            info = await self._repo.lookup(h)
            if info is not None:
                self.waits += 1
                return info
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 1.0)
            polls += 1
            if polls % 4 == 0:
                now = await self._current(h)
                if now is None or not now.live:
                    break  # the claimer gave up, or died: fetch it ourselves
                if now.owner != held.owner:  # another took over: wait for that one
                    held = now
                    deadline = min(held.expires, time.time() + self.lease + 60)
        return await self._repo.lookup(h)

    async def release(self, digest: Hash) -> None:
        await self._repo.delete_manifest(digest)
