"""The settings of ``pickscore collect``, apart from the app so that its parser loads no web or database code."""

from __future__ import annotations

from dataclasses import dataclass

from pickscore.flags import option


@dataclass(frozen=True)
class CollectSettings:
    """Every knob of ``pickscore collect`` (its flags)."""

    db: str = option("collect.db", "database URL (sqlite:///FILE, postgresql+psycopg://USER@HOST/DB) or a file path")
    candidates: str = option(
        "synthetic",
        "where candidate images come from: synthetic (drawn scenes, the demo), pool:PATH[,PATH...] (Parquet, a "
        "directory with manifest.jsonl, or WebDataset shards: prompt, image, model; or a directory with "
        "prompts.txt and <model>/<prompt index>/ image folders, as `pickscore data synthetic --models` writes), or "
        "an http(s):// text-to-image backend (contract in pickscore/collect/sources.py)",
    )
    host: str = option("127.0.0.1", "address to bind (0.0.0.0 to accept other machines)")
    port: int = option(8080, "HTTP port; 0 picks a free one")
    invited_only: bool = option(
        False, "sign-in needs an invitation token (`pickscore collect invite`); otherwise a name is enough"
    )
    admins: str = option("", "comma-separated names allowed on /admin; empty: everyone signed in")
    consent_file: str = option("", "a text file with the consent notice shown before sign-in (default: a generic one)")
    order_server: str = option(
        "",
        "HOST:PORT of a served PickScore (`pickscore serve`, gRPC): draw --order-pool candidates and show the "
        "two it scores closest (harder pairs); recorded with each pair",
    )
    order_pool: int = option(4, "candidates drawn per pair when --order-server is set")
    image_size: int = option(256, "side of the synthetic source's images, in pixels")
    seed: int = option(-1, "seed of the sources' random draws (-1: fresh each start)")
    title: str = option("Which image is better?", "heading of the pages")
