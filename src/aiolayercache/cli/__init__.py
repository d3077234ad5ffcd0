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

import anyio

from ._args import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError, build_parser

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
    # The one lazy import in the CLI, on purpose: the commands load the library,
    # aiohttp and rich (about three times what --help loads), so only a command
    # that runs pays for them; --help, --version and usage errors exit above.
    from . import _cache_cmd, _caches, _copy, _login, _progress, _pull

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="aiolayercache: %(message)s",
    )
    rep: _progress.Reporter | None = None
    # What DEST was, so an interrupt can say truly what it left (names only: cheap).
    before = _pull.dest_state(args.dest) if args.command == "pull" else None
    copying = _copy.CopyState() if args.command in ("copy", "push") else None
    try:
        if args.command in ("login", "logout"):
            code = anyio.run(_login.login if args.command == "login" else _login.logout, args)
        elif args.command == "cache" and args.fleet:  # cache ls --fleet REPO
            code = anyio.run(_caches.fleet_ls, args)
        elif args.command == "cache":
            code = anyio.run(_cache_cmd.cache_command, args)
        else:
            mode = "quiet" if args.quiet else ("rich" if sys.stderr.isatty() else "plain")
            if copying is not None:
                rep = _progress.Reporter(mode, action="copy")
                code = anyio.run(_copy.copy, args, rep, copying)
            else:
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
            what = _pull.interrupted(args.dest, before)
        elif copying is not None:
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
        print(_copy.summary(rep, copying) if copying is not None else rep.summary())
    return int(code)


def run() -> None:
    sys.exit(main())
