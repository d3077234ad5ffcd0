from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiolayercache import Hash, InvalidDigestError, UnsupportedDigestError

GOOD = "sha256:" + "a" * 64


def test_parse_round_trips() -> None:
    h = Hash.parse(GOOD)
    assert h.algorithm == "sha256"
    assert h.hex == "a" * 64
    assert str(h) == GOOD
    assert Hash.parse(str(h)) == h
    assert h.filename == GOOD


def test_sha512_is_known() -> None:
    h = Hash.parse("sha512:" + "0" * 128)
    assert h.hasher().name == "sha512"


def test_of_matches_hashlib() -> None:
    assert Hash.of(b"abc").hex == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize(
    "s",
    [
        "sha256:../../x",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        GOOD + "\n",
        "\n" + GOOD,
        "sha256:" + "a" * 63 + "/",
        "sha256:" + "a" * 63 + "\0",
        "../sha256:" + "a" * 64,
        "sha256/..:" + "a" * 64,
        "SHA256:" + "a" * 64,
        "md5:" + "a" * 32,
        "blake3:" + "a" * 64,
        "sha256" + "a" * 64,
        "",
        ":",
        "sha256:",
        " sha256:" + "a" * 64,
    ],
)
def test_hostile_digests_are_rejected(s: str) -> None:
    with pytest.raises(InvalidDigestError) as ei:
        Hash.parse(s)
    assert isinstance(ei.value, ValueError)


def test_unknown_algorithm_is_typed() -> None:
    with pytest.raises(UnsupportedDigestError, match="blake3"):
        Hash.parse("blake3:" + "a" * 64)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(InvalidDigestError):
        Hash("sha256", "../../etc/passwd")


def test_non_string_is_rejected() -> None:
    with pytest.raises(InvalidDigestError):
        Hash.parse(b"sha256:" + b"a" * 64)  # type: ignore[arg-type]


@given(st.text(max_size=200))
def test_any_accepted_string_is_a_safe_file_name(s: str) -> None:
    try:
        h = Hash.parse(s)
    except InvalidDigestError:
        return
    assert "/" not in h.filename and "\\" not in h.filename and ".." not in h.filename
    assert str(h) == s


@given(st.binary(max_size=64))
def test_of_parses_back(data: bytes) -> None:
    h = Hash.of(data)
    assert Hash.parse(str(h)) == h
