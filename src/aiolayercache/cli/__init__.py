"""The ``aiolayercache`` command: pull images through the cache, copy them, keep the cache.

``main`` parses the arguments (``_args``) and runs a command: ``pull``
(``_pull``, reading sources with ``_sources`` and showing progress with
``_progress``), ``copy`` and ``push`` (``_copy``, the same sources into a
registry), ``cache`` (``_cache_cmd``) or ``login``/``logout`` (``_login``).
Only the parser is imported up front, so ``aiolayercache --help`` loads
argparse and the model, not aiohttp.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from ._args import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError, build_parser

if TYPE_CHECKING:
    from ._copy import CopyState
    from ._progress import Reporter
    from ._pull import DestState

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "UsageError", "main", "run"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    # The CLI's lazy imports, on purpose: the commands load the library, aiohttp and
    # rich (about three times what --help loads), so only a command that runs pays for
    # them, and each only for its own modules (--help, --version and usage errors exit
    # above).
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="aiolayercache: %(message)s",
    )
    rep: Reporter | None = None  # once a pull or copy runs
    before: DestState | None = None  # what DEST was, so an interrupt can say what it left
    copying: CopyState | None = None
    try:
        if args.command in ("login", "logout"):
            from . import _login

            code = anyio.run(_login.login if args.command == "login" else _login.logout, args)
        elif args.command == "cache" and args.fleet:  # cache ls --fleet REPO
            from . import _caches

            code = anyio.run(_caches.fleet_ls, args)
        elif args.command == "cache":
            from . import _cache_cmd

            code = anyio.run(_cache_cmd.cache_command, args)
        else:
            from .._memory_budget import tune_malloc
            from . import _progress

            tune_malloc()  # streaming 1 MiB chunks: no trim and fault again per chunk

            mode = "quiet" if args.quiet else ("rich" if sys.stderr.isatty() else "plain")
            if args.command in ("copy", "push"):
                from . import _copy

                copying = _copy.CopyState()
                rep = _progress.Reporter(mode, action="copy")
                code = anyio.run(_copy.copy, args, rep, copying)
            else:
                from . import _pull

                before = _pull.dest_state(args.dest)  # names only: cheap
                rep = _progress.Reporter(mode)
                code = anyio.run(_pull.pull, args, rep)
    except UsageError as exc:
        if rep is not None:
            rep.close()
        print(f"aiolayercache: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        if before is not None:
            from . import _pull

            what = _pull.interrupted(args.dest, before)
        elif copying is not None:
            from . import _copy

            what = _copy.interrupted(args.dest, copying)
        else:
            what = "nothing was changed"
        print(f"aiolayercache: interrupted; {what}", file=sys.stderr)
    except Exception as exc:
        if rep is not None:
            rep.close()
        if args.debug:  # every command has --debug
            raise
        print(f"aiolayercache: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    if rep is not None:
        rep.close()
        if copying is not None:
            from . import _copy

            print(_copy.summary(rep, copying))
        else:
            print(rep.summary())
    return int(code)


def run() -> None:
    try:
        code = main()
    except KeyboardInterrupt:  # before a command ran (start-up) or after it (exit)
        print("aiolayercache: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)
