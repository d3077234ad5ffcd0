"""What the benchmarks share."""

from __future__ import annotations

import os


def filesystem_of(path: str) -> str:
    """The mount point and type of the filesystem holding ``path`` (Linux), or ``?``."""
    real = os.path.realpath(path)
    best = ("", "?")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best[0]):
                    best = (mnt, parts[2])
    except OSError:
        pass
    return f"{best[1]} mounted on {best[0] or '?'}"
