"""One JSON line per reliability scenario, appended to ``$AIOLAYERCACHE_RELIABILITY_LOG``.

``record("16 wrong bytes same length", runs=3, failures=0, bad_bytes_served=0)`` appends
``{"scenario": ..., "runs": 3, "failures": 0, "bad_bytes_served": 0, "partial_entries": 0,
"leaks": 0, "writes_outside_root": 0}``: fields not given are 0 (``runs`` is 1). Write the line
from measured values *before* asserting on them, so a failing run is counted too. Does nothing
when the variable is unset. One ``write`` on an ``O_APPEND`` descriptor per line, so several
processes may share the file.
"""

from __future__ import annotations

import json
import os
from typing import Any

ENV = "AIOLAYERCACHE_RELIABILITY_LOG"
COUNTERS = ("failures", "bad_bytes_served", "partial_entries", "leaks", "writes_outside_root")


def record(scenario: str, **fields: Any) -> None:
    """Append one scenario line to the log named by ``$AIOLAYERCACHE_RELIABILITY_LOG``."""
    path = os.environ.get(ENV)
    if not path:
        return
    line: dict[str, Any] = {"scenario": scenario, "runs": 1}
    line.update({k: 0 for k in COUNTERS})
    for k, v in fields.items():
        line[k] = int(v) if isinstance(v, bool) else v
    data = (json.dumps(line, sort_keys=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
