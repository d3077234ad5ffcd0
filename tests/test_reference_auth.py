"""References, WWW-Authenticate parsing, docker config files, Retry-After: no network."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiolayercache import Hash, Platform
from aiolayercache.remote import (
    Credentials,
    InvalidReferenceError,
    Reference,
    load_docker_config,
    parse_challenges,
    parse_retry_after,
    platform_matches,
)

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("s", "registry", "repository", "tag", "digest", "endpoint"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None, "registry-1.docker.io"),
        ("alpine:3.20", "docker.io", "library/alpine", "3.20", None, "registry-1.docker.io"),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None, "registry-1.docker.io"),
        ("index.docker.io/u/app:1", "docker.io", "u/app", "1", None, "registry-1.docker.io"),
        ("u/app", "docker.io", "u/app", "latest", None, "registry-1.docker.io"),
        ("localhost/app", "localhost", "app", "latest", None, "localhost"),
        ("localhost:5000/a/b:t", "localhost:5000", "a/b", "t", None, "localhost:5000"),
        ("ghcr.io/o/r@" + D, "ghcr.io", "o/r", None, D, "ghcr.io"),
        ("ghcr.io/o/r:t@" + D, "ghcr.io", "o/r", "t", D, "ghcr.io"),
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", None, "[::1]:5000"),
        ("[fe80::1]/x:y", "[fe80::1]", "x", "y", None, "[fe80::1]"),
        ("127.0.0.1:5000/a__b/c-d.e", "127.0.0.1:5000", "a__b/c-d.e", "latest", None, None),
    ],
)
def test_references_parse_as_docker_does(
    s: str,
    registry: str,
    repository: str,
    tag: str | None,
    digest: str | None,
    endpoint: str | None,
) -> None:
    r = Reference.parse(s)
    assert (r.registry, r.repository, r.tag) == (registry, repository, tag)
    assert r.digest == (Hash.parse(digest) if digest else None)
    if endpoint:
        assert r.endpoint == endpoint
    assert Reference.parse(str(r)) == r


def test_loopback_detection() -> None:
    assert Reference.parse("localhost:5000/x").is_loopback
    assert Reference.parse("127.0.0.2:1/x").is_loopback
    assert Reference.parse("[::1]:5000/x").is_loopback
    assert not Reference.parse("ghcr.io/x").is_loopback
    assert not Reference.parse("10.0.0.1:5000/x").is_loopback


@pytest.mark.parametrize(
    "s",
    [
        "",
        "UPPER/case",
        "a//b",
        "a/",
        "/a",
        "x/../y",
        "x@sha256:short",
        "x@" + D.upper(),
        "ho st/x",
        "x:tag\n",
        "[::1/x",
        "[nothost]:5000/x",
        "host:99999/x",
        "::1/x",
        "x:" + "t" * 200,
        "a/" + "b" * 300,
    ],
)
def test_malformed_references_are_typed_errors_naming_them(s: str) -> None:
    with pytest.raises(InvalidReferenceError) as ei:
        Reference.parse(s)
    assert isinstance(ei.value, ValueError)
    assert "invalid reference" in str(ei.value)


@given(st.text(max_size=80))
def test_reference_parse_only_raises_typed_errors(s: str) -> None:
    try:
        r = Reference.parse(s)
    except InvalidReferenceError:
        return
    assert ".." not in r.repository.split("/")
    assert Reference.parse(str(r)) == r


@pytest.mark.parametrize(
    ("header", "want"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
            [
                (
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/alpine:pull",
                    },
                )
            ],
        ),
        ('basic realm="Registry Realm"', [("basic", {"realm": "Registry Realm"})]),
        (
            'Basic realm="x", Bearer realm="https://a/t",scope="a:b:pull,push"',
            [
                ("basic", {"realm": "x"}),
                ("bearer", {"realm": "https://a/t", "scope": "a:b:pull,push"}),
            ],
        ),
        ('Bearer realm="a\\"b"', [("bearer", {"realm": 'a"b'})]),
        ("Bearer realm=unquoted", [("bearer", {"realm": "unquoted"})]),
        ("Bearer", [("bearer", {})]),
        ("", []),
    ],
)
def test_www_authenticate_parsing(header: str, want: list[tuple[str, dict[str, str]]]) -> None:
    got = [(c.scheme, c.params) for c in parse_challenges(header)]
    assert got == want


@given(st.text(max_size=200))
def test_www_authenticate_never_raises(header: str) -> None:
    for c in parse_challenges(header):
        assert c.scheme == c.scheme.lower()


def test_docker_config_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = base64.b64encode(b"bob:pw1").decode()
    doc = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": auth},
            "ghcr.io": {"username": "carol", "password": "pw2"},
            "https://quay.io": {"identitytoken": "tok3"},
        }
    }
    (tmp_path / "config.json").write_text(json.dumps(doc))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    hub = load_docker_config("docker.io")
    assert (hub.username, hub.password) == ("bob", "pw1")
    assert load_docker_config("ghcr.io").password == "pw2"
    assert load_docker_config("quay.io").identity_token == "tok3"
    assert load_docker_config("example.com").empty
    (tmp_path / "config.json").write_text("not json")
    assert load_docker_config("ghcr.io").empty


def test_credentials_repr_hides_secrets() -> None:
    c = Credentials(username="u", password="hunter2", identity_token="xyzzy-secret")
    assert "hunter2" not in repr(c) and "xyzzy" not in repr(c) and "hunter2" not in str(c)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("5", 5.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-1", None),
        ("garbage", None),
        (None, None),
        ("", None),
        ("1e9", 1e9),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
    ],
)
def test_retry_after_forms(value: str | None, want: float | None) -> None:
    assert parse_retry_after(value) == want


def test_retry_after_http_date_in_the_future() -> None:
    got = parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0)
    assert got == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("want", "have", "ok"),
    [
        ("linux/amd64", "linux/amd64", True),
        ("linux/arm64", "linux/arm64/v8", True),
        ("linux/arm64/v8", "linux/arm64", True),
        ("linux/arm/v7", "linux/arm/v6", False),
        ("linux/arm", "linux/arm/v7", True),
        ("linux/amd64", "windows/amd64", False),
        ("linux/amd64", "linux/arm64", False),
    ],
)
def test_platform_matching(want: str, have: str, ok: bool) -> None:
    assert platform_matches(Platform.from_string(want), Platform.from_string(have)) is ok
