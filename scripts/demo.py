"""The main job, end to end: a loopback registry, a generated image, two pulls through a cache.

Run with ``make demo``. Starts Debian's docker-registry on a free loopback
port with temp storage, publishes a generated 4-layer image (incompressible
data), pulls it twice with ``aiolayercache pull`` through one fresh cache
(cold, then warm into a new destination), prints both summaries and stops
the registry.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiolayercache import random
from tests.registry import push_image, start_registry

LAYERS, LAYER_MIB = 4, 16


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="aiolayercache-demo-") as tmp:
        work = Path(tmp)
        print(f"starting docker-registry on loopback (storage in {work / 'data'}) ...")
        reg = start_registry(work / "registry", work / "data")
        try:
            img = random.image(LAYER_MIB * 1024 * 1024, LAYERS)
            ref = f"{reg.host}/demo/app:v1"
            digest = asyncio.run(push_image(reg.host, "demo/app", "v1", img))
            print(f"published {ref} ({LAYERS} x {LAYER_MIB} MiB layers, {digest})\n")
            cache_dir = work / "cache"
            for run, dest in (("cold", "pull-1"), ("warm", "pull-2")):
                print(f"--- {run}: aiolayercache pull {ref} {dest} --cache-dir {cache_dir.name}")
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "aiolayercache",
                        "pull",
                        ref,
                        str(work / dest),
                        "--cache-dir",
                        str(cache_dir),
                    ],
                    check=False,
                )
                if out.returncode != 0:
                    return out.returncode
                print()
            cli = [sys.executable, "-m", "aiolayercache"]
            subprocess.run([*cli, "cache", "--cache-dir", str(cache_dir), "du"], check=True)
        finally:
            reg.stop()
            print("registry stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
