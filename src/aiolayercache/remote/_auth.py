"""WWW-Authenticate challenges and bearer tokens (credentials come from ``_credentials``).

The token flow is sans-I/O, as httpx's ``Auth``: :func:`check_realm` says
where a token may be asked for, :func:`token_request` what to send there,
:func:`parse_token` reads the answer, and :class:`TokenCache` fetches each
``(endpoint, scope)`` token once for every task. The client does the I/O.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field

import anyio
from yarl import URL

from ._credentials import Credentials, CredentialStore, load_docker_config
from ._errors import UnauthorizedError, redact
from ._reference import Reference
from ._urls import check_target

__all__ = [
    "MAX_TOKEN_BYTES",
    "Challenge",
    "CredentialStore",
    "Credentials",
    "Token",
    "TokenCache",
    "TokenRequest",
    "check_realm",
    "load_docker_config",
    "parse_challenges",
    "parse_token",
    "token_request",
]

MAX_TOKEN_BYTES = 1024 * 1024
_TOKEN_VALUE = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a scheme (lowercased) and its parameters."""

    scheme: str
    params: dict[str, str]


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(rf"\s*({_TOKEN})\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|({_TOKEN}))\s*")
_SCHEME = re.compile(rf"\s*({_TOKEN})(?:\s+|$|(?=,))")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value (RFC 7235): several challenges, quoted strings.

    Unparseable parts end the parse; what was read so far is returned.
    """
    out: list[Challenge] = []
    pos = 0
    n = len(header)
    while pos < n:
        while pos < n and header[pos] in " ,":
            pos += 1
        m = _SCHEME.match(header, pos)
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while pos < n:
            pm = _PARAM.match(header, pos)
            if not pm:
                break
            key = pm.group(1).lower()
            val = pm.group(2)
            val = re.sub(r"\\(.)", r"\1", val) if val is not None else pm.group(3)
            params.setdefault(key, val)
            pos = pm.end()
            if pos < n and header[pos] == ",":
                pos += 1
                # A comma can end this challenge: does a new scheme follow?
                nxt = _SCHEME.match(header, pos)
                if nxt and not _PARAM.match(header, pos):
                    break
        out.append(Challenge(scheme, params))
    return out


def check_realm(realm: str, registry: Reference, insecure: bool) -> URL:
    """The token endpoint a bearer challenge names, if credentials may go there.

    Raises :class:`UnauthorizedError` for a realm :func:`check_target` refuses.
    """
    try:
        u = URL(realm)
    except ValueError:
        raise UnauthorizedError(f"{registry.context}: bad token realm") from None
    reason = check_target(u, registry, insecure)
    if reason is not None:
        raise UnauthorizedError(f"{registry.context}: token realm {redact(u)} {reason}")
    return u


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """What to send to a token realm: a GET with a query, or a POST of a refresh-token form."""

    method: str
    url: URL
    headers: dict[str, str]
    form: dict[str, str] | None = None


def token_request(realm: URL, ch: Challenge, scope: str, creds: Credentials) -> TokenRequest:
    """The request for a ``scope`` token from ``realm`` (checked) for challenge ``ch``."""
    query: list[tuple[str, str]] = []
    if ch.params.get("service"):
        query.append(("service", ch.params["service"]))
    # Several scopes (push here, pull from a mount's source) go as several parameters.
    query.extend(("scope", s) for s in scope.split())
    if creds.identity_token:
        form = dict(query)
        form["scope"] = " ".join(scope.split())  # OAuth 2: one space-separated field
        form.update(
            grant_type="refresh_token",
            refresh_token=creds.identity_token,
            client_id="aiolayercache",
        )
        return TokenRequest("POST", realm, {}, form)
    headers = {} if creds.empty else {"Authorization": creds.basic()}
    return TokenRequest("GET", realm.update_query(query), headers)


@dataclass(slots=True)
class Token:
    """A bearer token and when to fetch a new one (a ``time.monotonic()`` deadline)."""

    value: str = field(repr=False)
    expires: float

    @property
    def fresh(self) -> bool:
        return self.expires > time.monotonic()


def parse_token(body: bytes, what: str, realm: URL) -> Token:
    """The token in a token server's answer; refreshed a little before it expires."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        doc = None
    value = None
    if isinstance(doc, dict):
        value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise UnauthorizedError(
            f"{what}: token response has no token", url=redact(realm), status=200
        )
    if not _TOKEN_VALUE.fullmatch(value):
        # It goes into an Authorization header: no spaces, controls or non-ASCII.
        raise UnauthorizedError(
            f"{what}: token response has a malformed token", url=redact(realm), status=200
        )
    expires_in = doc.get("expires_in") if isinstance(doc, dict) else None
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
        expires_in = 60
    try:
        expires_in = float(expires_in)
    except OverflowError:  # an int too big for a float
        expires_in = 60.0
    if not math.isfinite(expires_in):
        expires_in = 60.0
    expires_in = max(expires_in, 60.0)
    # Refresh a little before the server's expiry.
    return Token(value, time.monotonic() + expires_in * 0.9 - 5)


class TokenCache(Mapping[tuple[str, str], Token]):
    """Bearer tokens per ``(endpoint, scope)``; each fetched once however many tasks ask.

    Read it as a mapping; :meth:`get_or_fetch` is the only way in.
    """

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str], Token] = {}
        self._locks: dict[tuple[str, str], anyio.Lock] = {}

    def __getitem__(self, key: tuple[str, str]) -> Token:
        return self._tokens[key]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return f"<TokenCache {len(self._tokens)} tokens>"

    async def get_or_fetch(
        self, key: tuple[str, str], stale: str | None, fetch: Callable[[], Awaitable[Token]]
    ) -> str:
        """The cached token for ``key``, unless expired or the one ``stale`` was refused with.

        ``stale`` is the ``Authorization`` value a 401 answered. One task fetches;
        the others wait for it under the key's lock.
        """
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock:
            tok = self._tokens.get(key)
            if tok is not None and tok.fresh and f"Bearer {tok.value}" != stale:
                return tok.value
            tok = await fetch()
            self._tokens[key] = tok
            return tok.value
