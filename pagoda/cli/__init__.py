"""`pagoda <verb>`: a thin command line over the library; each verb lives in a small module.

Errors a user can fix print as one line (`error: ...`) with exit code 1; `--debug` shows the
traceback. Every verb has `--help` with an example and `--json` for scripting.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pagoda import __version__
from pagoda.errors import PagodaError

Handler = Callable[[argparse.Namespace], int | None]


def add_verb(subparsers: argparse._SubParsersAction, name: str, help: str, example: str,
             handler: Handler) -> argparse.ArgumentParser:
    """Register a verb whose --help ends with a worked example; every verb gets --json."""
    parser = subparsers.add_parser(
        name, help=help, description=help, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.set_defaults(handler=handler)
    return parser


def add_group(subparsers: argparse._SubParsersAction, name: str, help: str, description: str,
              example: str) -> argparse._SubParsersAction:
    """Register a verb made of commands (`pagoda NAME COMMAND`); alone it prints its help."""
    group = subparsers.add_parser(
        name, help=help, description=description,
        epilog=f"example:\n  {example}\nevery command takes --json (machine-readable output) "
        "and --help", formatter_class=argparse.RawDescriptionHelpFormatter)
    group.set_defaults(handler=lambda _: group.print_help() or 2, debug=False)
    return group.add_subparsers(title="commands", metavar="COMMAND")


def build_parser() -> argparse.ArgumentParser:
    """The full `pagoda` parser with every verb registered."""
    from pagoda.cli import data, finetune, generate, kb, models, pretrain, serve, tokenizer

    parser = argparse.ArgumentParser(
        prog="pagoda", description="Pagoda: the whole LLM stack in one hackable codebase.",
        epilog="example:\n  pagoda chat            # pulls SmolLM2-135M-Instruct on first use",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pagoda {__version__}")
    subparsers = parser.add_subparsers(title="verbs", metavar="VERB")
    for module in (models, generate, serve, kb, tokenizer, data, pretrain, finetune):
        module.register(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line, however many lines it was raised with."""
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pagoda` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except PagodaError as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        print(f"internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for "
              "the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
