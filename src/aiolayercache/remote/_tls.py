"""TLS for registries: one ``ssl.SSLContext`` per registry, and certificate failures in plain words.

The context starts from the system store (OpenSSL's default paths, so
``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are honoured), adds ``ca_file`` and
the registry's ``certs.d`` directory, as containers/image and docker read it:
``*.crt`` are extra CA certificates, ``*.cert`` + ``*.key`` a client pair.
The directory is ``cert_dir`` when given (skopeo's ``--cert-dir``), else the
first of ``~/.config/containers/certs.d/HOST[:PORT]``,
``/etc/containers/certs.d/HOST[:PORT]`` and ``/etc/docker/certs.d/HOST[:PORT]``
that exists.

A certificate failure is not transient: :func:`tls_problem` finds it behind
an aiohttp error and :func:`describe` says what went wrong ("certificate
signed by an unknown authority", "certificate is for X, not Y", ...).
"""

from __future__ import annotations

import datetime
import functools
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from anyio.streams.tls import TLSAttribute

from ._errors import RemoteError

__all__ = [
    "CLIENT_CERT_ALERTS",
    "TLSConfig",
    "build_context",
    "certs_dir",
    "describe",
    "probe_context",
    "tls_problem",
]

StrPath = str | os.PathLike[str]

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the diagnostic handshake reads an expired certificate.
_NO_CHECK_TIME = 0x200000
# X509_V_ERR_*: the chain does not end at a CA we trust.
_UNKNOWN_AUTHORITY = frozenset({2, 18, 19, 20, 21, 27})
_EXPIRED, _NOT_YET_VALID = 10, 9
_NAME_MISMATCH = frozenset({62, 63, 64})  # host name, e-mail, IP address
# Alerts a server sends about our client certificate (missing, unknown or refused).
CLIENT_CERT_ALERTS = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)
DIAGNOSE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """The TLS files a client was given (the ``Client`` keywords of the same names)."""

    ca_file: StrPath | None = None
    cert_file: StrPath | None = None
    key_file: StrPath | None = None
    cert_dir: StrPath | None = None


def certs_roots() -> tuple[Path, ...]:
    """The ``certs.d`` roots searched, in order (read at call time: ``HOME`` may change)."""
    return (
        Path("~/.config/containers/certs.d").expanduser(),
        Path("/etc/containers/certs.d"),
        Path("/etc/docker/certs.d"),
    )


def certs_dir(name: str, cfg: TLSConfig) -> Path | None:
    """The ``certs.d`` directory for registry ``name`` (``HOST[:PORT]``), or None."""
    if cfg.cert_dir is not None:
        d = Path(cfg.cert_dir)
        if not d.is_dir():
            raise RemoteError(f"TLS setup for {name}: cert dir {d} is not a directory")
        return d
    for root in certs_roots():
        d = root / name
        if d.is_dir():
            return d
    return None


def _client_pair(name: str, d: Path) -> tuple[Path, Path] | None:
    certs = sorted(d.glob("*.cert"))
    keys = sorted(d.glob("*.key"))
    for key in keys:
        if key.with_suffix(".cert") not in certs:
            raise RemoteError(f"TLS setup for {name}: {key} has no matching {key.stem}.cert")
    for cert in certs:
        if cert.with_suffix(".key") not in keys:
            raise RemoteError(f"TLS setup for {name}: {cert} has no matching {cert.stem}.key")
    return (certs[0], certs[0].with_suffix(".key")) if certs else None


def build_context(
    name: str, cfg: TLSConfig, *, verify: bool = True, diagnostic: bool = False
) -> tuple[ssl.SSLContext, bool]:
    """The context for registry ``name`` and whether it holds a client certificate.

    Blocking (it reads files): run it in a thread. ``verify=False`` (an
    insecure registry) accepts any certificate. ``diagnostic`` checks the
    chain but neither the host name nor the dates, to read a failing
    certificate (:func:`describe`).
    """
    try:
        d = certs_dir(name, cfg)
        plain = cfg.ca_file is None and cfg.cert_file is None and d is None
        if plain and verify and not diagnostic:
            # Nothing of the registry's own: the system store, loaded once per process.
            return _system_context(
                os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
            ), False
        if verify:
            ctx = ssl.create_default_context()
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.ca_file is not None:
            ctx.load_verify_locations(cafile=os.fspath(cfg.ca_file))
        pair: tuple[StrPath, StrPath | None] | None = None
        if cfg.cert_file is not None:
            pair = (cfg.cert_file, cfg.key_file)
        if d is not None:
            for crt in sorted(d.glob("*.crt")):
                if not crt.is_file():  # (a FIFO would hang the load; a dir is not a file)
                    raise ValueError(f"{crt} is not a regular file")
                ctx.load_verify_locations(cafile=os.fspath(crt))
            found = _client_pair(name, d)
            pair = pair or found
        if pair is not None:
            cert, key = pair
            ctx.load_cert_chain(os.fspath(cert), None if key is None else os.fspath(key))
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise RemoteError(f"TLS setup for {name}: {exc}") from None
    if verify and diagnostic:
        ctx.check_hostname = False
        ctx.verify_flags |= _NO_CHECK_TIME
    return ctx, pair is not None


@functools.lru_cache(maxsize=4)
def _system_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """The system store (keyed by the variables OpenSSL reads): loading it takes tens of ms."""
    return ssl.create_default_context()


def probe_context() -> ssl.SSLContext:
    """A context that checks nothing: the scheme probe only asks whether TLS is spoken."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_problem(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc`` that trying again cannot fix, or None.

    A failed certificate check, an alert about our client certificate, or a
    handshake that failed (the server does not speak TLS); not an EOF or a
    reset, which may be transient.
    """
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        # aiohttp's ClientConnectorSSLError is an SSLError too: the one below it tells why.
        if isinstance(seen, ssl.SSLError) and not isinstance(
            seen, ssl.SSLEOFError | ssl.SSLZeroReturnError | aiohttp.ClientError
        ):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _cert_date(value: Any) -> str:
    if not isinstance(value, str):
        return "an unknown date"
    when = datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(value), datetime.UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _cert_names(cert: dict[str, Any]) -> list[str]:
    names = [v for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "IP Address")]
    if not names:
        for rdn in cert.get("subject", ()):
            names += [v for k, v in rdn if k == "commonName"]
    return [str(n).rstrip("\n") for n in names]


async def _peer_certificate(host: str, port: int, ctx: ssl.SSLContext) -> dict[str, Any] | None:
    """The server's certificate, read with ``ctx`` (a diagnostic context); None on any failure."""
    try:
        with anyio.fail_after(DIAGNOSE_TIMEOUT):
            stream = await anyio.connect_tcp(
                host, port, ssl_context=ctx, tls_standard_compatible=False
            )
            async with stream:
                cert = stream.extra(TLSAttribute.peer_certificate)
    except (OSError, TimeoutError, ssl.SSLError, anyio.BrokenResourceError):
        return None
    return dict(cert) if cert else None


async def describe(
    err: ssl.SSLError,
    host: str,
    port: int,
    *,
    client_cert: bool,
    diagnostic: ssl.SSLContext | None,
) -> str:
    """``err`` in plain words, naming ``host:port``.

    ``diagnostic`` (a context from ``build_context(diagnostic=True)``; None
    when a proxy stands between us) is used to read the certificate for its
    names or dates.
    """
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if isinstance(err, ssl.SSLCertVerificationError):
        code = err.verify_code
        if code in _UNKNOWN_AUTHORITY:
            why = "certificate signed by an unknown authority"
        elif code in (_EXPIRED, _NOT_YET_VALID) or code in _NAME_MISMATCH:
            cert = None
            if diagnostic is not None:
                cert = await _peer_certificate(host, port, diagnostic)
            if code == _EXPIRED:
                why = "certificate expired" + (
                    f" on {_cert_date(cert.get('notAfter'))}" if cert else ""
                )
            elif code == _NOT_YET_VALID:
                why = "certificate is not valid yet" + (
                    f" (from {_cert_date(cert.get('notBefore'))})" if cert else ""
                )
            else:
                names = _cert_names(cert) if cert else []
                shown = ", ".join(names[:5]) if names else "another name"
                why = f"certificate is for {shown}, not {host}"
        else:
            why = f"certificate verify failed: {err.verify_message}"
    elif err.reason in CLIENT_CERT_ALERTS:
        if client_cert:
            why = "the registry refused our client certificate"
        else:
            why = "the registry asked for a client certificate and we have none"
    else:
        detail = (err.reason or "handshake failed").lower().replace("_", " ")
        why = f"TLS handshake failed ({detail}); does the registry speak TLS on this port?"
    return f"TLS with {where} failed: {why}"
