"""Docker credential helpers: ``docker-credential-NAME get``, run once per server, bounded.

The protocol (docker/docker-credential-helpers): the server URL on stdin, JSON
``{"Username": ..., "Secret": ...}`` on stdout; ``<token>`` as the user name
means ``Secret`` is an identity token. A helper without an entry exits non-zero
saying ``credentials not found in native keychain``: no credentials, not an
error. Anything else that goes wrong (missing, a failure, no answer within the
bound, an answer that is not credentials) is a :class:`CredentialHelperError`
naming the helper, which fails the request as docker does. The helper's output
is never shown or logged: it may hold a secret.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess

import anyio
import anyio.to_thread
from anyio.abc import ByteReceiveStream

from ._errors import UnauthorizedError

__all__ = ("HELPER_TIMEOUT", "CredentialHelperError", "Helpers", "run_helper")

HELPER_TIMEOUT = 10.0
MAX_HELPER_OUTPUT = 64 * 1024
NOT_FOUND = "credentials not found in native keychain"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class CredentialHelperError(UnauthorizedError):
    """Raised when a credential helper is missing, fails, hangs or answers nonsense.

    ``helper`` is the executable's name (``docker-credential-NAME``), ``server``
    what it was asked for. The message never holds the helper's output.
    """

    def __init__(self, helper: str, server: str, reason: str) -> None:
        self.helper = helper
        self.server = server
        self.reason = reason
        super().__init__(f"credential helper {helper} (for {server}) {reason}", method="")


async def _drain(stream: ByteReceiveStream | None, into: bytearray) -> None:
    """Read ``stream`` to its end, keeping at most MAX_HELPER_OUTPUT + 1 bytes."""
    if stream is None:
        return
    async for chunk in stream:
        if len(into) <= MAX_HELPER_OUTPUT:
            into += chunk[: MAX_HELPER_OUTPUT + 1 - len(into)]


async def _run(exe: str, server: str) -> tuple[int, bytes]:
    """Run ``exe get`` with ``server`` on stdin: its exit code and (capped) stdout.

    The helper runs in a session of its own, so that when it is cut short (a
    timeout, a cancellation) the whole group (a shell script's ``sleep`` too)
    is killed, and no orphan keeps the pipes open.
    """
    out, err = bytearray(), bytearray()
    process = await anyio.open_process(
        [exe, "get"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    finished = False
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_drain, process.stdout, out)
            tg.start_soon(_drain, process.stderr, err)  # read and dropped: never shown
            if process.stdin is not None:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await process.stdin.send(server.encode())
                await process.stdin.aclose()
        code = await process.wait()
        finished = True
    finally:
        with anyio.CancelScope(shield=True):
            if not finished:  # the helper, or a child of it holding the pipes
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
            await process.aclose()
    return code, bytes(out)


async def run_helper(name: str, server: str, bound: float) -> tuple[str, str] | None:
    """``(Username, Secret)`` from ``docker-credential-NAME get``, or None if it has none.

    :raises CredentialHelperError: the helper is missing, failed, gave no
        answer within ``bound`` seconds, or answered something else.
    """
    helper = f"docker-credential-{name}"
    if not _NAME.fullmatch(name):
        raise CredentialHelperError(helper[:120], server, "is not a valid helper name")
    exe = await anyio.to_thread.run_sync(shutil.which, helper)
    if exe is None:
        raise CredentialHelperError(helper, server, "is not on PATH")
    try:
        with anyio.fail_after(bound):
            code, out = await _run(exe, server)
    except TimeoutError:
        raise CredentialHelperError(helper, server, f"gave no answer in {bound:g} s") from None
    except OSError as exc:
        raise CredentialHelperError(
            helper, server, f"could not be run: {exc.strerror or type(exc).__name__}"
        ) from None
    if code != 0:
        if out.strip().decode(errors="replace") == NOT_FOUND:
            return None
        raise CredentialHelperError(helper, server, f"failed (exit status {code})")
    try:
        doc = json.loads(out) if len(out) <= MAX_HELPER_OUTPUT else None
    except (ValueError, RecursionError):
        doc = None
    user = doc.get("Username") if isinstance(doc, dict) else None
    secret = doc.get("Secret") if isinstance(doc, dict) else None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise CredentialHelperError(helper, server, "answered something that is not credentials")
    return (user, secret) if (user or secret) else None


class Helpers:
    """Helper answers per ``(helper, server)``: each helper runs once per server.

    Concurrent first asks share one run (the others wait under the key's
    lock); a failure is remembered too, so a hanging helper costs its bound
    once per client, not once per request.
    """

    def __init__(self, timeout: float = HELPER_TIMEOUT) -> None:
        self.timeout = timeout
        self._done: dict[tuple[str, str], tuple[str, str] | CredentialHelperError | None] = {}
        self._locks: dict[tuple[str, str], anyio.Lock] = {}

    async def get(self, name: str, server: str) -> tuple[str, str] | None:
        key = (name, server)
        async with self._locks.setdefault(key, anyio.Lock()):
            if key not in self._done:
                try:
                    self._done[key] = await run_helper(name, server, self.timeout)
                except CredentialHelperError as exc:
                    self._done[key] = exc
            got = self._done[key]
        if isinstance(got, CredentialHelperError):
            raise CredentialHelperError(got.helper, got.server, got.reason)
        return got
