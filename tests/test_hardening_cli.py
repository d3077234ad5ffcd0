"""The CLI defects of issue 10 (items 4 and 10), each pinned by a test that failed before its fix.

The command runs in-process (``cli.main(argv)`` returns the exit code) against the real
loopback registry and real files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import anyio
import pytest

from aiolayercache import Image, MediaType, layout, random, tarball
from aiolayercache.cli import main
from aiolayercache.remote import InvalidReferenceError, Reference

from .conftest import Published
from .registry import FaultProxy, Registry

CLI = [sys.executable, "-m", "aiolayercache"]


def pull(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``aiolayercache pull ARGV`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["pull", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def names_in(lay: Path) -> list[tuple[str, str]]:
    """``(ref name, digest)`` of each entry of a layout's index.json, in order."""
    doc = json.loads((lay / "index.json").read_text())
    return [
        (d.get("annotations", {}).get(layout.REF_NAME, ""), d["digest"]) for d in doc["manifests"]
    ]


def oci_image(seed: int, platform: str = "linux/amd64") -> Image:
    return random.image(
        32 * 1024, 1, media_type=MediaType.OCI_MANIFEST_SCHEMA1, platform=platform, seed=seed
    )


def write_layout(path: Path, img: Image, ref_name: str) -> None:
    async def go() -> None:
        await layout.write(path, img, ref_name=ref_name)

    anyio.run(go)


# --- 4: two images under one name in one destination -------------------------------------


def test_two_layouts_naming_different_images_alike_are_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, dest = tmp_path / "a", tmp_path / "b", tmp_path / "dest"
    write_layout(a, oci_image(1), "v1")
    write_layout(b, oci_image(2), "v1")
    code, _, err = pull(capsys, f"oci:{a}:v1", f"oci:{b}:v1", str(dest), "--no-cache")
    assert code == 2, err
    assert f"oci:{a}:v1" in err and f"oci:{b}:v1" in err and "'v1'" in err
    assert "--name" in err  # says how to name them apart
    assert not (dest / "index.json").exists()  # nothing written, nothing lost
    # Named apart, both arrive, in the order given (it used to vary from run to run).
    code, out, err = pull(
        capsys, f"oci:{a}:v1", f"oci:{b}:v1", str(dest), "--no-cache", "--name", f"oci:{b}:v1=v1-b"
    )
    assert code == 0, err
    assert "2 images" in out
    got = names_in(dest)
    assert [n for n, _ in got] == ["v1", "v1-b"]
    assert got[0][1] == names_in(a)[0][1] and got[1][1] == names_in(b)[0][1]


def test_two_archives_with_one_repo_tag_into_a_tarball_are_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, out_tar = tmp_path / "a.tar", tmp_path / "b.tar", tmp_path / "out.tar"
    anyio.run(tarball.write, a, {"x/app:v1": random.image(32 * 1024, 1, seed=1)})
    anyio.run(tarball.write, b, {"x/app:v1": random.image(32 * 1024, 1, seed=2)})
    code, _, err = pull(
        capsys, f"docker-archive:{a}", f"docker-archive:{b}", str(out_tar), "--no-cache"
    )
    assert code == 2, err
    assert f"docker-archive:{a}" in err and f"docker-archive:{b}" in err
    assert "'x/app:v1'" in err
    assert not out_tar.exists()
    code, _, err = pull(
        capsys,
        f"docker-archive:{a}",
        f"docker-archive:{b}",
        str(out_tar),
        "--no-cache",
        "--name",
        f"docker-archive:{b}=x/app:v2",
    )
    assert code == 0, err
    with tarfile.open(out_tar) as tf:
        f = tf.extractfile("manifest.json")
        assert f is not None
        manifest = json.load(f)
    assert [m["RepoTags"] for m in manifest] == [["x/app:v1"], ["x/app:v2"]]
    assert manifest[0]["Config"] != manifest[1]["Config"]


def test_the_same_image_under_the_same_name_twice_goes_in_once(
    registry: Registry, published: Published, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = f"{registry.host}/test/small:v1"
    code, out, err = pull(capsys, ref, f"docker://{ref}", str(tmp_path / "one"), "--no-cache")
    assert code == 0, err
    assert out.startswith("1 image,"), out  # was "2 images" for one entry
    assert [n for n, _ in names_in(tmp_path / "one")] == [ref]
    # The same image under the same name from another source (the layout just written)
    # is no conflict either: nothing would be lost.
    code, out, err = pull(
        capsys, ref, f"oci:{tmp_path / 'one'}:{ref}", str(tmp_path / "two"), "--no-cache"
    )
    assert code == 0, err
    assert out.startswith("1 image,"), out
    assert names_in(tmp_path / "two") == names_in(tmp_path / "one")


def test_name_option_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = tmp_path / "a"
    write_layout(a, oci_image(1), "v1")
    for bad in [f"oci:{a}:v1", f"oci:{a}:v2=x", f"oci:{a}:v1=bad name"]:
        code, _, err = pull(capsys, f"oci:{a}:v1", str(tmp_path / "d"), "--no-cache", "--name", bad)
        assert code == 2, (bad, err)
        assert "--name" in err
    assert not (tmp_path / "d").exists()


# --- 10: --platform ----------------------------------------------------------------------


def test_explicit_platform_a_single_image_does_not_match_fails(
    registry: Registry, published: Published, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = f"{registry.host}/test/small:v1"  # a single linux/amd64 image, not an index
    dest = tmp_path / "arm"
    code, _, err = pull(capsys, ref, str(dest), "--platform", "linux/arm64", "--no-cache")
    assert code == 1, err
    assert ref in err and "linux/arm64" in err and "linux/amd64" in err
    assert not (dest / "index.json").exists()
    # The same from a layout holding a single arm64 image.
    lay = tmp_path / "lay"
    write_layout(lay, oci_image(5, platform="linux/arm64"), "v1")
    code, _, err = pull(
        capsys, f"oci:{lay}:v1", str(dest), "--platform", "linux/amd64", "--no-cache"
    )
    assert code == 1, err
    assert "linux/arm64" in err and "linux/amd64" in err
    # A match, or no --platform at all, pulls as before.
    code, _, err = pull(capsys, ref, str(dest), "--platform", "linux/amd64", "--no-cache")
    assert code == 0, err
    code, _, err = pull(capsys, f"oci:{lay}:v1", str(tmp_path / "d2"), "--no-cache")
    assert code == 0, err


def test_a_malformed_platform_is_a_usage_error_that_says_what_a_platform_is(
    registry: Registry, published: Published, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = f"{registry.host}/test/multi:v1"  # an index: the platform was used, and failed (1)
    for bad in ["garbage", "linux/", "a/b/c/d"]:
        code, _, err = pull(capsys, ref, str(tmp_path / "d"), "--platform", bad, "--no-cache")
        assert code == 2, (bad, err)
        assert f"not a platform: {bad!r}" in err and "e.g. linux/amd64" in err
    assert not (tmp_path / "d").exists()


# --- 10: references ----------------------------------------------------------------------

PASSWORD = "hunter2-Pa55"


def test_a_url_is_not_a_reference_and_the_message_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = pull(capsys, "http://127.0.0.1:5000/x/a:v1", str(tmp_path / "d"), "--no-cache")
    assert code == 2, err
    assert "bad port" not in err
    assert "no scheme" in err and "'http://'" in err
    assert "[HOST[:PORT]/]NAME[:TAG][@DIGEST]" in err


def test_credentials_in_a_reference_are_refused_and_never_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = pull(
        capsys, f"user:{PASSWORD}@127.0.0.1:5000/x:v1", str(tmp_path / "d"), "--no-cache"
    )
    assert code == 2, err
    assert PASSWORD not in err
    assert "credentials do not belong in a reference" in err
    assert "digest algorithm" not in err


@pytest.mark.parametrize(
    "text",
    [
        f"user:{PASSWORD}@host.example/x:v1",
        f"user:{PASSWORD}@host.example:5000/x/y@sha256:{'a' * 64}",
        f"https://user:{PASSWORD}@ghcr.io/x",
        f"user:{PASSWORD}@alpine",  # no '/': could be name:tag@digest, so only masked
        f"user:{PASSWORD}@host:5000",
        f"user:p@{PASSWORD}@alpine",  # a password holding '@'
        f"user:p/{PASSWORD}@host.example",  # a password holding '/'
        f"user:p/{PASSWORD}@host.example/x",
        f"user:{PASSWORD} x@host",  # bad characters too
    ],
)
def test_reference_errors_never_hold_the_password(text: str) -> None:
    with pytest.raises(InvalidReferenceError) as ei:
        Reference.parse(text)
    assert PASSWORD not in str(ei.value)
    assert "invalid reference" in str(ei.value)
    assert PASSWORD not in str(ei.value.__cause__ or "")


def test_plain_references_with_at_and_colon_still_parse() -> None:
    d = "sha256:" + "b" * 64
    assert Reference.parse(f"alpine:3.20@{d}").tag == "3.20"
    assert str(Reference.parse(f"localhost:5000/x/y@{d}").digest) == d


# --- 10: a tarball in a missing directory ------------------------------------------------


def test_a_tarball_in_a_missing_directory_names_the_destination(
    registry: Registry, published: Published, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "missing" / "x.tar"
    code, _, err = pull(capsys, f"{registry.host}/test/small:v1", str(dest), "--no-cache")
    assert code == 1, err
    assert os.path.realpath(dest) in err
    assert ".tmp" not in err and ".tarball." not in err
    assert not dest.parent.exists()


# --- the attack on the CLI, 1: a --platform is checked whole, when the arguments are read ----

NOWHERE = "127.0.0.1:9/x/y:v1"  # nothing listens: a platform let through fails late (exit 1)


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        " linux/amd64",
        "linux/amd64 ",
        "linux/amd64\n",
        "linux/amd64/",
        "linux//amd64",
        "linux/amd64/v1/x",
        "linux/arm.64",
        "linux/ärm64",
        "linux/\u212amd64",  # the Kelvin sign, which lower() makes a 'k'
        "linux",
    ],
)
def test_a_platform_is_checked_whole_when_the_arguments_are_read(
    bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "d"
    code, _, err = pull(capsys, NOWHERE, str(dest), "--platform", bad, "--no-cache")
    assert code == 2, (bad, err)
    assert f"not a platform: {bad!r}" in err, err
    assert "OS/ARCH[/VARIANT]" in err and "e.g. linux/amd64" in err
    assert not dest.exists()


def test_a_platform_in_capitals_means_the_same_platform_as_containerd_reads_it(
    registry: Registry, published: Published, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = f"{registry.host}/test/multi:v1"
    for upper, lower in [("LINUX/AMD64", "linux/amd64"), ("Linux/ARM/V7", "linux/arm/v7")]:
        code, _, err = pull(capsys, ref, str(tmp_path / lower), "--platform", lower, "--no-cache")
        assert code == 0, err
        code, _, err = pull(capsys, ref, str(tmp_path / upper), "--platform", upper, "--no-cache")
        assert code == 0, (upper, err)
        assert names_in(tmp_path / upper) == names_in(tmp_path / lower)
    assert names_in(tmp_path / "linux/amd64") != names_in(tmp_path / "linux/arm/v7")


# --- the attack on the CLI, 2: --name -------------------------------------------------------


def test_two_names_for_one_source_are_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, dest = tmp_path / "a", tmp_path / "dest"
    write_layout(a, oci_image(1), "v1")
    src = f"oci:{a}:v1"
    code, _, err = pull(
        capsys, src, str(dest), "--no-cache", "--name", f"{src}=b", "--name", f"{src}=c"
    )
    assert code == 2, err
    assert src in err and "'b'" in err and "'c'" in err
    assert not dest.exists()
    # The same name twice says one thing: no conflict.
    code, _, err = pull(
        capsys, src, str(dest), "--no-cache", "--name", f"{src}=b", "--name", f"{src}=b"
    )
    assert code == 0, err
    assert [n for n, _ in names_in(dest)] == ["b"]


@pytest.mark.parametrize(
    "bad",
    ["UPPER", "x/App:v1", f"x/app@sha256:{'a' * 64}", f"x/app:v1@sha256:{'a' * 64}", "x/app:"],
)
def test_a_name_in_a_tarball_must_be_a_repository_and_tag_docker_load_takes(
    bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, out_tar = tmp_path / "a", tmp_path / "out.tar"
    write_layout(a, oci_image(1), "v1")
    src = f"oci:{a}:v1"
    code, _, err = pull(capsys, src, str(out_tar), "--no-cache", "--name", f"{src}={bad}")
    assert code == 2, (bad, err)
    assert f"{bad!r}" in err and "REPOSITORY[:TAG]" in err, err
    assert not out_tar.exists()


def repo_tags(path: Path) -> list[list[str]]:
    with tarfile.open(path) as tf:
        f = tf.extractfile("manifest.json")
        assert f is not None
        return [m["RepoTags"] for m in json.load(f)]


def test_a_good_name_goes_in_as_docker_would_tag_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tmp_path / "a"
    write_layout(a, oci_image(1), "v1")
    src = f"oci:{a}:v1"
    for name, tags in [
        ("x/app", [["x/app:latest"]]),  # docker load refuses a RepoTag without a tag
        ("localhost:5000/x/app:V1.0", [["localhost:5000/x/app:V1.0"]]),
    ]:
        out_tar = tmp_path / f"{len(name)}.tar"
        code, _, err = pull(capsys, src, str(out_tar), "--no-cache", "--name", f"{src}={name}")
        assert code == 0, (name, err)
        assert repo_tags(out_tar) == tags
    # A layout's ref name follows the image spec's grammar, which allows capitals.
    code, _, err = pull(capsys, src, str(tmp_path / "lay"), "--no-cache", "--name", f"{src}=UPPER")
    assert code == 0, err
    assert [n for n, _ in names_in(tmp_path / "lay")] == ["UPPER"]


# --- the attack on the CLI, 3: what an interrupted pull says it left ------------------------


def test_an_interrupt_into_an_existing_empty_directory_says_what_is_there(
    proxy: FaultProxy, published: Published, tmp_path: Path
) -> None:
    proxy.add("/blobs/sha256:", "throttle", 0.05, times=100)
    dest = tmp_path / "dest"
    dest.mkdir()
    env = dict(os.environ)
    env.pop("AIOLAYERCACHE_CACHE_DIR", None)
    p = subprocess.Popen(
        [*CLI, "pull", f"{proxy.address}/test/big:v1", str(dest), "--no-cache"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (dest / "oci-layout").exists():
            time.sleep(0.02)
        assert (dest / "oci-layout").exists(), "the pull never started writing DEST"
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert os.listdir(dest) != [] and not (dest / "index.json").exists()
    assert "was not changed" not in err, err  # it was: oci-layout and blobs are there now
    assert f"{dest}: blobs of an unfinished pull but no index.json" in err, err
    assert "pull again" in err and "reused" in err
    assert "remove it" not in err  # DEST was there before: it may hold the user's files


def test_interrupt_messages_compare_with_what_dest_was(tmp_path: Path) -> None:
    from aiolayercache.cli._pull import dest_state, interrupted

    # An existing directory without index.json, left as it was.
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    before = dest_state(str(d))
    assert interrupted(str(d), before) == f"{d} was not changed"
    # The pull added oci-layout and blobs.
    (d / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (d / "blobs" / "sha256").mkdir(parents=True)
    (d / "blobs" / "sha256" / ("a" * 64)).write_bytes(b"x")
    msg = interrupted(str(d), before)
    assert "was not changed" not in msg and "no index.json" in msg and "reused" in msg, msg
    # An unfinished pull before, one more blob now: the top level looks the same.
    before = dest_state(str(d))
    (d / "blobs" / "sha256" / ("b" * 64)).write_bytes(b"y")
    msg = interrupted(str(d), before)
    assert "was not changed" not in msg and "no index.json" in msg, msg
    # A layout with index.json: replaced atomically, so as it was, or (the pull finished
    # as the interrupt came) replaced, and then it does not say "as it was".
    write_layout(tmp_path / "lay", oci_image(1), "v1")
    lay = tmp_path / "lay"
    before = dest_state(str(lay))
    (lay / "blobs" / "sha256" / ("c" * 64)).write_bytes(b"z")
    assert "index.json is as it was" in interrupted(str(lay), before)
    tmp = lay / "index.json.new"
    tmp.write_bytes((lay / "index.json").read_bytes().replace(b"v1", b"v2"))
    os.replace(tmp, lay / "index.json")
    assert "as it was" not in interrupted(str(lay), before)
    # A tarball: replaced atomically, so not written, or not changed.
    t = tmp_path / "x.tar"
    before = dest_state(str(t))
    assert interrupted(str(t), before) == f"{t} was not written"
    t.write_bytes(b"old")
    before = dest_state(str(t))
    assert interrupted(str(t), before) == f"{t} was not changed"


# --- the attack on the CLI, 4: a failed pull names its source once --------------------------


def test_a_failed_pull_names_its_source_once(
    registry: Registry, published: Published, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lay, single = tmp_path / "lay", tmp_path / "single"
    anyio.run(
        layout.write,
        lay,
        random.index(32 * 1024, 1, 2, platforms=["linux/amd64", "linux/arm64"], seed=7),
    )
    write_layout(single, oci_image(8, platform="linux/arm64"), "v1")
    (tmp_path / "empty").mkdir()
    cases = [
        (f"oci:{single}:v9", []),  # no image of that name
        (f"oci:{lay}", ["--platform", "linux/s390x"]),  # a layout's index without it
        (f"oci:{single}:v1", ["--platform", "linux/amd64"]),  # a single image of another
        (f"{registry.host}/test/multi:v1", ["--platform", "linux/s390x"]),
        (f"{registry.host}/test/small:v1", ["--platform", "linux/arm64"]),
        (f"oci:{tmp_path / 'empty'}", []),  # not a layout
    ]
    for src, opts in cases:
        code, _, err = pull(capsys, src, str(tmp_path / "d"), "--no-cache", *opts)
        assert code == 1, (src, err)
        assert f"aiolayercache: pull failed: {src}: " in err, err
        assert err.count(src) == 1, err
