"""The command in-process, for speed: ``main(argv)`` returns the exit code.

Usage errors, the argument types, the progress wrappers, and what ``--help``
loads. The subprocess tests in test_cli.py run the same command as a user does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aiolayercache import random, validate
from aiolayercache.cli import EXIT_USAGE, main
from aiolayercache.cli._args import human, parse_duration, parse_size
from aiolayercache.cli._progress import ObservedImage, ObservedIndex, Reporter
from aiolayercache.streams import read_all


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``main(argv)`` in-process: (exit code, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ((), ""),
        (("pull",), "the following arguments are required"),
        (("pull", "UPPER/Case:x", "DEST"), "invalid reference"),
        (("pull", "oci:", "DEST"), "oci: needs a directory"),
        (("pull", "-j", "0", "alpine", "DEST"), "-j must be at least 1"),
        (("pull", "--name", "nope", "alpine", "DEST"), "want SRC=NAME"),
        (("pull", "--name", "busybox=x", "alpine", "DEST"), "is not one of the sources"),
        (("pull", "--all-platforms", "alpine", "x.tar"), "--all-platforms needs --format oci"),
        (("pull", "--platform", "linux", "alpine", "DEST"), "not a platform"),
        (("cache", "prune"), "prune needs --max-size and/or --older-than"),
        (("cache", "rm", "sha256:nothex"), "sha256"),
        (("cache", "prune", "--max-size", "lots"), "not a size"),
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
    argv = tuple(str(tmp_path / a) if a == "DEST" else a for a in argv)
    code, err = run(capsys, *argv)
    assert code == EXIT_USAGE, err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "DEST").exists()


def test_sizes_durations_and_units() -> None:
    assert parse_size("500M") == 500 << 20
    assert parse_size("2GiB") == parse_size("2g") == 2 << 30
    assert parse_size("1024") == 1024
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("2w") == 14 * 86400
    assert (human(512), human(1536), human(3 << 30)) == ("512 B", "1.5 KiB", "3.0 GiB")


def test_help_loads_neither_aiohttp_nor_rich() -> None:
    code = (
        "import sys\n"
        "from aiolayercache.cli import main\n"
        "assert main(['--help']) == 0 and main(['pull']) == 2\n"
        "print(sorted(m for m in ('aiohttp', 'rich') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.splitlines()[-1] == "[]"


@pytest.mark.anyio
async def test_observed_wrappers_count_layers_and_pass_the_rest_through() -> None:
    ii = random.index(1000, 2, 2)
    rep = Reporter("quiet")
    observed = ObservedIndex(ii, rep)
    assert await observed.digest() == await ii.digest()
    assert await observed.raw_manifest() == await ii.raw_manifest()
    child = (await ii.index_manifest()).manifests[0].digest
    img = await observed.image(child)
    assert isinstance(img, ObservedImage)
    assert await img.raw_manifest() == await (await ii.image(child)).raw_manifest()
    for layer in await img.layers():
        await read_all(await layer.compressed())
    assert (rep.stats.layers, rep.stats.hits) == (2, 0)
    assert rep.stats.bytes_fetched == sum([await x.size() for x in await img.layers()])
    await validate.index(observed)
