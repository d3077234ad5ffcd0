"""When to try a request again: the policy, ``Retry-After``, and the per-registry budget."""

from __future__ import annotations

import email.utils
import random as _random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "RETRY_STATUSES",
    "RetryBudget",
    "RetryPolicy",
    "is_exhausted_quota",
    "parse_retry_after",
]

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


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


def is_exhausted_quota(
    status: int, headers: Mapping[str, str], retry_after: float | None, policy: RetryPolicy
) -> bool:
    """A 429 whose quota is spent (``ratelimit-remaining: 0``) for longer than we would wait."""
    quota = headers.get("ratelimit-remaining", "").strip().startswith("0")
    return status == 429 and quota and (retry_after is None or retry_after > policy.retry_after_cap)


class RetryBudget:
    """The retries left per registry endpoint, shared by every task of one client.

    The policy is passed per call, so a client whose ``retry`` is replaced
    uses the new budget at once.
    """

    def __init__(self) -> None:
        self._left: dict[str, float] = {}

    def spend(self, endpoint: str, policy: RetryPolicy) -> bool:
        """Take one retry from ``endpoint``'s budget; False when none is left."""
        left = self._left.get(endpoint, policy.retry_budget)
        if left < 1:
            return False
        self._left[endpoint] = left - 1
        return True

    def refund(self, endpoint: str, policy: RetryPolicy) -> None:
        """An answered request gives back part of a retry, up to the full budget."""
        left = self._left.get(endpoint)
        if left is not None:
            self._left[endpoint] = min(policy.retry_budget, left + policy.retry_refund)
