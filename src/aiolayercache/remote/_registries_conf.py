"""containers ``registries.conf`` (v2 TOML): where it is, what it says, which table a name picks.

Read as skopeo reads it: ``$CONTAINERS_REGISTRIES_CONF``, else
``$XDG_CONFIG_HOME/containers/registries.conf`` (``~/.config/…``) when it
exists, else ``/etc/containers/registries.conf``; then the drop-ins
``registries.conf.d/*.conf`` beside that file, in name order, a later
``[[registry]]`` replacing an earlier one with the same ``prefix``. Keys this
package does not use (``unqualified-search-registries``, ``[aliases]``, …)
are left alone; the v1 tables ``[registries.insecure]`` and
``[registries.block]`` are read as containers/image reads them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .._errors import AioLayerCacheError

__all__ = [
    "ALL",
    "DIGEST_ONLY",
    "TAG_ONLY",
    "Mirror",
    "RegistriesConf",
    "RegistriesConfError",
    "RegistryEntry",
    "conf_files",
    "load_registries_conf",
]

log = logging.getLogger("aiolayercache.remote")

ALL, DIGEST_ONLY, TAG_ONLY = "all", "digest-only", "tag-only"
SYSTEM_CONF = "/etc/containers/registries.conf"
MAX_CONF_BYTES = 1 << 20
_REGISTRY_KEYS = {"prefix", "location", "insecure", "blocked", "mirror-by-digest-only", "mirror"}
_MIRROR_KEYS = {"location", "insecure", "pull-from-mirror"}


class RegistriesConfError(AioLayerCacheError, ValueError):
    """A registries.conf file (or ``mirrors=``) is not valid TOML or has a bad field.

    The message names the file and what is wrong with it.
    """


@dataclass(frozen=True, slots=True)
class Mirror:
    """A ``[[registry.mirror]]``: where to try first, and for which pulls."""

    location: str
    insecure: bool = False
    pull_from_mirror: str = ALL

    def serves(self, by_digest: bool, digest_only: bool) -> bool:
        """True when a pull by digest (or by tag) may use this mirror."""
        if digest_only or self.pull_from_mirror == DIGEST_ONLY:
            return by_digest
        if self.pull_from_mirror == TAG_ONLY:
            return not by_digest
        return True


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """A ``[[registry]]`` table: a name prefix and what pulls under it do."""

    prefix: str
    location: str  # "" only under a wildcard prefix: names are not rewritten
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[Mirror, ...] = ()
    source: str = ""  # the file it came from (or "mirrors=")

    def match_end(self, name: str) -> int:
        """Where the part of ``name`` (``host[:port]/path``) this prefix matches ends; -1 if none.

        ``*.example.com`` matches any subdomain's host (with its port); other
        prefixes match whole path components.
        """
        if self.prefix.startswith("*."):
            end = name.find("/")
            end = len(name) if end < 0 else end
            host = name[:end]
            if not host.startswith("["):
                host = host.partition(":")[0]
            suffix = self.prefix[1:]
            return end if host.endswith(suffix) and len(host) > len(suffix) else -1
        p = self.prefix
        if name == p or (name.startswith(p) and name[len(p)] == "/"):
            return len(p)
        return -1


def _fail(source: str, what: str) -> RegistriesConfError:
    return RegistriesConfError(f"{source}: {what}")


def _location(value: object, source: str, field: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise _fail(source, f"{field} must be a string, not {type(value).__name__}")
    v = value.rstrip("/")
    if not v:
        if empty_ok:
            return ""
        raise _fail(source, f"{field} cannot be empty")
    if v.startswith(("http://", "https://")):
        raise _fail(source, f"{field} {value!r}: URI schemes are not supported")
    if any(c.isspace() for c in v) or "@" in v or ("*" in v and field != "prefix"):
        raise _fail(source, f"{field} {value!r} is not host[:port][/path]")
    if field == "prefix" and "*" in v:
        host = v[2:]
        if not v.startswith("*.") or not host or any(c in host for c in "*/:"):
            raise _fail(source, f"prefix {value!r}: a wildcard is only *.domain (*.example.com)")
    elif ":" in v.partition("/")[2]:
        raise _fail(source, f"{field} {value!r}: a tag in a {field} is not supported")
    return v


def _bool(table: Mapping[str, Any], key: str, source: str, where: str) -> bool:
    v = table.get(key, False)
    if not isinstance(v, bool):
        raise _fail(source, f"{where}: {key} must be true or false, not {v!r}")
    return v


def _mirror(t: object, source: str, where: str, by_digest_only: bool) -> Mirror:
    if not isinstance(t, dict):
        raise _fail(source, f"{where}: each [[registry.mirror]] must be a table")
    _unknown(t, _MIRROR_KEYS, source, f"{where} mirror")
    if "location" not in t:
        raise _fail(source, f"{where}: a [[registry.mirror]] needs a location")
    loc = _location(t["location"], source, "mirror location")
    pull = t.get("pull-from-mirror", "") or ALL
    if pull not in (ALL, DIGEST_ONLY, TAG_ONLY):
        raise _fail(
            source,
            f"{where}: mirror {loc}: pull-from-mirror must be all, digest-only or tag-only, "
            f"not {pull!r}",
        )
    if by_digest_only and pull != ALL:
        raise _fail(
            source,
            f"{where}: mirror {loc}: pull-from-mirror cannot be set when the registry has "
            "mirror-by-digest-only = true",
        )
    return Mirror(loc, _bool(t, "insecure", source, f"{where} mirror {loc}"), pull)


def _unknown(t: Mapping[str, Any], known: set[str], source: str, where: str) -> None:
    extra = sorted(set(t) - known)
    if extra:
        log.debug("%s: %s: ignoring keys %s", source, where, ", ".join(extra))


def _entry(t: object, source: str, i: int) -> RegistryEntry:
    where = f"[[registry]] #{i + 1}"
    if not isinstance(t, dict):
        raise _fail(source, f"{where} must be a table")
    _unknown(t, _REGISTRY_KEYS, source, where)
    raw_prefix = t.get("prefix", "")
    wildcard = isinstance(raw_prefix, str) and raw_prefix.startswith("*")
    location = _location(t.get("location", ""), source, "location", empty_ok=True)
    if raw_prefix == "":
        if not location:
            raise _fail(source, f"{where} needs a prefix or a location")
        prefix = location
    else:
        prefix = _location(raw_prefix, source, "prefix")
    if not location and not wildcard:
        location = prefix
    where = f"[[registry]] prefix {prefix!r}"
    by_digest_only = _bool(t, "mirror-by-digest-only", source, where)
    mirrors = t.get("mirror", [])
    if not isinstance(mirrors, list):
        raise _fail(source, f"{where}: mirror must be an array of tables ([[registry.mirror]])")
    return RegistryEntry(
        prefix=prefix,
        location=location,
        insecure=_bool(t, "insecure", source, where),
        blocked=_bool(t, "blocked", source, where),
        mirror_by_digest_only=by_digest_only,
        mirrors=tuple(_mirror(m, source, where, by_digest_only) for m in mirrors),
        source=source,
    )


def _v1(doc: Mapping[str, Any], source: str) -> list[RegistryEntry]:
    """The v1 ``[registries.insecure]`` and ``[registries.block]`` lists, as v2 entries."""
    v1 = doc.get("registries", {})
    if not isinstance(v1, dict):
        raise _fail(source, "registries must be a table (v1 format)")
    out: dict[str, RegistryEntry] = {}
    for key in ("block", "insecure"):
        table = v1.get(key, {})
        names = table.get("registries", []) if isinstance(table, dict) else None
        if not isinstance(names, list):
            raise _fail(source, f"registries.{key}.registries must be an array of strings")
        for n in names:
            loc = _location(n, source, f"registries.{key} entry")
            e = out.get(loc) or RegistryEntry(loc, loc, source=source)
            blocked, insecure = e.blocked or key == "block", e.insecure or key == "insecure"
            out[loc] = replace(e, blocked=blocked, insecure=insecure)
    return list(out.values())


def parse_conf(text: str, source: str) -> list[RegistryEntry]:
    """The ``[[registry]]`` tables of one file's text, checked."""
    import tomllib  # (only when there is a file: most pulls have none)

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(source, f"not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nesting level
        raise _fail(source, "not valid TOML: nested too deeply") from None
    tables = doc.get("registry", [])
    if not isinstance(tables, list):
        raise _fail(source, "registry must be an array of tables ([[registry]])")
    v1 = _v1(doc, source) if "registries" in doc else []
    if v1 and tables:
        raise _fail(source, "mixing v1 [registries.*] tables and v2 [[registry]] is not supported")
    return v1 or [_entry(t, source, i) for i, t in enumerate(tables)]


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONF_BYTES + 1)
    except OSError as exc:
        raise _fail(str(path), f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONF_BYTES:
        raise _fail(str(path), f"over {MAX_CONF_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(str(path), "not UTF-8") from None


def conf_files(path: str | os.PathLike[str] | None) -> list[Path]:
    """The files to read, in order: the main file (if any), then its drop-ins.

    ``path`` None searches as skopeo does. An explicit path, or one from
    ``$CONTAINERS_REGISTRIES_CONF``, must exist; the default ones need not.
    """
    if path is None:
        env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
        if env:
            main, required = Path(env), True
        else:
            home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
            user = Path(home, "containers", "registries.conf")
            main, required = (user if user.exists() else Path(SYSTEM_CONF)), False
    else:
        main, required = Path(path), True
    files = [main] if required or main.is_file() else []
    d = main.parent / "registries.conf.d"
    if d.is_dir():
        files += sorted(p for p in d.glob("*.conf") if p.is_file())
    return files


@dataclass(frozen=True, slots=True)
class RegistriesConf:
    """The merged ``[[registry]]`` tables of every file read, and the files."""

    entries: tuple[RegistryEntry, ...] = ()
    files: tuple[str, ...] = ()

    def find(self, name: str) -> tuple[RegistryEntry, int] | None:
        """The table with the longest prefix matching ``name``, and where the match ends."""
        best: tuple[RegistryEntry, int] | None = None
        for e in self.entries:
            end = e.match_end(name)
            if end >= 0 and (best is None or len(e.prefix) > len(best[0].prefix)):
                best = (e, end)
        return best

    def with_mirrors(self, mirrors: Mapping[str, Sequence[str]]) -> RegistriesConf:
        """These tables with ``mirrors`` (prefix → mirror locations) set over them.

        A prefix already configured keeps its other fields and gets these mirrors.
        """
        by_prefix = {e.prefix: e for e in self.entries}
        src = "mirrors="
        for raw_prefix, locations in mirrors.items():
            if isinstance(locations, str):
                raise _fail(src, f"{raw_prefix!r}: give a list of mirror locations, not a string")
            prefix = _location(raw_prefix, src, "prefix")
            ms = tuple(Mirror(_location(loc, src, "mirror location")) for loc in locations)
            old = by_prefix.get(prefix)
            if old is None:
                loc = "" if prefix.startswith("*.") else prefix
                by_prefix[prefix] = RegistryEntry(prefix, loc, mirrors=ms, source=src)
            else:
                by_prefix[prefix] = replace(old, mirrors=ms, mirror_by_digest_only=False)
        return RegistriesConf(tuple(by_prefix.values()), self.files)


_LOADED: dict[tuple[tuple[str, int, int, int], ...], RegistriesConf] = {}


def _stamp(f: Path) -> tuple[str, int, int, int]:
    try:
        st = f.stat()
    except OSError:
        return (str(f), -1, -1, -1)  # _read names the error
    return (str(f), st.st_ino, st.st_size, st.st_mtime_ns)


def load_registries_conf(path: str | os.PathLike[str] | None) -> RegistriesConf:
    """Read and merge registries.conf and its drop-ins (see :func:`conf_files`).

    Parsed once per set of unchanged files (inode, size, mtime), so each new
    client costs a few ``stat`` calls, not a TOML parse.
    """
    files = conf_files(path)
    key = tuple(_stamp(f) for f in files)
    conf = _LOADED.get(key)
    if conf is not None:
        return conf
    merged: dict[str, RegistryEntry] = {}
    for f in files:
        for e in parse_conf(_read(f), str(f)):
            merged.pop(e.prefix, None)  # a later file's table replaces an earlier one
            merged[e.prefix] = e
    conf = RegistriesConf(tuple(merged.values()), tuple(str(f) for f in files))
    if len(_LOADED) >= 16:
        _LOADED.clear()
    _LOADED[key] = conf
    return conf
