"""``Once``: a value computed on first ask, once, however many tasks ask at the same time.

The one home of the "compute once under a lock" idiom (a diff_id hashed from
a stream, a config fetched, an index converted): tasks that ask while the
value is being computed wait for that computation instead of starting
their own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio

__all__ = ["Once"]

T = TypeVar("T")


class Once(Generic[T]):
    """The result of ``compute()``, computed on the first :meth:`get` and then kept.

    ``value``, when given (not None), is the result already: ``compute`` never
    runs. If ``compute`` raises (or is cancelled), nothing is kept and the
    next :meth:`get` computes again.
    """

    __slots__ = ("_compute", "_lock", "_value")

    def __init__(self, compute: Callable[[], Awaitable[T]], value: T | None = None) -> None:
        self._compute = compute
        self._value = value
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"Once({'pending' if self._value is None else repr(self._value)})"

    def peek(self) -> T | None:
        """The value if it is known already, else None; never computes."""
        return self._value

    async def get(self) -> T:
        """The value: computed now by the first caller, waited for by the others."""
        if self._value is None:
            async with self._lock:
                if self._value is None:
                    self._value = await self._compute()
        return self._value
