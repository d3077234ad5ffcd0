"""Progress: the reporter, and the wrappers that tell it what goes by.

:class:`ObservedImage` and :class:`ObservedIndex` wrap what a pull writes (or a
copy pushes), so each layer stream it opens is counted: bytes fetched or read
from the cache, shown as rich bars on a terminal or as log lines otherwise.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from anyio.abc import ByteReceiveStream

from .. import Hash, Image, ImageIndex, Layer
from .._attrs import StreamAttribute
from .._wrap import ImageWrapper, IndexWrapper, LayerWrapper
from ._args import human

__all__ = ["ObservedImage", "ObservedIndex", "Reporter", "Stats"]


@dataclass
class Stats:
    images: int = 0
    layers: int = 0
    hits: int = 0
    bytes_fetched: int = 0
    bytes_from_cache: int = 0
    from_fleet: int = 0  # layers (of ``hits``) the fleet tier served
    started: float = field(default_factory=time.monotonic)
    seen: set[str] = field(default_factory=set)


class Reporter:
    """Progress: rich bars on a terminal, log lines otherwise, nothing when quiet."""

    def __init__(self, mode: str, action: str = "pull") -> None:
        self.mode = mode  # rich | plain | quiet
        self.action = action  # pull | copy: what the layers streamed are for
        self.stats = Stats()
        self.fleet = False  # a fleet tier is in use: the summary tells its hits apart
        self.evicted = 0  # entries a bounded cache evicted during the command
        self._progress: Any = None
        self._total: Any = None
        self._tasks: dict[str, Any] = {}
        if mode == "rich":
            # Imported here, once: rich costs about 35 ms of start-up, and only a pull on a
            # terminal draws bars (plain and quiet pulls, scripts and CI never load it).
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
            self._total = self._progress.add_task("total", total=0)

    def log(self, msg: str) -> None:
        if self.mode == "plain":
            print(msg, file=sys.stderr, flush=True)
        elif self.mode == "rich":
            self._progress.console.print(msg, highlight=False)

    def layer_started(self, digest: str, size: int, cached: bool, tier: str | None = None) -> bool:
        """Count a layer once; returns False when it was already counted."""
        if digest in self.stats.seen:
            return False
        self.stats.seen.add(digest)
        self.stats.layers += 1
        if cached:
            self.stats.hits += 1
        if tier == "fleet":
            self.stats.from_fleet += 1
        if self.mode == "rich":
            t = self._progress.tasks[self._total].total or 0
            self._progress.update(self._total, total=t + size)
            doing = "pushing" if self.action == "copy" else "fetching"
            label = f"{digest[7:19]} {'[green]cached[/]' if cached else doing}"
            self._tasks[digest] = self._progress.add_task(label, total=size)
        return True

    def advance(self, digest: str, n: int, cached: bool) -> None:
        if cached:
            self.stats.bytes_from_cache += n
        else:
            self.stats.bytes_fetched += n
        if self.mode == "rich":
            task = self._tasks.get(digest)
            if task is not None:
                self._progress.advance(task, n)
            self._progress.advance(self._total, n)

    def layer_done(self, digest: str, size: int, cached: bool) -> None:
        if self.mode == "rich":
            task = self._tasks.pop(digest, None)
            if task is not None:
                self._progress.remove_task(task)
        how = "from cache" if cached else "fetched"
        if self.action == "copy":
            how = f"pushed ({'read from the cache' if cached else 'read from the source'})"
        self.log(f"layer {digest[:19]} {human(size)} {how}")

    def image_done(self, name: str, digest: Hash) -> None:
        self.stats.images += 1
        self.log(f"{'copied' if self.action == 'copy' else 'pulled'} {name} ({digest})")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def summary(self) -> str:
        s = self.stats
        wall = time.monotonic() - s.started
        hits = f"{s.hits} cache hits"
        if self.fleet:
            local = s.hits - s.from_fleet
            hits = (
                f"{local} from the local cache, {s.from_fleet} from the fleet, "
                f"{s.layers - s.hits} from the origin"
            )
        evicted = f", {self.evicted} cache entries evicted" if self.evicted else ""
        return (
            f"{s.images} image{'s' if s.images != 1 else ''}, {s.layers} layers "
            f"({hits}), {human(s.bytes_fetched)} fetched, "
            f"{human(s.bytes_from_cache)} from cache{evicted}, {wall:.2f}s"
        )


class _CountingStream(ByteReceiveStream):
    """Passes a layer stream through, telling the reporter how many bytes went by.

    The bytes are unchanged, so it declares what its inner stream declares; a
    proven file copied by descriptor is counted through its ``consumed`` hook.
    """

    def __init__(self, inner: ByteReceiveStream, rep: Reporter, digest: str, size: int) -> None:
        self._inner = inner
        self._rep = rep
        self._digest = digest
        self._size = size
        # Bytes a slower tier (the fleet) serves count as cached, whatever filled from them.
        tier = inner.extra(StreamAttribute.tier, None)
        self._cached = inner.extra(StreamAttribute.from_cache, False) or tier is not None
        self._seen = 0
        self._attrs: dict[Any, Callable[[], Any]] = dict(inner.extra_attributes)
        proven = inner.extra(StreamAttribute.proven_file, None)
        if proven is not None:
            counted = dataclasses.replace(proven, consumed=self._consumed)
            self._attrs[StreamAttribute.proven_file] = lambda: counted
        rep.layer_started(digest, size, self._cached, tier)

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._attrs

    async def receive(self, max_bytes: int = 1 << 20) -> bytes:
        data = await self._inner.receive(max_bytes)
        self._seen += len(data)
        self._rep.advance(self._digest, len(data), self._cached)
        return data

    def _consumed(self, n: int) -> None:
        self._seen += n
        self._rep.advance(self._digest, n, self._cached)

    async def aclose(self) -> None:
        await self._inner.aclose()
        if self._seen >= self._size:
            self._rep.layer_done(self._digest, self._size, self._cached)


class _ObservedLayer(LayerWrapper):
    def __init__(self, inner: Layer, rep: Reporter) -> None:
        super().__init__(inner)
        self._rep = rep

    async def compressed(self) -> ByteReceiveStream:
        digest = await self._inner.digest()
        size = await self._inner.size()
        # Cached or fetched is known once the stream is open (another process may have
        # filled the entry while this one waited for it).
        inner = await self._inner.compressed()
        return _CountingStream(inner, self._rep, str(digest), size)


class ObservedImage(ImageWrapper):
    """An image whose layers are counted by ``rep`` as they stream."""

    def __init__(self, inner: Image, rep: Reporter) -> None:
        super().__init__(inner)
        self._rep = rep

    async def layers(self) -> list[Layer]:
        return [_ObservedLayer(x, self._rep) for x in await self._inner.layers()]

    async def layer_by_digest(self, h: Hash) -> Layer:
        return _ObservedLayer(await self._inner.layer_by_digest(h), self._rep)


class ObservedIndex(IndexWrapper):
    """An index whose images (and their layers) are counted by ``rep``."""

    def __init__(self, inner: ImageIndex, rep: Reporter) -> None:
        super().__init__(inner)
        self._rep = rep

    async def image(self, h: Hash) -> Image:
        return ObservedImage(await self._inner.image(h), self._rep)

    async def image_index(self, h: Hash) -> ImageIndex:
        return ObservedIndex(await self._inner.image_index(h), self._rep)
