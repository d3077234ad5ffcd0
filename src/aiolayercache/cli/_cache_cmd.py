"""The cache directory, and ``aiolayercache cache ls|du|verify|prune|rm``."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import Hash, InvalidDigestError, LayerNotFoundError
from ..cache import FilesystemCache
from ._args import EXIT_FAILED, EXIT_OK, UsageError, human

__all__ = ["cache_command", "default_cache_dir"]


def default_cache_dir() -> str:
    env = os.environ.get("AIOLAYERCACHE_CACHE_DIR")
    if env:
        return env
    import platformdirs  # (only when no directory is given: start-up is cheaper without)

    return platformdirs.user_cache_dir("aiolayercache")


async def cache_command(args: argparse.Namespace) -> int:
    fs = FilesystemCache(args.cache_dir or default_cache_dir())
    action = args.cache_command
    if action == "ls":
        for e in await fs.entries():
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
            print(f"{e.digest}  {e.size:>12}  {used}  {e.kind}")
    elif action == "du":
        es = await fs.entries()
        total = sum(e.size for e in es)
        print(f"{total}\t{human(total)}\t{len(es)} entries\t{fs.path}")
    elif action == "verify":
        report = await fs.verify()
        for h in report.removed:
            print(f"removed {h}: {report.reasons.get(h, 'its bytes do not match its name')}")
        print(
            f"{report.ok} entries verified, {len(report.removed)} removed, "
            f"{report.temps_removed} stale temp files removed"
        )
    elif action == "prune":
        if args.max_size is None and args.older_than is None:
            raise UsageError("prune needs --max-size and/or --older-than")
        removed = await fs.prune(max_bytes=args.max_size, older_than=args.older_than)
        for e in removed:
            print(f"removed {e.digest} ({human(e.size)})")
        freed = sum(e.size for e in removed if e.links <= 1)
        held = sum(e.size for e in removed if e.links > 1)
        also = f" ({human(held)} more still held by layouts that link them)" if held else ""
        print(f"{len(removed)} entries removed, {human(freed)} freed{also}")
    elif action == "rm":
        try:
            h = Hash.parse(args.digest)
        except InvalidDigestError as exc:
            raise UsageError(str(exc)) from None
        try:
            await fs.delete(h)
        except LayerNotFoundError as exc:
            print(f"aiolayercache: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"removed {h}")
    else:
        raise UsageError("cache needs an action: ls, du, verify, prune or rm")
    return EXIT_OK
