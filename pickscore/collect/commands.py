"""``pickscore collect``: run the collection app; ``collect export`` and ``collect invite`` work on its database."""

from __future__ import annotations

import argparse
import asyncio
import logging

from pickscore.collect.settings import CollectSettings
from pickscore.flags import add_flags, given

DB_HELP = "the app's database URL (sqlite:///FILE, postgresql+psycopg://USER@HOST/DB) or a SQLite file path"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "collect",
        help="a web app where people choose the better of two images for their prompt (Pick-a-Pic's loop)",
        description="Serve the preference-collection web app: people sign in, agree to the consent notice, write "
        "a prompt and choose the better of two candidates (left, right or tie; arrow keys work); the rejected "
        "image is replaced and they choose again. Every choice goes to the database with both images, their "
        "models and provenance. `pickscore collect export` turns it into a dataset for `pickscore train`; "
        "/admin shows counts, choices per hour, tie rate, win rates by model and agreement between users.",
    )
    add_flags(p, CollectSettings)
    p.set_defaults(func=_cmd_collect)
    commands = p.add_subparsers(dest="collect_command", metavar="{export,invite}")

    e = commands.add_parser(
        "export",
        help="write the choices as a Pick-a-Pic dataset (train/validation/test and *_unique) with an agreement report",
        description="Write OUT/<split>/part-00000.parquet in the Pick-a-Pic layout that `pickscore train` and "
        "`pickscore eval` read (splits by prompt; ties 0.5/0.5; num_example_per_prompt), OUT/agreement.json (how "
        "often two users agree on the same pair, overall and per user) and OUT/export.json (rows per split).",
    )
    e.add_argument("--db", required=True, help=DB_HELP)
    e.add_argument("--out", required=True, metavar="DIR", help="output directory")
    e.add_argument("--validation", type=float, default=0.1, metavar="F", help="fraction of prompts for validation")
    e.add_argument("--test", type=float, default=0.1, metavar="F", help="fraction of prompts for test")
    e.add_argument("--seed", type=int, default=0, help="salt of the prompt hash that assigns splits")
    e.set_defaults(func=_cmd_export)

    i = commands.add_parser(
        "invite",
        help="make invitation tokens for an app started with --invited-only",
        description="Print COUNT new invitation tokens, one a line; each lets one person sign in under a name "
        "of their choosing (the name is bound to the token at first sign-in).",
    )
    i.add_argument("--db", required=True, help=DB_HELP)
    i.add_argument("--count", type=int, default=1, help="how many tokens")
    i.add_argument("--note", default="", help="kept with each token (whom it is for)")
    i.set_defaults(func=_cmd_invite)


def _cmd_collect(args: argparse.Namespace) -> int:
    from pickscore.collect.app import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    asyncio.run(serve(CollectSettings(**given(args, CollectSettings))))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pickscore.collect.export import export, markdown
    from pickscore.collect.store import Store

    store = Store(args.db, create=False)  # a mistyped --db must not export an empty database made on the spot
    try:
        manifest = export(store, args.out, args.validation, args.test, args.seed, progress=True)
        agreed = json.loads((Path(args.out) / "agreement.json").read_text())
        print(markdown(manifest, agreed, store.user_names()))
        print(f"wrote {args.out}")
    finally:
        store.close()
    return 0


def _cmd_invite(args: argparse.Namespace) -> int:
    from pickscore.collect.store import Store

    store = Store(args.db)
    try:
        for _ in range(args.count):
            print(store.invite(args.note))
    finally:
        store.close()
    return 0
