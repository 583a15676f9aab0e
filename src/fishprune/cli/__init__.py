"""The ``fishprune`` command line: one small module per command, listed in :data:`COMMANDS`.

Every setting of :class:`fishprune.config.RunConfig` (and every criterion option) is a flag of
``run`` and ``analyze`` (:mod:`fishprune.cli.flags`). Errors print one line (``--debug``, before
or after the command, shows the traceback) and exit with status 2 for usage errors, 1 for
failures.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from fishprune._version import __version__
from fishprune.cli import analyze, export, listing, report, run, sweep, verify
from fishprune.cli.flags import Parser, UsageError
from fishprune.config import ConfigError

#: Subcommand → its module (``add(subparsers, parents)`` and ``main(args) -> int``), in the
#: order ``fishprune --help`` lists them.
COMMANDS: dict[str, ModuleType] = {
    "run": run,
    "analyze": analyze,
    "sweep": sweep,
    "report": report,
    "export": export,
    "verify": verify,
    "criteria": listing,
    "models": listing,
    "datasets": listing,
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    parser = Parser(prog="fishprune", parents=[common],
                    description="Pruning at initialization, done right.")
    parser.add_argument("--version", action="version", version=f"fishprune {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add(sub, name, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FISHPRUNE_DEBUG") == "1"
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "command", None) is None:
            parser.print_help()
            return 0 if not [a for a in argv if a != "--debug"] else 2
        return COMMANDS[args.command].main(args)
    except (UsageError, ConfigError) as err:
        if debug:
            raise
        print(f"fishprune: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fishprune criteria | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("fishprune: interrupted (finished epochs are saved; rerun to resume)",
              file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; --debug shows the traceback
        if debug:
            raise
        print(f"fishprune: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
