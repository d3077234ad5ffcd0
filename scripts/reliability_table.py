"""Run the reliability tests and write their results into docs/RELIABILITY.md.

Usage::

    .venv/bin/python scripts/reliability_table.py [--log PATH] [--timeout S] [-- PYTEST-ARGS...]

Runs ``python -m pytest tests/reliability`` with ``$AIOLAYERCACHE_RELIABILITY_LOG`` set to a
temp file (each scenario appends one JSON line there, see tests/reliability/_log.py), then
replaces the part of docs/RELIABILITY.md between ``<!-- results:start -->`` and
``<!-- results:end -->`` with a table made from that log: runs and failures per scenario,
the date, and totals of bad bytes served, partial entries, leaks and writes outside roots,
all computed from the log. With ``--log PATH`` an existing log is used and pytest is not run.
With ``--timeout S`` a pytest run still going after S seconds is stopped (and the table says
so). The table is written whatever the outcome; the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "RELIABILITY.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
ENV = "AIOLAYERCACHE_RELIABILITY_LOG"
COUNTERS = ("bad_bytes_served", "partial_entries", "leaks", "writes_outside_root")
MATRIX_ROWS = range(1, 27)
_ROWS = re.compile(r"^\s*(\d+(?:/\d+)*)")


@dataclass
class Scenario:
    name: str
    lines: int = 0
    runs: int = 0
    failures: int = 0
    xfail: bool = False
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    @property
    def rows(self) -> list[int]:
        m = _ROWS.match(self.name)
        return [int(x) for x in m.group(1).split("/")] if m else []


def read_log(path: Path) -> tuple[dict[str, Scenario], int]:
    """Scenarios aggregated by name, and the number of unreadable lines."""
    out: dict[str, Scenario] = {}
    bad = 0
    if not path.exists():
        return out, bad
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            doc: dict[str, Any] = json.loads(line)
            name = str(doc["scenario"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        sc = out.setdefault(name, Scenario(name))
        sc.lines += 1
        sc.runs += _int(doc.get("runs", 1))
        sc.failures += _int(doc.get("failures", 0))
        sc.xfail = sc.xfail or bool(doc.get("xfail"))
        for k in COUNTERS:
            sc.counters[k] += _int(doc.get(k, 0))
    return out, bad


def _int(v: object) -> int:
    try:
        return int(v)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return 0


def _sort_key(sc: Scenario) -> tuple[int, str]:
    rows = sc.rows
    return (rows[0] if rows else 99, sc.name)


def render(
    scenarios: dict[str, Scenario],
    *,
    unreadable: int,
    summary: str,
    seconds: float | None,
    command: str,
) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    kept = [s for s in scenarios.values() if not s.xfail]
    gaps = [s for s in scenarios.values() if s.xfail]
    totals = {k: sum(s.counters[k] for s in scenarios.values()) for k in COUNTERS}
    runs = sum(s.runs for s in kept)
    failures = sum(s.failures for s in kept)
    covered = {r for s in scenarios.values() for r in s.rows}
    missing = [r for r in MATRIX_ROWS if r not in covered]
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    lines = [
        f"Last run: {now}, `{command}`{took}. pytest: {summary or 'not run'}.",
        "",
        f"- Scenarios: {len(scenarios)} ({len(kept)} promises checked, {len(gaps)} known gaps "
        "run as strict xfails)",
        f"- Runs (examples, processes, pulls) of the checked promises: {runs}; "
        f"failures: **{failures}**",
        f"- Bad bytes served: **{totals['bad_bytes_served']}**; partial entries: "
        f"**{totals['partial_entries']}**; leaks: **{totals['leaks']}**; writes outside "
        f"roots: **{totals['writes_outside_root']}** (summed over every log line, gaps included)",
    ]
    if unreadable:
        lines.append(f"- Unreadable log lines: {unreadable}")
    if missing:
        lines.append(
            "- Matrix rows with no line in this log (not run by tests/reliability): "
            + ", ".join(str(r) for r in missing)
        )
    lines += [
        "",
        "| Row | Scenario | Runs | Failures | Bad bytes | Partial | Leaks | Outside root "
        "| Status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for sc in sorted(scenarios.values(), key=_sort_key):
        if sc.xfail:
            status = "promise not kept (strict xfail)"
        elif sc.failures or any(sc.counters.values()):
            status = "**FAILED**"
        else:
            status = "kept"
        row = "/".join(str(r) for r in sc.rows) or "-"
        name = _ROWS.sub("", sc.name, count=1).strip().replace("|", "\\|") or sc.name
        c = sc.counters
        lines.append(
            f"| {row} | {name} | {sc.runs} | {sc.failures} | {c['bad_bytes_served']} | "
            f"{c['partial_entries']} | {c['leaks']} | {c['writes_outside_root']} | {status} |"
        )
    return "\n".join(lines)


def replace_section(doc: str, body: str) -> str:
    start, end = doc.find(START), doc.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{DOC}: markers {START} ... {END} not found")
    return doc[: start + len(START)] + "\n" + body + "\n" + doc[end:]


def run_pytest(log: Path, extra: list[str], timeout: float | None) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "tests/reliability", *extra]
    env = dict(os.environ, **{ENV: str(log)})
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    timer = None
    timed_out = []
    if timeout is not None:

        def stop() -> None:
            timed_out.append(True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

        timer = threading.Timer(timeout, stop)
        timer.start()
    assert proc.stdout is not None
    last = ""
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if re.search(r"\b(passed|failed|error|xfailed|skipped)\b.* in [\d.]+s", line):
                last = line.strip().strip("=").strip()
        code = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
    if timed_out:
        last = f"stopped after {timeout:.0f} s (timeout); {last or 'no summary'}"
    return code, last, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, help="use this log; do not run pytest")
    parser.add_argument("--timeout", type=float, help="stop pytest after this many seconds")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    code, summary, seconds = 0, "", None
    if args.log is not None:
        log = args.log
        command = f"existing log {log}"
    else:
        fd, name = tempfile.mkstemp(prefix="aiolayercache-reliability-", suffix=".jsonl")
        os.close(fd)
        log = Path(name)
        command = " ".join(["pytest", "tests/reliability", *args.pytest_args])
        code, summary, seconds = run_pytest(log, args.pytest_args, args.timeout)
    scenarios, unreadable = read_log(log)
    body = render(
        scenarios, unreadable=unreadable, summary=summary, seconds=seconds, command=command
    )
    DOC.write_text(replace_section(DOC.read_text(), body))
    print(f"\nwrote the results of {len(scenarios)} scenarios from {log} into {DOC}")
    if args.log is None:
        log.unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
