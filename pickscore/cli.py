"""The ``pickscore`` command: each subpackage owns its subcommands; this module only assembles them.

    pickscore score|rank (--model REF | --server HOST:PORT [--model-name NAME]) --prompt TEXT [--json] IMAGE_OR_DIR...
    pickscore convert --model REF --out DIR
    pickscore data synthetic --out DIR --pairs N [--seed S] [--image-size PX] [--held-out F]
    pickscore train --data DIR --out DIR [--model REF] [--preset NAME] [--init-only] [settings]
    pickscore eval --model REF [--model REF...] --data DIR [--baseline REF...] [--backend B] [--json]
    pickscore export onnx|tensorrt|triton --model REF ...
    pickscore serve [--model [NAME=]REF... | --model-repository DIR] [--port 8001] [--http-port 8000] [settings]
    pickscore health [--server HOST:PORT]
    pickscore batch --input PATH... --output DIR (--model REF | --server ADDR[,ADDR...] [--model-name NAME]) [--resume]
    pickscore compare-selectors --prompts FILE --images PATH... --selector NAME=REF... (--judge REF | --judge-choices P)
    pickscore evaluate-models --prompts FILE --images NAME=PATH... (--model REF | --server HOST:PORT [--model-name N])
    pickscore collect [--db URL] [--candidates synthetic|pool:PATH|http://...] [--port 8080]
    pickscore collect export --db URL --out DIR
    pickscore collect invite --db URL [--count N]

Exit status: 0 on success, 1 when the model, an input or a setting was bad (the message names it), 2 on usage
errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pickscore import commands
from pickscore.collect import commands as collect_commands
from pickscore.errors import PickScoreError
from pickscore.exporter import commands as exporter_commands
from pickscore.extras import missing_extra
from pickscore.jobs import commands as jobs_commands
from pickscore.server import commands as server_commands
from pickscore.training import commands as training_commands
from pickscore.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pickscore",
        description="Score and rank text-to-image generations by predicted human preference (PickScore).",
    )
    parser.add_argument("--version", action="version", version=f"pickscore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parsers(sub)
    training_commands.add_parsers(sub)
    exporter_commands.add_parsers(sub)
    server_commands.add_parsers(sub)
    jobs_commands.add_parsers(sub)
    collect_commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (PickScoreError, OSError, ValueError) as e:  # bad model, input, data or settings: say which, exit 1
        print(f"pickscore: error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:  # an optional part not installed: name the extra that installs it
        message = missing_extra(e)
        if message is None:
            raise
        print(f"pickscore {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
