"""Claims: one machine fetches an entry from the origin while the others wait for the fleet.

Without them, machines that miss the same entry at once would each fetch it
from the origin. A claim is a manifest tagged ``claim-sha256-<hex>`` naming
its owner and when it expires: ``ttl`` seconds ahead, renewed every third of
that while the owner fills the entry, so a claimer that dies (``kill -9``, a
lost network) holds the others up for one ``ttl`` at most. A machine that
finds a live claim of another polls for the entry's tag until it appears
(then reads it from the fleet) or the claim lapses (then it fetches the
origin itself), the claim lapses, or a minute has passed. A claim that says
it lasts longer than a renewal could make it (a clock far ahead, or a
hostile writer) is not believed; a wait of more than five seconds is said.

A registry has no "create if absent", so two machines may claim at once:
each puts its claim, waits a moment (twice as long as its own look and put
took, so a loaded registry gets a longer moment), and reads the tag back;
the last put wins for both. The race this leaves (a read back before the other's put)
costs one extra origin fetch, never a wrong byte: entries are verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Protocol

import anyio

from .._hash import Hash
from ._entries import Claim, EntryInfo, claim_manifest, claim_tag, parse_claim

__all__ = ["Claims", "HeldClaim", "Manifests"]

log = logging.getLogger("aiolayercache.fleet")

# Seconds between putting a claim and reading it back (two machines' puts both land):
# at least SETTLE, twice what our own look and put took, at most MAX_SETTLE.
SETTLE = 0.1
MAX_SETTLE = 2.0
# However a claim is renewed, nobody waits on one entry longer than this (then it fetches
# the entry itself: a claimer that renews but never finishes costs one minute, once).
MAX_WAIT = 60.0
# A claim is believed while it expires within SKEW x ttl (renewals set ttl; the rest is
# room for clocks that differ).
SKEW = 1.5
# A wait longer than this is said (once per fleet cache).
WAIT_NOTICE = 5.0


class Manifests(Protocol):
    """The little of the fleet repository a claim needs."""

    async def read_tag(self, tag: str) -> bytes | None: ...
    async def put_tag(self, tag: str, raw: bytes) -> Hash: ...
    async def delete_manifest(self, digest: Hash) -> None: ...
    async def lookup(self, h: Hash) -> EntryInfo | None: ...
    async def ready(self) -> None: ...


class HeldClaim:
    """Our claim on one entry: renewed in the background until :meth:`release`."""

    def __init__(self, claims: Claims, h: Hash, digest: Hash) -> None:
        self._claims = claims
        self._h = h
        self.digest = digest
        self._lock = anyio.Lock()
        self._renewing = asyncio.create_task(self._renew())

    async def _renew(self) -> None:
        repo, ttl = self._claims.repo, self._claims.ttl
        stop = time.monotonic() + 600  # a fill nobody reads or closes: let it lapse
        try:
            while time.monotonic() < stop:
                await anyio.sleep(ttl / 3)
                async with self._lock:  # a release waits for a renewal under way
                    raw = claim_manifest(self._claims.owner, time.time() + ttl)
                    old, self.digest = self.digest, await repo.put_tag(claim_tag(self._h), raw)
                await repo.delete_manifest(old)  # (untagged now: only garbage)
        except Exception as exc:  # the claim lapses; the others then fetch themselves
            log.debug("fleet: renewing the claim on %s: %s", self._h, exc)

    async def release(self) -> None:
        async with self._lock:
            self._renewing.cancel()
        with contextlib.suppress(BaseException):
            await self._renewing
        await self._claims.repo.delete_manifest(self.digest)


class Claims:
    """Claims on entries of one fleet repository, for one process."""

    def __init__(self, repo: Manifests, ttl: float, max_wait: float = MAX_WAIT) -> None:
        self.repo = repo
        self.ttl = ttl
        self.max_wait = max_wait
        self.owner = secrets.token_hex(12)
        self.waits = 0  # entries read from the fleet after waiting for another's claim
        self._noticed = False

    async def _current(self, h: Hash) -> Claim | None:
        """The live claim on ``h``, if any and believable."""
        raw = await self.repo.read_tag(claim_tag(h))
        claim = parse_claim(raw) if raw is not None else None
        if claim is None or not claim.live or claim.expires > time.time() + SKEW * self.ttl:
            return None
        return claim

    async def claim_or_wait(self, h: Hash) -> HeldClaim | EntryInfo | None:
        """Claim ``h``, or wait for whoever holds it.

        Returns our claim (we fetch; release it when done), the entry another
        machine put while we waited (read it from the fleet), or None (fetch
        from the origin without a claim).
        """
        await self.repo.ready()  # what a claim's manifest needs is there: the put is quick
        for _ in range(2):  # a second round after a claim lapsed: claim it (and clean up)
            started = time.monotonic()
            held = await self._current(h)
            if held is None:
                raw = claim_manifest(self.owner, time.time() + self.ttl)
                mine = await self.repo.put_tag(claim_tag(h), raw)
                # Another machine that saw no claim when we did puts its own about as long
                # after its look as ours took: wait twice that (loaded registries are
                # slow) before reading back who won.
                took = time.monotonic() - started
                await anyio.sleep(min(MAX_SETTLE, max(SETTLE, 2 * took)))
                held = await self._current(h)
                if held is None or held.owner == self.owner:
                    return HeldClaim(self, h, mine)
            info = await self._wait(h)
            if info is not None:
                return info
        return None

    async def _wait(self, h: Hash) -> EntryInfo | None:
        delay = 0.05
        polls = 0
        give_up = time.monotonic() + self.max_wait
        started = time.monotonic()
        while time.monotonic() < give_up:
            if not self._noticed and time.monotonic() - started > WAIT_NOTICE:
                self._noticed = True
                log.warning("fleet: waiting for another machine's fill of %s (its claim)", h)
            info = await self.repo.lookup(h)
            if info is not None:
                self.waits += 1
                return info
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 1.0)
            polls += 1
            if polls % 4 == 0 and await self._current(h) is None:
                break  # the claimer finished, gave up or died: look once more
        info = await self.repo.lookup(h)
        if info is not None:
            self.waits += 1
        return info
