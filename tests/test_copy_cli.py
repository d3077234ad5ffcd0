"""``aiolayercache copy`` and ``push``, run as a user runs them, against the real registry.

Sources through the fault proxy (which counts every request) or straight to
the registry; the proxy and the registry are different hosts of one storage,
so a copy from one to the other uploads, and a copy within one mounts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aiolayercache import Hash, Image, layout, partial, random, tarball, validate
from aiolayercache.cli import EXIT_USAGE, main
from aiolayercache.remote import Client, RemoteError

from .conftest import USERS, Published, Source
from .registry import FaultProxy, Registry

CLI = [sys.executable, "-m", "aiolayercache"]
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e.pop("AIOLAYERCACHE_CACHE_DIR", None)
    e.update(env or {})
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=e, check=False
    )


def summary(out: str) -> dict[str, float]:
    m = re.search(
        r"(\d+) images? \((\d+) manifests?\), (\d+) blobs pushed, (\d+) skipped as present, "
        r"(\d+) mounted, ([\d.]+) (\w+) pushed \(([\d.]+) (\w+) read from the source, "
        r"([\d.]+) (\w+) from the cache\), [\d.]+s$",
        out.strip(),
    )
    assert m, out
    g = m.groups()
    return {
        "images": int(g[0]),
        "manifests": int(g[1]),
        "pushed": int(g[2]),
        "skipped": int(g[3]),
        "mounted": int(g[4]),
        "bytes": float(g[5]) * UNITS[g[6]],
        "read": float(g[7]) * UNITS[g[8]],
        "cached": float(g[9]) * UNITS[g[10]],
    }


def raw_manifest(ref: str) -> bytes:
    """The manifest ``ref`` names, as skopeo reads it."""
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def skopeo_copies(ref: str, dest: Path) -> None:
    """skopeo reads every blob of what we pushed (and checks each digest)."""
    out = subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{dest}:x"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def blob_gets(px: FaultProxy, digest: Hash | None = None) -> int:
    return sum(
        n
        for k, n in px.stats.requests.items()
        if k.startswith("GET ") and "/blobs/" in k and (digest is None or k.endswith(str(digest)))
    )


def uploads(px: FaultProxy) -> int:
    return sum(n for k, n in px.stats.requests.items() if k.split(" ")[0] in ("PUT", "PATCH"))


def blob_bytes(img: Image) -> int:
    return sum(len(v) for v in img._blobs.blobs.values())  # type: ignore[attr-defined]


async def _validated_digest(ref: str) -> Hash:
    async with Client() as c:
        img = await c.image(ref)
        await validate.image(img)
        return await img.digest()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("copy", "alpine"), "the following arguments are required"),
        (("copy", "alpine", "oci:DEST"), "copy writes to a registry"),
        (("copy", "alpine", "UPPER/Case:x"), "invalid reference"),
        (("copy", "oci:", "example.com/x:v1"), "oci: needs a directory"),
        (("copy", "-j", "0", "alpine", "example.com/x:v1"), "-j must be at least 1"),
        (("copy", "--platform", "linux", "alpine", "example.com/x:v1"), "not a platform"),
        (("push", "DEST", "example.com/x:v1"), "neither a directory"),
    ],
)
def test_usage_errors_exit_2_and_say_why(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argv: tuple[str, ...],
    says: str,
) -> None:
    monkeypatch.setenv("AIOLAYERCACHE_CACHE_DIR", str(tmp_path / "c"))
    argv = tuple(a.replace("DEST", str(tmp_path / "nothing")) for a in argv)
    capsys.readouterr()
    assert main(list(argv)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "c").exists()


def test_help_lists_copy_and_push() -> None:
    out = run("--help")
    assert "copy" in out.stdout and "push" in out.stdout
    copy = run("copy", "--help")
    assert copy.returncode == 0
    for flag in ["--all-platforms", "--platform", "-j", "--cache-dir", "--no-cache", "--insecure"]:
        assert flag in copy.stdout
    push = run("push", "--help")
    assert push.returncode == 0 and "--cache-dir" not in push.stdout


def test_registry_to_registry_keeps_the_digest_and_a_second_copy_pushes_nothing(
    proxy: FaultProxy, registry: Registry, published: Published, tmp_path: Path
) -> None:
    src = f"{proxy.address}/test/small:v1"
    dst = f"{registry.host}/copy-cli/small:v1"  # another host: no mount, every blob uploads
    cache_dir = str(tmp_path / "cache")
    first = run("copy", src, dst, "--cache-dir", cache_dir)
    assert first.returncode == 0, first.stderr
    s = summary(first.stdout)
    total = blob_bytes(published.small)
    assert (s["images"], s["manifests"], s["pushed"], s["skipped"], s["mounted"]) == (1, 1, 4, 0, 0)
    assert s["bytes"] == pytest.approx(total, rel=0.01)
    assert f"copied {src} to {dst} ({published.small_digest})" in first.stderr
    assert Hash.of(raw_manifest(dst)) == published.small_digest
    assert asyncio.run(_validated_digest(dst)) == published.small_digest
    assert blob_gets(proxy) == 4  # three layers and the config, once each

    proxy.reset()
    again = run("copy", src, dst, "--cache-dir", cache_dir, "-q")
    assert again.returncode == 0, again.stderr
    a = summary(again.stdout)
    assert (a["pushed"], a["skipped"], a["mounted"], a["bytes"]) == (0, 4, 0, 0)
    assert again.stderr == ""  # --quiet
    assert blob_gets(proxy) == 0  # nothing read: every blob was there (the config cached)


def test_copy_between_repositories_of_one_registry_moves_no_layer_bytes(
    proxy: FaultProxy, registry: Registry, published: Published, tmp_path: Path
) -> None:
    src = f"{proxy.address}/test/big:v1"
    dst = f"{proxy.address}/copy-cli/mounted:v1"
    r = run("copy", src, dst, "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    s = summary(r.stdout)
    assert (s["pushed"], s["mounted"], s["bytes"], s["read"]) == (0, 3, 0, 0)
    mounts = [k for k in proxy.stats.requests if k.startswith("POST ") and "uploads" in k]
    assert mounts, proxy.stats.requests
    assert blob_gets(proxy) == 1, "only the config was read; no layer"
    assert uploads(proxy) == 1, "only the manifest was put"
    # Read from the registry itself: the proxy passes one Accept header of skopeo's
    # several, and a registry asked without the schema 2 type answers schema 1.
    mounted = raw_manifest(f"{registry.host}/copy-cli/mounted:v1")
    assert Hash.of(mounted) == asyncio.run(published.big.digest())


def test_images_sharing_layers_read_the_shared_layers_once_through_the_cache(
    proxy: FaultProxy, registry: Registry, published: Published, tmp_path: Path
) -> None:
    # A second image with small's layers and a config of its own.
    small = Source(published.small)
    doc = json.loads(small.raw)
    cfg = json.loads(small.blobs[Hash.parse(doc["config"]["digest"])])
    cfg["config"] = {"Labels": {"variant": "b"}}
    raw_cfg = json.dumps(cfg).encode()
    doc["config"].update(digest=str(Hash.of(raw_cfg)), size=len(raw_cfg))
    other = partial.image(json.dumps(doc).encode(), small.open_blob, raw_config=raw_cfg)

    async def publish() -> Hash:
        async with Client() as c:
            return await c.write(f"{registry.host}/copy-cli/other:v1", other)

    other_digest = asyncio.run(publish())
    proxy.reset()
    cache_dir = str(tmp_path / "cache")
    a = run("copy", f"{proxy.address}/test/small:v1", f"{registry.host}/copy-cli/a:v1",
            "--cache-dir", cache_dir)  # fmt: skip
    assert a.returncode == 0, a.stderr
    b = run("copy", f"{proxy.address}/copy-cli/other:v1", f"{registry.host}/copy-cli/b:v1",
            "--cache-dir", cache_dir)  # fmt: skip
    assert b.returncode == 0, b.stderr
    layers = [Hash.parse(x["digest"]) for x in doc["layers"]]
    assert [blob_gets(proxy, h) for h in layers] == [1, 1, 1]
    s = summary(b.stdout)
    layer_bytes = sum(len(small.blobs[h]) for h in layers)
    # Every layer went up again (a new repository) but came from the cache, not the source.
    assert (s["pushed"], s["read"]) == (4, 0)
    assert s["cached"] == pytest.approx(layer_bytes, rel=0.01)
    assert Hash.of(raw_manifest(f"{registry.host}/copy-cli/b:v1")) == other_digest


def test_oci_layout_to_registry_and_push_short_form(registry: Registry, tmp_path: Path) -> None:
    one, two = random.image(64 * 1024, 2, seed=81), random.image(64 * 1024, 1, seed=82)
    images = tmp_path / "images"
    asyncio.run(layout.write_all(images, [(one, "one"), (two, "two")]))
    dst = f"{registry.host}/copy-cli/layout"
    ambiguous = run("copy", f"oci:{images}", f"{dst}:v1")
    assert ambiguous.returncode == 2 and "holds 2 images" in ambiguous.stderr, ambiguous.stderr
    ambiguous = run("push", str(images), f"{dst}:v1")
    assert ambiguous.returncode == 2 and "name one as DIR:NAME" in ambiguous.stderr

    r = run("copy", f"oci:{images}:one", f"{dst}:one")
    assert r.returncode == 0, r.stderr
    s = summary(r.stdout)
    assert (s["pushed"], s["cached"]) == (3, 0)  # a layout is never cached
    layers = blob_bytes(one) - len(asyncio.run(one.raw_config_file()))
    assert s["read"] == pytest.approx(layers, rel=0.01)
    assert Hash.of(raw_manifest(f"{dst}:one")) == asyncio.run(one.digest())
    skopeo_copies(f"{dst}:one", tmp_path / "back1")

    p = run("push", f"{images}:two", f"{dst}:two")
    assert p.returncode == 0, p.stderr
    assert Hash.of(raw_manifest(f"{dst}:two")) == asyncio.run(two.digest())
    assert asyncio.run(_validated_digest(f"{dst}:two")) == asyncio.run(two.digest())


def test_docker_archive_to_registry_and_push_short_form(registry: Registry, tmp_path: Path) -> None:
    archive = tmp_path / "app.tar"
    asyncio.run(tarball.write(archive, {"example.com/app:v1": random.image(96 * 1024, 2, seed=83)}))

    async def digest() -> Hash:
        return await (await tarball.images(archive))[0].digest()

    want = asyncio.run(digest())
    for argv, dst in [
        (("copy", f"docker-archive:{archive}"), f"{registry.host}/copy-cli/archive:v1"),
        (("push", str(archive)), f"{registry.host}/copy-cli/pushed:v1"),
    ]:
        r = run(*argv, dst)
        assert r.returncode == 0, r.stderr
        assert summary(r.stdout)["pushed"] == 3
        assert Hash.of(raw_manifest(dst)) == want
        skopeo_copies(dst, tmp_path / dst.rsplit("/", 1)[1])


def test_all_platforms_copies_the_whole_index_and_platform_picks_one(
    proxy: FaultProxy, registry: Registry, published: Published
) -> None:
    src = f"{proxy.address}/test/multi:v1"
    dst = f"{registry.host}/copy-cli/multi"
    r = run("copy", "--all-platforms", "-j", "8", src, f"{dst}:all")
    assert r.returncode == 0, r.stderr
    s = summary(r.stdout)
    assert (s["images"], s["manifests"], s["pushed"]) == (1, 5, 4 * 3)
    raw = raw_manifest(f"{dst}:all")
    assert Hash.of(raw) == published.multi_digest
    children = json.loads(raw)["manifests"]
    assert len(children) == 4
    for child in children:  # every child arrived, under its digest
        assert Hash.of(raw_manifest(f"{dst}@{child['digest']}")) == Hash.parse(child["digest"])

    arm = run("copy", "--platform", "linux/arm64/v8", src, f"{dst}:arm64")
    assert arm.returncode == 0, arm.stderr
    assert summary(arm.stdout)["manifests"] == 1
    want = next(c["digest"] for c in children if c["platform"]["architecture"] == "arm64")
    assert str(Hash.of(raw_manifest(f"{dst}:arm64"))) == want


def test_failures_exit_1_typed_naming_the_source_and_never_the_password(
    registry: Registry, basic_registry: Registry, tmp_path: Path
) -> None:
    src = f"{registry.host}/test/small:v1"
    dst = f"{basic_registry.host}/copy-cli/secret:v1"
    nobody = tmp_path / "nobody"
    nobody.mkdir()
    r = run("copy", src, dst, env={"DOCKER_CONFIG": str(nobody)})
    assert r.returncode == 1
    assert f"copy of {src} to {dst} failed: UnauthorizedError" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

    (user, password), = USERS.items()  # fmt: skip
    wrong = f"not-{password}"
    for pw, code in [(wrong, 1), (password, 0)]:
        conf = tmp_path / pw
        conf.mkdir()
        auth = base64.b64encode(f"{user}:{pw}".encode()).decode()
        (conf / "config.json").write_text(
            json.dumps({"auths": {f"http://{basic_registry.host}": {"auth": auth}}})
        )
        # --debug logs requests: still no credential in them.
        flag = "--debug" if code == 0 else "-q"
        r = run("copy", src, dst, flag, env={"DOCKER_CONFIG": str(conf)})
        assert r.returncode == code, r.stderr
        assert pw not in r.stdout + r.stderr and auth not in r.stdout + r.stderr
        if code:
            assert "UnauthorizedError" in r.stderr
    assert Hash.of(raw_manifest(f"{registry.host}/copy-cli/secret:v1")) == Hash.of(
        raw_manifest(src)
    )  # one storage behind both registries: what alice pushed is there

    missing = run("copy", f"{registry.host}/test/small:nope", f"{registry.host}/copy-cli/x:v1")
    assert missing.returncode == 1
    assert f"copy failed: {registry.host}/test/small:nope: " in missing.stderr, missing.stderr
    assert "RemoteError" in missing.stderr and "404" in missing.stderr


def test_sigint_mid_copy_exits_130_and_leaves_dst_untagged(
    proxy: FaultProxy, registry: Registry, published: Published
) -> None:
    proxy.add("/blobs/sha256:", "throttle", 0.05, times=100)
    dst = f"{registry.host}/copy-cli/interrupted:v1"
    env = dict(os.environ)
    env.pop("AIOLAYERCACHE_CACHE_DIR", None)
    p = subprocess.Popen(
        [*CLI, "copy", f"{proxy.address}/test/big:v1", dst, "--no-cache"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and blob_gets(proxy) < 2:
            time.sleep(0.02)
        assert blob_gets(proxy) >= 2, "the copy never started reading a layer"
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert f"interrupted; {dst} was not written" in err, err
    assert summary(out)["images"] == 0

    async def tagged() -> bool:
        async with Client() as c:
            try:
                await c.get(dst)
            except RemoteError as exc:
                assert exc.status == 404
                return False
            return True

    assert not asyncio.run(tagged())
