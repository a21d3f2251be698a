"""The root `clipsearch` command: gathers each package's subcommands under one parser.

It lives in `app/` because `app` sits on top of the dependency chain (`models` <- `indexer` <-
`app`) and so may import every package's CLI; the packages below never import it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys

from pydantic import ValidationError

from app import bench, demo, lbtest, search_cli, serve
from app.errors import error_field, error_message
from indexer import cli as index_cli
from models import cli as model_cli


def _version() -> str:
    try:
        return importlib.metadata.version("clipsearch")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipsearch",
        description="CLIP-style cross-modal retrieval: train and evaluate dual encoders, search images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"clipsearch {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_cli.add_commands(subparsers)
    index_cli.add_command(subparsers)
    serve.add_command(subparsers)
    search_cli.add_command(subparsers)
    demo.add_command(subparsers)
    bench.add_command(subparsers)
    lbtest.add_command(subparsers)
    return parser


class _QuietLibraries(logging.Filter):
    """open_clip logs its progress through the root logger and transformers reports the unused
    pooler of the MiniLM checkpoint: routine at our call sites, so shown with --verbose only."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/open_clip/", "/transformers/", "/faiss/"))
        return record.levelno >= logging.ERROR or not noisy


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
        for handler in logging.getLogger().handlers:
            handler.addFilter(_QuietLibraries())
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    # The default model's text tower ships inside a Python package: never reach for a model hub
    # unless the user allowed it explicitly.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return int(args.handler(args))
    except ValidationError as exc:  # a ValueError too, but its text is four lines and a URL per field
        for error in exc.errors():
            if not error.get("loc"):  # a rule across settings: its message names them; the input holds them all
                logging.getLogger("clipsearch").error("invalid settings: %s", error_message(error))
                continue
            name = error_field(error)
            given = "(not shown)" if "key" in name else repr(error.get("input"))  # never log a secret
            logging.getLogger("clipsearch").error("invalid setting %s (a flag, or CLIPSEARCH_%s): %s, got %s",
                                                  name, name.upper(), error_message(error), given)
        return 2
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        # OSError: a path that is a file where a folder is wanted, no permission, a full disk: the
        # message says it all; --verbose keeps the traceback for a bug report
        logging.getLogger("clipsearch").error("%s", exc, exc_info=args.verbose)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
