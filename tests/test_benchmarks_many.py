"""Smoke tests of the suite's scenario 11 and issue 16 pieces that need no registry."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks import many, peers
from benchmarks.suite import QUICK, SCENARIOS, Sizes, parse_only

HEX = "ab" * 32


def test_access_log_counts_blob_gets_since_the_mark(tmp_path: Path) -> None:
    log = tmp_path / "registry.log"
    line = '127.0.0.1 - - [01/Dec/2026:02:12:49 +0000] "{} {} HTTP/1.1" {} {} "" "ua"\n'
    log.write_text(line.format("GET", f"/v2/a/blobs/sha256:{HEX}", 200, 999))
    counter = many.AccessLog(log)
    counter.mark()
    with open(log, "a") as f:
        f.write(line.format("GET", f"/v2/a/blobs/sha256:{HEX}", 200, 1000))
        f.write(line.format("GET", f"/v2/b/blobs/sha256:{HEX}", 206, 24))
        f.write(line.format("HEAD", f"/v2/a/blobs/sha256:{HEX}", 200, 0))
        f.write(line.format("GET", f"/v2/a/blobs/sha256:{HEX}", 404, 157))
        f.write(line.format("GET", "/v2/a/manifests/v1", 200, 500))
        f.write('time="..." level=error msg="response completed with error"\n')
    assert counter.blob_gets() == (1024, 2)


def test_scenario_11_is_selectable_and_sized() -> None:
    assert "11" in SCENARIOS
    assert parse_only("1,3,11") == {"1", "3", "11"}
    assert parse_only("10-11") == {"10", "11"}
    with pytest.raises(argparse.ArgumentTypeError, match="1-11"):
        parse_only("12")
    full = Sizes()
    assert (full.many_images, full.many_base_mib, full.many_own_layers) == (32, 16, 3)
    assert (full.many_own_kib, full.many_jobs) == (2048, 8)
    assert QUICK.many_base_mib < full.many_base_mib


def test_skopeo_runs_jobs_at_once_one_pair_a_line(tmp_path: Path) -> None:
    cmd = many.skopeo_cmd(tmp_path / "args", 8)
    assert cmd[:7] == ["xargs", "-a", str(tmp_path / "args"), "-P", "8", "-L", "1"]
    assert cmd[7:9] == ["skopeo", "copy"]
    assert many.tag("127.0.0.1:5000/bench/many-07:v1") == "many-07"


def test_the_peer_is_found_or_said_missing(tmp_path: Path) -> None:
    py, why = peers.drca_python(str(tmp_path / "no-python"))
    assert (py is None) == bool(why)
