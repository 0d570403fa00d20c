"""Synthetic Pick-a-Pic: procedurally drawn scenes whose preferred image is known.

    write_synthetic("data/synthetic", pairs=2000, seed=0)  # DIR/<split>/part-00000.parquet, five splits
    write_synthetic_models("gens", models=3, prompts=40, images_per_prompt=4, seed=0)  # fake generators

A prompt describes a scene (``pickscore.scenes``: "two red circles on the left, blue background"). Each image of a pair
draws that scene with some of its five attributes changed; the image that keeps more of them is
preferred (1.0 against 0.0, on a random side), and about 10% of pairs are ties (both keep equally
many, 0.5/0.5). A model can learn the preference from pixels, and tests know the right answer.
Same seed, byte-identical files.

``write_synthetic_models`` writes what ``pickscore evaluate-models`` reads instead: prompts and, per fake
text-to-image generator, several images per prompt. Generators differ only in how many of the prompt's five
attributes an image keeps (each is changed with the generator's own probability), so their true ranking is known.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pickscore.datasets.pickapic import SCHEMA, SPLITS
from pickscore.scenes import ATTRIBUTES, Scene, random_scene, render, vary
from pickscore.training.dials import BEST_CHANGE, GENERATOR_NAMES, HELD_OUT_FRACTION, MAX_MODEL_PROMPTS, WORST_CHANGE

MODELS = ("synthetic-a", "synthetic-b", "synthetic-c")
TIE_FRACTION = 0.1
PAIRS_PER_PROMPT = (1, 2, 3, 4)
START = datetime(2023, 4, 1)


@dataclass(frozen=True)
class SyntheticPair:
    """One planned row: the prompt's scene, what each image draws, the labels, and a seed for the rest."""

    prompt: Scene
    scene_0: Scene
    scene_1: Scene
    label_0: float
    label_1: float
    seed: int  # drives drawing jitter and the metadata columns, so one row renders the same on its own


def plan_pairs(pairs: int, seed: int, held_out: float = HELD_OUT_FRACTION) -> dict[str, list[SyntheticPair]]:
    """Split name -> its rows, in file order. Prompts never cross splits; ``*_unique`` keep one row per prompt.

    ``held_out`` is the fraction of rows for each of validation and test. There are only ~2,600 distinct
    captions, so with many pairs per prompt the ``*_unique`` splits hold about ``held_out`` of those
    captions: an evaluation-only set asks for 0.5 to get ~1,300 prompts in each.
    """
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, got {pairs}")
    if not 0 < held_out <= 0.5:
        raise ValueError(f"held_out must be in (0, 0.5], got {held_out}")
    rng = random.Random(seed)
    by_caption: dict[str, list[SyntheticPair]] = {}
    planned = 0
    while planned < pairs:
        prompt = random_scene(rng)
        group = [_plan_pair(prompt, rng) for _ in range(min(rng.choice(PAIRS_PER_PROMPT), pairs - planned))]
        by_caption.setdefault(prompt.caption, []).extend(group)  # a caption drawn twice stays one prompt
        planned += len(group)
    held_out_rows = round(pairs * held_out)
    groups = iter(by_caption.values())
    splits = {"validation": _take(groups, held_out_rows), "test": _take(groups, held_out_rows)}
    splits["train"] = [row for group in groups for row in group]
    for rows in splits.values():
        rng.shuffle(rows)  # so a reader that streams without shuffling still sees mixed prompts
    for name in ("validation", "test"):
        splits[f"{name}_unique"] = _first_per_prompt(splits[name])
    return {name: splits[name] for name in SPLITS}


def write_synthetic(
    out_dir: str | os.PathLike,
    pairs: int,
    seed: int,
    image_size: int = 64,
    row_group_size: int = 256,
    held_out: float = HELD_OUT_FRACTION,
    progress: bool = False,
) -> dict[str, Path]:
    """Write ``out_dir/<split>/part-00000.parquet`` for the five splits, in the Pick-a-Pic schema.

    ``pairs`` rows go to train/validation/test (80/10/10 by prompt with the default ``held_out``); the
    ``*_unique`` splits add one row per prompt of validation/test. Images are PNG. Returns split name ->
    file written.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    plan = plan_pairs(pairs, seed, held_out)
    written = {}
    with tqdm(total=sum(map(len, plan.values())), unit="pair", disable=not progress or None, file=sys.stderr) as bar:
        for split, rows in plan.items():
            written[split] = _write_split(
                Path(out_dir) / split / "part-00000.parquet", rows, image_size, row_group_size, bar
            )
    return written


def _plan_pair(prompt: Scene, rng: random.Random) -> SyntheticPair:
    if rng.random() < TIE_FRACTION:
        changes = rng.choice((0, 1, 2))
        scene_0, scene_1 = vary(prompt, changes, rng), vary(prompt, changes, rng)
        return SyntheticPair(prompt, scene_0, scene_1, 0.5, 0.5, rng.getrandbits(64))
    better = rng.choice((0, 1))
    preferred, other = vary(prompt, better, rng), vary(prompt, rng.randint(better + 1, 3), rng)
    if rng.random() < 0.5:
        return SyntheticPair(prompt, preferred, other, 1.0, 0.0, rng.getrandbits(64))
    return SyntheticPair(prompt, other, preferred, 0.0, 1.0, rng.getrandbits(64))


def _take(groups: Iterator[list[SyntheticPair]], rows: int) -> list[SyntheticPair]:
    """Whole prompt groups from ``groups`` until at least ``rows`` rows are taken."""
    taken: list[SyntheticPair] = []
    while len(taken) < rows and (group := next(groups, None)) is not None:
        taken.extend(group)
    return taken


def _first_per_prompt(rows: list[SyntheticPair]) -> list[SyntheticPair]:
    first: dict[str, SyntheticPair] = {}
    for row in rows:
        first.setdefault(row.prompt.caption, row)
    return list(first.values())


def _write_split(path: Path, rows: list[SyntheticPair], image_size: int, row_group_size: int, bar: tqdm) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    per_prompt = Counter(row.prompt.caption for row in rows)
    with pq.ParquetWriter(path, SCHEMA) as writer:
        if not rows:
            writer.write_table(SCHEMA.empty_table())  # a split too small to fill still gets a readable file
        for start in range(0, len(rows), row_group_size):
            chunk = [_columns(row, image_size, per_prompt) for row in rows[start : start + row_group_size]]
            writer.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), row_group_size=row_group_size)
            bar.update(len(chunk))
    return path


def _columns(row: SyntheticPair, image_size: int, per_prompt: Counter[str]) -> dict[str, Any]:
    """One parquet row; everything random comes from the row's own seed."""
    rng = random.Random(row.seed)
    uid_0, uid_1 = (str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2))
    best = {(1.0, 0.0): uid_0, (0.0, 1.0): uid_1}.get((row.label_0, row.label_1))  # null for a tie
    return {
        "caption": row.prompt.caption,
        "jpg_0": png(render(row.scene_0, image_size, rng)),
        "jpg_1": png(render(row.scene_1, image_size, rng)),
        "label_0": row.label_0,
        "label_1": row.label_1,
        "has_label": True,
        "are_different": True,
        "num_example_per_prompt": per_prompt[row.prompt.caption],
        "model_0": rng.choice(MODELS),
        "model_1": rng.choice(MODELS),
        "best_image_uid": best,
        "image_0_uid": uid_0,
        "image_1_uid": uid_1,
        "user_id": rng.randrange(1, 10_000),
        "ranking_id": rng.getrandbits(48),
        "created_at": START + timedelta(seconds=rng.randrange(90 * 24 * 3600)),
    }


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Flat colours compress well at any level; level 1 encodes ~2x faster than the default 6.
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@dataclass(frozen=True)
class Generator:
    """A fake text-to-image model: its name and the probability it changes each of a prompt's five attributes."""

    name: str
    change: float

    @property
    def expected_kept(self) -> float:
        return len(ATTRIBUTES) * (1 - self.change)


def generators(models: int) -> list[Generator]:
    """``models`` fake generators, best first (generator-good keeps the most of its prompt)."""
    if models not in GENERATOR_NAMES:
        raise ValueError(f"models must be 1 to {max(GENERATOR_NAMES)}, got {models}")
    step = (WORST_CHANGE - BEST_CHANGE) / max(models - 1, 1)
    return [
        Generator(f"generator-{name}", round(BEST_CHANGE + i * step, 4))
        for i, name in enumerate(GENERATOR_NAMES[models])
    ]


def write_synthetic_models(
    out_dir: str | os.PathLike,
    models: int,
    prompts: int,
    images_per_prompt: int,
    seed: int,
    image_size: int = 64,
    progress: bool = False,
) -> list[Generator]:
    """Write ``out_dir/prompts.txt`` and ``out_dir/<generator>/<prompt index>/<k>.png``; return the generators.

    ``prompts`` distinct captions, one a line; every generator draws ``images_per_prompt`` images of each, each
    image keeping every attribute of the prompt's scene with probability ``1 - change`` (so the best generator
    draws the scene exactly or nearly, the worst changes most of it). Also ``out_dir/models.json``: the
    generators best first with their expected attributes kept. Same seed, byte-identical files.
    """
    if not 1 <= prompts <= MAX_MODEL_PROMPTS:
        raise ValueError(f"prompts must be 1 to {MAX_MODEL_PROMPTS}, got {prompts}")
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be at least 1, got {images_per_prompt}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    gens = generators(models)
    rng = random.Random(seed)
    scenes: dict[str, Scene] = {}
    while len(scenes) < prompts:
        scene = random_scene(rng)
        scenes.setdefault(scene.caption, scene)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text("".join(f"{caption}\n" for caption in scenes))
    # One seed per (generator, prompt): a generator's images do not depend on how many others are drawn.
    seeds = [[rng.getrandbits(64) for _ in scenes] for _ in gens]
    total = len(gens) * prompts * images_per_prompt
    with tqdm(total=total, unit="img", disable=not progress or None, file=sys.stderr) as bar:
        for gen, gen_seeds in zip(gens, seeds):
            for index, (scene, image_seed) in enumerate(zip(scenes.values(), gen_seeds)):
                folder = out / gen.name / str(index)
                folder.mkdir(parents=True, exist_ok=True)
                image_rng = random.Random(image_seed)
                for k in range(images_per_prompt):
                    changes = sum(image_rng.random() < gen.change for _ in ATTRIBUTES)
                    drawn = vary(scene, changes, image_rng)
                    (folder / f"{k}.png").write_bytes(png(render(drawn, image_size, image_rng)))
                    bar.update(1)
    summary = [{"name": g.name, "change": g.change, "expected_attributes_kept": g.expected_kept} for g in gens]
    (out / "models.json").write_text(json.dumps({"best_first": summary}, indent=2, allow_nan=False) + "\n")
    return gens
