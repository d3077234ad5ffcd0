"""Credentials: auth files, credential helpers (real executables), precedence, login/logout.

Every test runs with HOME, XDG_RUNTIME_DIR, XDG_CONFIG_HOME, DOCKER_CONFIG and
REGISTRY_AUTH_FILE pointed into its tmp dir (or unset), and a tmp dir of
``docker-credential-*`` scripts first on PATH.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from aiolayercache.remote import (
    Client,
    CredentialHelperError,
    Credentials,
    Reference,
    RetryPolicy,
    UnauthorizedError,
    auth_files,
)
from aiolayercache.remote._auth import Challenge, token_request
from aiolayercache.remote._credentials import (
    HUB_SERVER,
    CredentialStore,
    file_steps,
    helper_server,
    parse_auth_key,
)

from .conftest import USERS, Published
from .registry import Registry

FAST = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.05, retry_after_cap=1.0, resumes=2)
(USER, PASSWORD), = USERS.items()  # fmt: skip
WRONG = "wrong-Pa55word-zz9"
SECRET_STDERR = "sk-live-LEAKED-IF-YOU-SEE-THIS"
CLI = [sys.executable, "-m", "aiolayercache"]

pytestmark = pytest.mark.anyio


@dataclass
class Env:
    tmp: Path
    bin: Path
    home: Path
    docker: Path

    def helper(self, name: str, body: str) -> Path:
        p = self.bin / f"docker-credential-{name}"
        p.write_text("#!/bin/sh\n" + body)
        p.chmod(0o755)
        return p

    def answering(self, name: str, user: str, secret: str) -> None:
        """A helper that records each run and what it was asked, then answers."""
        answer = json.dumps({"ServerURL": "x", "Username": user, "Secret": secret})
        self.helper(
            name,
            f'cat > "{self.bin}/{name}.asked"\necho run >> "{self.bin}/{name}.runs"\n'
            f"printf '%s' '{answer}'\n",
        )

    def runs(self, name: str) -> int:
        p = self.bin / f"{name}.runs"
        return len(p.read_text().splitlines()) if p.exists() else 0

    def asked(self, name: str) -> str:
        return (self.bin / f"{name}.asked").read_text()

    def write(self, path: Path, doc: object) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
        return path


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    e = Env(tmp_path, tmp_path / "bin", tmp_path / "home", tmp_path / "docker")
    e.bin.mkdir()
    e.home.mkdir()
    monkeypatch.setenv("HOME", str(e.home))
    monkeypatch.setenv("DOCKER_CONFIG", str(e.docker))
    for var in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "REGISTRY_AUTH_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", f"{e.bin}{os.pathsep}{os.environ['PATH']}")
    yield e


def auths(host: str, user: str, password: str) -> dict[str, object]:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"auths": {host: {"auth": auth}}}


async def pull(host: str, repo: str = "test/small", **kw: object) -> None:
    async with Client(retry=FAST, registries_conf=False, **kw) as c:  # type: ignore[arg-type]
        await c.get(f"{host}/{repo}:v1")


def no_secret(text: str) -> None:
    for s in (
        PASSWORD,
        WRONG,
        SECRET_STDERR,
        base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
    ):
        assert s not in text


# --- the lookup, no network ------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["https://index.docker.io/v1/", "docker.io", "registry-1.docker.io", "index.docker.io"]
)
@pytest.mark.parametrize("name", ["docker.io", "index.docker.io", "registry-1.docker.io"])
def test_docker_hub_names_all_match(key: str, name: str) -> None:
    doc = {"auths": {key: {"username": "u", "password": "p"}}, "credHelpers": {key: "hub"}}
    assert file_steps(doc, name, "library/alpine") == ["hub", Credentials("u", "p")]
    assert file_steps(doc, "ghcr.io", "library/alpine") == []
    assert helper_server(name) == HUB_SERVER


def test_auth_keys_match_per_repository_by_longest_prefix() -> None:
    assert parse_auth_key("http://h:5000/v2/") == ("h:5000", "")
    assert parse_auth_key("https://h/anything/here") == ("h", "")
    assert parse_auth_key("h/v1/") == ("h", "")
    assert parse_auth_key("h/ns/repo") == ("h", "ns/repo")
    doc = {
        "auths": {
            "https://h": {"username": "whole", "password": "1"},
            "h/ns": {"username": "ns", "password": "2"},
            "h/ns/repo": {"username": "repo", "password": "3"},
            "h/ns/re": {"username": "not-a-path-prefix", "password": "4"},
            "h:5000": {"username": "other-port", "password": "5"},
        }
    }

    def user(repo: str) -> object:
        steps = file_steps(doc, "h", repo)
        assert len(steps) == 1 and isinstance(steps[0], Credentials)
        return steps[0].username

    assert user("ns/repo") == "repo"
    assert user("ns/repo/sub") == "repo"
    assert user("ns/reporter") == "ns"
    assert user("ns/other") == "ns"
    assert user("elsewhere") == "whole"


def test_docker_order_within_a_file() -> None:
    doc = {
        "credHelpers": {"h": "specific", "other": "nope"},
        "credsStore": "store",
        "auths": {"h": {"username": "a", "password": "b"}},
    }
    assert file_steps(doc, "h", "r") == ["specific", "store", Credentials("a", "b")]
    assert file_steps(doc, "x", "r") == ["store"]


def test_search_order_and_explicit_auth_file(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = env.home / ".config" / "containers" / "auth.json"
    assert auth_files() == [conf, env.docker / "config.json"]
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(env.tmp / "run"))
    assert auth_files() == [env.tmp / "run/containers/auth.json", conf, env.docker / "config.json"]
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(env.tmp / "only.json"))
    assert auth_files() == [env.tmp / "only.json"]


async def test_docker_hub_helper_is_asked_for_the_v1_url(env: Env) -> None:
    env.answering("hub", USER, PASSWORD)
    env.write(env.docker / "config.json", {"credHelpers": {"index.docker.io": "hub"}})
    store = CredentialStore(None, files=True)
    c = await store.get(Reference.parse("alpine"))
    assert (c.username, c.password) == (USER, PASSWORD)
    assert env.asked("hub") == HUB_SERVER


async def test_an_identity_token_from_a_helper_becomes_a_refresh_token_post(env: Env) -> None:
    env.answering("idt", "<token>", "refresh-me-123")
    env.write(env.docker / "config.json", {"credsStore": "idt"})
    c = await CredentialStore(None, files=True).get(Reference.parse("ghcr.io/o/r"))
    assert c.identity_token == "refresh-me-123" and not c.username and not c.password
    from yarl import URL

    req = token_request(URL("https://auth.example/token"), Challenge("bearer", {}), "s", c)
    assert req.method == "POST" and req.form is not None
    assert req.form["grant_type"] == "refresh_token"
    assert req.form["refresh_token"] == "refresh-me-123"


async def test_a_helper_without_an_entry_passes_on_to_auths(env: Env) -> None:
    env.helper("empty", 'echo "credentials not found in native keychain"\nexit 1\n')
    env.write(env.docker / "config.json", {"credsStore": "empty", **auths("h.example", "a", "b")})
    c = await CredentialStore(None, files=True).get(Reference.parse("h.example/r"))
    assert (c.username, c.password) == ("a", "b")


# --- against the real registries ---------------------------------------------------------


async def test_credentials_from_cred_helpers(
    env: Env, basic_registry: Registry, published: Published
) -> None:
    env.answering("good", USER, PASSWORD)
    env.write(env.docker / "config.json", {"credHelpers": {basic_registry.host: "good"}})
    await pull(basic_registry.host)
    assert env.asked("good") == basic_registry.host


async def test_credentials_from_creds_store_with_bearer_tokens(
    env: Env, token_registry: Registry, published: Published
) -> None:
    env.answering("store", USER, PASSWORD)
    env.write(env.docker / "config.json", {"credsStore": "store"})
    await pull(token_registry.host)
    assert env.runs("store") == 1


async def test_credentials_from_registry_auth_file(
    env: Env, basic_registry: Registry, published: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = env.write(env.tmp / "elsewhere.json", auths(basic_registry.host, USER, PASSWORD))
    with pytest.raises(UnauthorizedError):
        await pull(basic_registry.host)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(f))
    await pull(basic_registry.host)


async def test_credentials_from_xdg_runtime_dir(
    env: Env, basic_registry: Registry, published: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = env.tmp / "run"
    env.write(run / "containers" / "auth.json", auths(basic_registry.host, USER, PASSWORD))
    with pytest.raises(UnauthorizedError):
        await pull(basic_registry.host)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    await pull(basic_registry.host)


async def test_an_explicit_registry_auth_file_replaces_the_search(
    env: Env, basic_registry: Registry, published: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.write(env.docker / "config.json", auths(basic_registry.host, USER, PASSWORD))
    await pull(basic_registry.host)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(env.write(env.tmp / "empty.json", {})))
    with pytest.raises(UnauthorizedError):
        await pull(basic_registry.host)


# Each pair: the first is asked before the second. REGISTRY_AUTH_FILE, when set, is
# the only file read (test_an_explicit_registry_auth_file_replaces_the_search).
PAIRS = [
    ("given", "auth_file"),
    ("given", "runtime"),
    ("runtime", "config_home"),
    ("config_home", "helper"),
    ("helper", "store"),
    ("store", "auths"),
]


def configure(
    env: Env, host: str, which: dict[str, str], mp: pytest.MonkeyPatch
) -> dict[str, object]:
    """Set each source in ``which`` to give ``password``; the client's kwargs."""
    kw: dict[str, object] = {}
    docker: dict[str, object] = {}
    for source, pw in which.items():
        if source == "given":
            kw["credentials"] = {host: Credentials(USER, pw)}
        elif source == "auth_file":
            mp.setenv(
                "REGISTRY_AUTH_FILE", str(env.write(env.tmp / "ra.json", auths(host, USER, pw)))
            )
        elif source == "runtime":
            env.write(env.tmp / "run/containers/auth.json", auths(host, USER, pw))
            mp.setenv("XDG_RUNTIME_DIR", str(env.tmp / "run"))
        elif source == "config_home":
            env.write(env.home / ".config/containers/auth.json", auths(host, USER, pw))
        elif source in ("helper", "store"):
            env.answering(source, USER, pw)
            docker.update(
                {"credHelpers": {host: source}} if source == "helper" else {"credsStore": source}
            )
        else:
            docker.update(auths(host, USER, pw))
    if docker:
        env.write(env.docker / "config.json", docker)
    return kw


@pytest.mark.parametrize(("first", "then"), PAIRS)
@pytest.mark.parametrize("first_is_right", [True, False])
async def test_precedence(
    env: Env,
    basic_registry: Registry,
    published: Published,
    monkeypatch: pytest.MonkeyPatch,
    first: str,
    then: str,
    first_is_right: bool,
) -> None:
    good, bad = (PASSWORD, WRONG) if first_is_right else (WRONG, PASSWORD)
    kw = configure(env, basic_registry.host, {first: good, then: bad}, monkeypatch)
    if first_is_right:
        await pull(basic_registry.host, **kw)
    else:
        with pytest.raises(UnauthorizedError) as ei:
            await pull(basic_registry.host, **kw)
        no_secret(str(ei.value) + repr(ei.value))


async def test_anonymous_pulls_run_no_helper(
    env: Env, registry: Registry, basic_registry: Registry, published: Published
) -> None:
    env.answering("marker", USER, PASSWORD)
    env.write(env.docker / "config.json", {"credsStore": "marker"})
    await pull(registry.host)
    assert env.runs("marker") == 0
    await pull(basic_registry.host)  # the registry asks: now it runs
    assert env.runs("marker") == 1


async def test_a_helper_runs_once_per_registry_even_when_asked_at_once(
    env: Env, basic_registry: Registry, published: Published
) -> None:
    env.helper(
        "slow",
        f'echo run >> "{env.bin}/slow.runs"\nsleep 0.3\n'
        f'printf \'{{"Username":"{USER}","Secret":"{PASSWORD}"}}\'\n',
    )
    env.write(env.docker / "config.json", {"credsStore": "slow"})
    async with Client(retry=FAST, registries_conf=False) as c:
        async with anyio.create_task_group() as tg:
            for repo in ["test/small", "test/big", "test/oci", "test/multi"] * 2:
                tg.start_soon(c.get, f"{basic_registry.host}/{repo}:v1")
        await c.get(f"{basic_registry.host}/test/small:v1")
    assert env.runs("slow") == 1


@pytest.mark.parametrize("kind", ["fails", "missing", "garbage"])
async def test_a_broken_helper_is_a_typed_error_naming_it_and_never_its_output(
    env: Env,
    basic_registry: Registry,
    published: Published,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    if kind == "fails":
        env.helper("broken", f'echo "{SECRET_STDERR}" >&2\necho "{SECRET_STDERR}"\nexit 1\n')
    elif kind == "garbage":
        env.helper("broken", f'echo "{SECRET_STDERR}"\n')
    env.write(env.docker / "config.json", {"credsStore": "broken"})
    with pytest.raises(CredentialHelperError) as ei:
        await pull(basic_registry.host)
    e = ei.value
    assert isinstance(e, UnauthorizedError)
    assert e.helper == "docker-credential-broken" and "docker-credential-broken" in str(e)
    assert {"fails": "exit status 1", "missing": "not on PATH", "garbage": "not credentials"}[
        kind
    ] in str(e)
    no_secret(str(e) + repr(e) + "".join(r.getMessage() for r in caplog.records))


async def test_a_hanging_helper_is_a_typed_error_within_the_bound(
    env: Env, basic_registry: Registry, published: Published
) -> None:
    pidfile = env.bin / "sleep.pid"
    env.helper("hang", f'sleep 60 &\necho $! > "{pidfile}"\nwait\n')
    env.write(env.docker / "config.json", {"credsStore": "hang"})
    t0 = time.monotonic()
    with pytest.raises(CredentialHelperError, match=r"docker-credential-hang.*no answer in 1 s"):
        await pull(basic_registry.host, helper_timeout=1.0)
    assert time.monotonic() - t0 < 5
    await gone(int(pidfile.read_text()))


async def gone(pid: int) -> None:
    """Wait up to 3 s for ``pid`` to be gone (or a zombie: PID 1 may not reap here)."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        await anyio.sleep(0.05)
    pytest.fail(f"the helper's child ({pid}) outlived the timeout")


async def test_no_secret_in_logs_of_a_pull_with_helper_credentials(
    env: Env, token_registry: Registry, published: Published, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env.answering("good", USER, PASSWORD)
    env.write(env.docker / "config.json", {"credHelpers": {token_registry.host: "good"}})
    await pull(token_registry.host)
    text = "".join(r.getMessage() for r in caplog.records)
    assert "docker-credential-good" in text  # where the credentials came from, said
    no_secret(text)


# --- login and logout (the CLI, as a user runs it) ----------------------------------------


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e.pop("AIOLAYERCACHE_CACHE_DIR", None)
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=60, env=e, check=False
    )


@pytest.mark.parametrize("which", ["basic", "token"])
def test_login_then_pull_then_logout(
    env: Env,
    basic_registry: Registry,
    token_registry: Registry,
    published: Published,
    which: str,
) -> None:
    host = (basic_registry if which == "basic" else token_registry).host
    cfg = env.docker / "config.json"
    env.write(cfg, {"psFormat": "table", "auths": {"other.example": {"auth": "eDp5"}}})
    dest = str(env.tmp / "out")
    r = cli("pull", f"{host}/test/small:v1", dest, "--no-cache", "-q")
    assert r.returncode == 1 and "HTTP 401" in r.stderr

    r = cli("login", host, "-u", USER, "--password-stdin", stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    assert "Login Succeeded" in r.stdout
    no_secret(r.stdout + r.stderr)
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    doc = json.loads(cfg.read_text())
    assert doc["psFormat"] == "table" and "other.example" in doc["auths"]
    assert base64.b64decode(doc["auths"][host]["auth"]).decode() == f"{USER}:{PASSWORD}"
    assert [p.name for p in env.docker.iterdir()] == ["config.json"]  # no temp left

    r = cli("pull", f"{host}/test/small:v1", dest, "--no-cache", "-q")
    assert r.returncode == 0, r.stderr

    r = cli("logout", host)
    assert r.returncode == 0, r.stderr
    doc = json.loads(cfg.read_text())
    assert host not in doc["auths"] and "other.example" in doc["auths"]
    assert doc["psFormat"] == "table"
    r = cli("pull", f"{host}/test/small:v1", str(env.tmp / "out2"), "--no-cache", "-q")
    assert r.returncode == 1 and "HTTP 401" in r.stderr


@pytest.mark.parametrize("existing", [True, False])
def test_login_with_a_wrong_password_exits_1_and_writes_nothing(
    env: Env, basic_registry: Registry, token_registry: Registry, existing: bool
) -> None:
    cfg = env.docker / "config.json"
    if existing:
        env.write(cfg, {"auths": {}})
    before = cfg.read_bytes() if existing else None
    for host in (basic_registry.host, token_registry.host):
        r = cli("login", host, "-u", USER, "-p", WRONG)
        assert r.returncode == 1, r.stderr
        assert "UnauthorizedError" in r.stderr and "Traceback" not in r.stderr
        assert "WARNING" in r.stderr and "--password-stdin" in r.stderr
        no_secret(r.stdout + r.stderr)
    assert (cfg.read_bytes() if cfg.exists() else None) == before
    left = sorted(p.name for p in env.docker.iterdir()) if env.docker.exists() else []
    assert left == (["config.json"] if existing else [])


def test_login_and_logout_docker_hub_use_its_v1_key(env: Env) -> None:
    cfg = env.docker / "config.json"
    env.write(cfg, auths("index.docker.io", "u", "p") | {"credsStore": "x"})
    r = cli("logout", "docker.io")
    assert r.returncode == 0, r.stderr
    assert json.loads(cfg.read_text()) == {"auths": {}, "credsStore": "x"}
    r = cli("logout", "docker.io")
    assert r.returncode == 0 and "Not logged in" in r.stderr


async def test_a_fifo_or_a_bad_file_is_ignored_with_a_warning(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env.docker.mkdir()
    os.mkfifo(env.docker / "config.json")
    conf = env.write(env.home / ".config/containers/auth.json", {"auths": []})
    conf.write_text("{not json")
    store = CredentialStore(None, files=True)
    with anyio.fail_after(5):
        assert (await store.get(Reference.parse("h.example/r"))).empty
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "not a regular file" in text and "not a JSON object" in text


async def test_a_helper_that_exits_but_leaves_a_child_holding_its_output_is_bounded(
    env: Env,
) -> None:
    pidfile = env.bin / "child.pid"
    env.helper("forks", f'sleep 60 &\necho $! > "{pidfile}"\nexit 0\n')
    env.write(env.docker / "config.json", {"credsStore": "forks"})
    store = CredentialStore(None, files=True, helper_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(CredentialHelperError, match="no answer in 1 s"):
        await store.get(Reference.parse("h.example/r"))
    assert time.monotonic() - t0 < 5
    await gone(int(pidfile.read_text()))


def test_login_refuses_a_config_that_is_not_a_regular_file(
    env: Env, basic_registry: Registry
) -> None:
    env.docker.mkdir(parents=True, exist_ok=True)
    os.mkfifo(env.docker / "config.json")
    out = subprocess.run(
        [*CLI, "login", basic_registry.host, "-u", USER, "--password-stdin"],
        input=PASSWORD, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2, out
    assert "not a regular file" in out.stderr
