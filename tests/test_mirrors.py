"""Mirrors and registries.conf: pulls try mirrors first, fall back to the origin, verify all.

Real processes only: Debian's docker-registry as origin and as a pull-through
mirror (proxy mode), fault proxies in front of them that count and record what
they were asked, the CLI as a subprocess. Everything listens on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import anyio
import pytest
from aiohttp import web
from multidict import CIMultiDict

from aiolayercache import Image, cache, layout, validate
from aiolayercache.cache import FilesystemCache
from aiolayercache.remote import (
    BlockedError,
    Client,
    Credentials,
    RegistriesConfError,
    RetryPolicy,
    TransportError,
)

from .conftest import USERS, Published
from .registry import FaultProxy, Registry, free_port, running_proxy, start_registry

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05, resumes=4)
_HOP = ("transfer-encoding", "connection", "date", "keep-alive")
CLI = [sys.executable, "-m", "aiolayercache"]


class RecordingProxy(FaultProxy):
    """A fault proxy that also records each request's method, path with query, and auth."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.seen: list[tuple[str, str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        self.seen.append((request.method, request.path_qs, auth))
        if request.method == "HEAD":
            # Forwarded here with its Content-Length, which a registry in proxy mode
            # needs from upstream (the fault proxy's answer to a HEAD has none).
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            async with (
                aiohttp.ClientSession(auto_decompress=False) as s,
                s.head(f"http://{self.upstream}{request.path_qs}", headers=headers) as up,
            ):
                keep = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
                return web.Response(status=up.status, headers=keep)
        accepts = request.headers.getall("Accept", [])
        if len(accepts) > 1:  # one header: the fault proxy forwards only one of each
            headers = CIMultiDict((k, v) for k, v in request.headers.items() if k != "Accept")
            headers["Accept"] = ", ".join(accepts)
            request = request.clone(headers=headers)
        return await super().handle(request)

    def gets(self, kind: str) -> Counter[str]:
        """GETs of ``/blobs/`` or ``/manifests/`` paths (query left off), counted."""
        return Counter(
            p.partition("?")[0] for m, p, _ in self.seen if m == "GET" and f"/{kind}/" in p
        )


@contextlib.contextmanager
def recording(upstream: str) -> Iterator[RecordingProxy]:
    px = cast("RecordingProxy", RecordingProxy(upstream).start())
    try:
        yield px
    finally:
        px.stop()


def blob_paths(img: Image, repo: str) -> set[str]:
    blobs = img._blobs.blobs  # type: ignore[attr-defined]
    return {f"/v2/{repo}/blobs/{h}" for h in blobs}


def conf(tmp_path: Path, text: str, name: str = "registries.conf") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


async def pull_into_layout(c: Client, ref: str, out: Path, cache_dir: Path | None = None) -> None:
    img = await c.image(ref)
    if cache_dir is not None:
        img = cache.image(img, FilesystemCache(cache_dir))
    await layout.write(out, img)
    await validate.image(await layout.image(out))


# --- pulls through mirrors ----------------------------------------------------------------


async def test_three_pulls_through_a_pull_through_mirror_fetch_blobs_upstream_once(
    registry: Registry, published: Published, tmp_path: Path
) -> None:
    want = blob_paths(published.small, "test/small")
    with recording(registry.host) as origin:
        mirror = start_registry(
            tmp_path / "mirror",
            tmp_path / "mirror-data",
            extra={"proxy": {"remoteurl": f"http://{origin.address}"}},
        )
        try:
            with recording(mirror.host) as front:
                mirrors = {origin.address: [front.address]}
                first: Counter[str] = Counter()
                for i in range(3):
                    async with Client(
                        retry=FAST, registries_conf=False, docker_config=False, mirrors=mirrors
                    ) as c:
                        ref = f"{origin.address}/test/small:v1"
                        await pull_into_layout(c, ref, tmp_path / f"out{i}", tmp_path / f"c{i}")
                    if i == 0:
                        # distribution 2.8 in proxy mode reads a missed blob from upstream
                        # twice: once to serve it, once (in the background) to store it.
                        for _ in range(200):
                            if all(origin.gets("blobs")[p] >= 2 for p in want):
                                break
                            await anyio.sleep(0.05)
                        first = origin.gets("blobs")
        finally:
            mirror.stop()
    assert set(first) == want and all(n <= 2 for n in first.values()), first
    assert origin.gets("blobs") == first  # pulls 2 and 3: not one blob from the origin
    assert front.gets("blobs") == Counter({p: 3 for p in want})
    assert all(f"ns={origin.address}" in p for _, p, _ in front.seen if p.startswith("/v2/test"))


async def test_a_mirror_that_is_down_falls_back_to_the_origin(
    proxy: FaultProxy, published: Published, tmp_path: Path
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with Client(
        retry=FAST, registries_conf=False, docker_config=False, mirrors={proxy.address: [dead]}
    ) as c:
        await pull_into_layout(c, f"{proxy.address}/test/small:v1", tmp_path / "out")
    served = {p.partition(" ")[2] for p in proxy.stats.requests if p.startswith("GET ")}
    assert blob_paths(published.small, "test/small") <= served


async def test_a_mirror_that_hangs_costs_seconds_not_the_clients_retries(
    proxy: FaultProxy, registry: Registry, published: Published, tmp_path: Path
) -> None:
    import time

    with running_proxy(registry.host) as hung:
        hung.add("/v2/", "delay", 120, times=10_000, method=None)  # answers nothing
        started = time.monotonic()
        async with Client(
            registries_conf=False, docker_config=False, mirrors={proxy.address: [hung.address]}
        ) as c:
            with anyio.fail_after(60):
                await pull_into_layout(c, f"{proxy.address}/test/small:v1", tmp_path / "out")
        took = time.monotonic() - started
    # One wait of MIRROR_TIMEOUT (10 s), then the mirror is skipped for every request.
    assert took < 25, took
    served = {p.partition(" ")[2] for p in proxy.stats.requests if p.startswith("GET ")}
    assert blob_paths(published.small, "test/small") <= served


async def test_a_mirror_that_misses_falls_back_per_request(
    proxy: FaultProxy, registry: Registry, published: Published, tmp_path: Path
) -> None:
    with recording(registry.host) as mirror:
        layer = next(iter(sorted(blob_paths(published.small, "test/small"))))
        mirror.add(layer, "status", (404, {}, "BLOB_UNKNOWN"), times=10)
        async with Client(
            retry=FAST,
            registries_conf=False,
            docker_config=False,
            mirrors={proxy.address: [mirror.address]},
        ) as c:
            await pull_into_layout(c, f"{proxy.address}/test/small:v1", tmp_path / "out")
    served = {p.partition(" ")[2] for p in proxy.stats.requests if p.startswith("GET ")}
    assert layer in served
    assert served & blob_paths(published.small, "test/small") == {layer}


@pytest.mark.parametrize(
    ("table", "mirror_line", "tag_on_mirror"),
    [
        ("", 'pull-from-mirror = "digest-only"', False),
        ("", 'pull-from-mirror = "tag-only"', True),
        ("mirror-by-digest-only = true", "", False),
    ],
)
async def test_pull_from_mirror_modes(
    proxy: FaultProxy,
    registry: Registry,
    published: Published,
    tmp_path: Path,
    table: str,
    mirror_line: str,
    tag_on_mirror: bool,
) -> None:
    with recording(registry.host) as mirror:
        path = conf(
            tmp_path,
            f'[[registry]]\nprefix = "{proxy.address}"\n{table}\n'
            f'[[registry.mirror]]\nlocation = "{mirror.address}"\n{mirror_line}\n',
        )
        want = blob_paths(published.small, "test/small")
        async with Client(retry=FAST, registries_conf=path) as c:
            await pull_into_layout(c, f"{proxy.address}/test/small:v1", tmp_path / "by-tag")
            by_tag_mirror = set(mirror.gets("blobs"))
            by_tag_origin = {p.partition(" ")[2] for p in proxy.stats.requests} & want
            mirror.seen.clear()
            proxy.reset()
            ref = f"{proxy.address}/test/small@{published.small_digest}"
            await pull_into_layout(c, ref, tmp_path / "by-digest")
            by_digest_mirror = set(mirror.gets("blobs"))
            by_digest_origin = {p.partition(" ")[2] for p in proxy.stats.requests} & want
    assert (by_tag_mirror, by_tag_origin) == ((want, set()) if tag_on_mirror else (set(), want))
    assert (by_digest_mirror, by_digest_origin) == (
        (set(), want) if tag_on_mirror else (want, set())
    )


async def test_a_mirror_serving_wrong_bytes_is_caught_and_the_origin_used(
    proxy: FaultProxy,
    registry: Registry,
    published: Published,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "aiolayercache")
    want = blob_paths(published.big, "test/big")  # 3 MiB layers: past the small-blob path
    with recording(registry.host) as mirror:
        mirror.add("/blobs/", "flip", times=1000)
        async with Client(
            retry=FAST,
            registries_conf=False,
            docker_config=False,
            mirrors={proxy.address: [mirror.address]},
        ) as c:
            ref = f"{proxy.address}/test/big:v1"
            await pull_into_layout(c, ref, tmp_path / "out", tmp_path / "cache")
            assert set(mirror.gets("blobs")) == want
            served = {p.partition(" ")[2] for p in proxy.stats.requests if p.startswith("GET ")}
            assert want <= served
            # Marked bad: a read in a second layout asks the origin, not the mirror again.
            mirror.seen.clear()
            await pull_into_layout(c, ref, tmp_path / "again")
            assert mirror.gets("blobs") == Counter()
    warned = [r.getMessage() for r in caplog.records if "wrong bytes" in r.getMessage()]
    assert len(warned) == len(want), warned


async def test_a_mirror_serving_a_wrong_manifest_by_digest_is_caught(
    proxy: FaultProxy, registry: Registry, published: Published, tmp_path: Path
) -> None:
    with recording(registry.host) as mirror:
        mirror.add("/manifests/", "flip", times=10)
        async with Client(
            retry=FAST,
            registries_conf=False,
            docker_config=False,
            mirrors={proxy.address: [mirror.address]},
        ) as c:
            ref = f"{proxy.address}/test/small@{published.small_digest}"
            d = await c.get(ref)
            assert d.digest == published.small_digest
            assert str(d.ref) == ref  # the image keeps the name the user gave
    assert mirror.gets("manifests")
    assert any("/manifests/" in k for k in proxy.stats.requests)


async def test_origin_credentials_never_reach_a_mirror(
    basic_registry: Registry, published: Published, tmp_path: Path
) -> None:
    user, pw = next(iter(USERS.items()))
    creds = Credentials(username=user, password=pw)
    expected = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
    with recording(basic_registry.host) as origin, recording(basic_registry.host) as mirror:
        mirrors = {origin.address: [mirror.address]}
        # Only the origin's credentials: the mirror asks for its own, gets none, and the
        # pull goes on at the origin.
        for given in ({origin.address: creds}, creds):
            mirror.seen.clear()
            async with Client(
                retry=FAST,
                registries_conf=False,
                docker_config=False,
                mirrors=mirrors,
                credentials=given,
            ) as c:
                await pull_into_layout(c, f"{origin.address}/test/small:v1", tmp_path / "o")
            assert mirror.seen, "the mirror was never asked"
            assert [a for _, _, a in mirror.seen if a] == []
        assert any(a == expected for _, _, a in origin.seen)
        # The mirror's own credentials go to the mirror, and the origin serves no blob.
        origin.seen.clear()
        mirror.seen.clear()
        both = {origin.address: Credentials(username="nobody", password="x"), mirror.address: creds}
        async with Client(
            retry=FAST,
            registries_conf=False,
            docker_config=False,
            mirrors=mirrors,
            credentials=both,
        ) as c:
            await pull_into_layout(c, f"{origin.address}/test/small:v1", tmp_path / "m")
        assert {a for _, _, a in mirror.seen if a} == {expected}
        assert origin.gets("blobs") == Counter()
        assert all(a != expected for _, _, a in origin.seen)


# --- registries.conf ----------------------------------------------------------------------


async def test_blocked_raises_before_any_request(
    proxy: FaultProxy, published: Published, tmp_path: Path
) -> None:
    path = conf(tmp_path, f'[[registry]]\nprefix = "{proxy.address}/test/small"\nblocked = true\n')
    async with Client(retry=FAST, registries_conf=path) as c:
        with pytest.raises(BlockedError) as info:
            await c.image(f"{proxy.address}/test/small:v1")
        assert f"{proxy.address}/test/small:v1" in str(info.value)
        assert str(path) in str(info.value)
        assert proxy.stats.requests == Counter()
        await c.get(f"{proxy.address}/test/big:v1")  # another name is not blocked


async def test_longest_prefix_wins_and_location_rewrites_the_repository(
    registry: Registry, published: Published, tmp_path: Path
) -> None:
    fake = f"127.0.0.1:{free_port()}"
    with recording(registry.host) as origin, recording(registry.host) as mirror:
        path = conf(
            tmp_path,
            f'[[registry]]\nprefix = "{fake}"\nblocked = true\n'
            f'[[registry]]\nprefix = "{fake}/foo"\nlocation = "{origin.address}/test"\n'
            f'[[registry.mirror]]\nlocation = "{mirror.address}/test"\n'
            'pull-from-mirror = "digest-only"\n',
        )
        async with Client(retry=FAST, registries_conf=path) as c:
            d = await c.get(f"{fake}/foo/small:v1")
            assert str(d.ref) == f"{fake}/foo/small:v1"
            assert d.digest == published.small_digest
            await pull_into_layout(c, f"{fake}/foo/small@{d.digest}", tmp_path / "out")
            with pytest.raises(BlockedError):
                await c.get(f"{fake}/other:v1")
    assert origin.gets("manifests") == Counter({"/v2/test/small/manifests/v1": 1})
    assert set(mirror.gets("blobs")) == blob_paths(published.small, "test/small")
    assert all(f"ns={fake}" in p for _, p, _ in mirror.seen)


async def test_wildcard_prefix_matches_subdomains(tmp_path: Path) -> None:
    path = conf(tmp_path, '[[registry]]\nprefix = "*.blocked.example"\nblocked = true\n')
    async with Client(registries_conf=path) as c:
        with pytest.raises(BlockedError):
            await c.get("a.b.blocked.example:5000/x/y:1")
        with pytest.raises(BlockedError):
            await c.get("img.blocked.example/x:1")


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[[registry]\nprefix = 'x'", "not valid TOML"),
        ("x = " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
        (
            "[[registry]]\nlocation = 'a.example'\n[[registry.mirror]]\n"
            "location = 'm.example'\npull-from-mirror = 'sometimes'\n",
            "pull-from-mirror",
        ),
        ("[[registry]]\nlocation = 'https://a.example'\n", "URI schemes"),
        (
            "[[registry]]\nlocation = 'a.example'\nblocked = 'yes'\n",
            "blocked must be true or false",
        ),
    ],
)
def test_a_bad_file_is_a_typed_error_naming_it(tmp_path: Path, text: str, complaint: str) -> None:
    path = conf(tmp_path, text)
    with pytest.raises(RegistriesConfError) as info:
        Client(registries_conf=path)
    assert str(path) in str(info.value) and complaint in str(info.value)


def test_a_bad_drop_in_is_named(tmp_path: Path) -> None:
    conf(tmp_path, "")
    bad = conf(tmp_path, "[[registry]]\nprefix = 3\n", "registries.conf.d/10-bad.conf")
    with pytest.raises(RegistriesConfError, match=re.escape(str(bad))):
        Client(registries_conf=tmp_path / "registries.conf")


async def test_env_var_and_drop_ins_are_read_as_skopeo_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c_ = (f"127.0.0.1:{free_port()}" for _ in range(3))
    main = conf(
        tmp_path,
        f'[[registry]]\nprefix = "{a}"\nblocked = true\n'
        f'[[registry]]\nprefix = "{b}"\nblocked = false\n',
    )
    # Drop-ins in name order; a later table replaces an earlier one with its prefix.
    d = "registries.conf.d"
    conf(tmp_path, f'[[registry]]\nprefix = "{a}"\nblocked = true\n', f"{d}/1.conf")
    conf(tmp_path, f'[[registry]]\nprefix = "{b}"\nblocked = true\n', f"{d}/2.conf")
    conf(tmp_path, f'[[registry]]\nprefix = "{a}"\n', f"{d}/3.conf")
    conf(tmp_path, f'[[registry]]\nprefix = "{c_}"\nblocked = true\n', f"{d}/x.txt")
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(main))
    async with Client(retry=FAST, docker_config=False) as c:
        with pytest.raises(BlockedError, match=r"registries\.conf\.d/2\.conf"):
            await c.get(f"{b}/x:1")
        for unblocked in (a, c_):  # nothing listens there: a transport error, not a block
            with pytest.raises(TransportError):
                await c.get(f"{unblocked}/x:1")
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(tmp_path / "missing.conf"))
    with pytest.raises(RegistriesConfError, match=r"missing\.conf"):
        Client()


async def test_pushes_and_tags_go_to_the_origin_whatever_registries_conf_says(
    proxy: FaultProxy, registry: Registry, published: Published, tmp_path: Path
) -> None:
    # Rewrites, mirrors and blocks are for pulls (containers-registries.conf(5)).
    with recording(registry.host) as mirror:
        path = conf(
            tmp_path,
            f'[[registry]]\nprefix = "{proxy.address}"\nblocked = true\n'
            f'[[registry.mirror]]\nlocation = "{mirror.address}"\n',
        )
        async with Client(retry=FAST, registries_conf=path, docker_config=False) as c:
            ref = f"{proxy.address}/test/mirrored-push:v1"
            digest = await c.write(ref, published.small)
            await c.tag(ref, "v2")
            with pytest.raises(BlockedError):
                await c.get(ref)
        assert mirror.seen == []
    assert digest == published.small_digest
    assert any("/manifests/v2" in k for k in proxy.stats.requests)


# --- the command line ---------------------------------------------------------------------


def run(*args: str, env: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != "AIOLAYERCACHE_CACHE_DIR"}
    e.update(env or {})
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env=e, check=False
    )


def test_cli_pull_with_registries_conf_and_a_poisoning_mirror(
    proxy: FaultProxy, registry: Registry, published: Published, tmp_path: Path
) -> None:
    with recording(registry.host) as mirror:
        mirror.add("/blobs/", "flip", times=1000)
        path = conf(
            tmp_path,
            f'[[registry]]\nprefix = "{proxy.address}"\n'
            f'[[registry.mirror]]\nlocation = "{mirror.address}"\n',
        )
        out = tmp_path / "out"
        r = run(
            "pull",
            "-q",
            "--registries-conf",
            str(path),
            "--cache-dir",
            str(tmp_path / "c"),
            f"{proxy.address}/test/big:v1",
            str(out),
        )
        assert r.returncode == 0, r.stderr
        assert set(mirror.gets("blobs")) == blob_paths(published.big, "test/big")
    served = {p.partition(" ")[2] for p in proxy.stats.requests if p.startswith("GET ")}
    assert blob_paths(published.big, "test/big") <= served
    index = json.loads((out / "index.json").read_text())
    names = {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]}
    assert names == {f"{proxy.address}/test/big:v1"}


def test_cli_bad_registries_conf_fails_naming_the_file(tmp_path: Path) -> None:
    path = conf(tmp_path, "[[registry]\n")
    r = run("pull", "--registries-conf", str(path), "127.0.0.1:1/x:1", str(tmp_path / "o"))
    assert r.returncode == 1
    assert str(path) in r.stderr and "not valid TOML" in r.stderr


def test_cli_copy_reads_through_the_mirror_and_pushes_to_the_origin(
    proxy: FaultProxy, registry: Registry, published: Published, tmp_path: Path
) -> None:
    with recording(registry.host) as mirror, recording(registry.host) as dest:
        # DST's prefix is blocked and mirrored too: neither applies to a push.
        path = conf(
            tmp_path,
            f'[[registry]]\nprefix = "{proxy.address}"\n'
            f'[[registry.mirror]]\nlocation = "{mirror.address}"\n'
            f'[[registry]]\nprefix = "{dest.address}"\nblocked = true\n'
            f'[[registry.mirror]]\nlocation = "{mirror.address}"\n',
        )
        src, dst = f"{proxy.address}/test/small:v1", f"{dest.address}/copied/small:v1"
        r = run("copy", "-q", "--no-cache", "--registries-conf", str(path), src, dst)
        assert r.returncode == 0, r.stderr
        assert set(mirror.gets("blobs")) == blob_paths(published.small, "test/small")
        assert not [p for _, p, _ in mirror.seen if "/copied/" in p]
        assert ("PUT", "/v2/copied/small/manifests/v1", "") in dest.seen
    assert not [k for k in proxy.stats.requests if k.startswith("GET /v2/test/small/blobs/")]
