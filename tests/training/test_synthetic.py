"""The synthetic Pick-a-Pic generator: schema, splits, determinism, and that its labels are earned by pixels."""

from __future__ import annotations

import argparse
import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pickscore.cli import build_parser, main
from pickscore.datasets.pickapic import SCHEMA, SPLITS, iter_pairs
from pickscore.scenes import PALETTE, POSITIONS, REGIONS, Scene, render
from pickscore.training.synthetic import generators, plan_pairs, write_synthetic, write_synthetic_models

PAIRS = 400


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, pairs=PAIRS, seed=1, row_group_size=64)
    return out


@pytest.fixture(scope="module")
def plan() -> dict:
    return plan_pairs(2000, seed=0)


def test_five_splits_in_the_pick_a_pic_schema(dataset):
    for split in SPLITS:
        parquet = pq.ParquetFile(dataset / split / "part-00000.parquet")
        assert parquet.schema_arrow == SCHEMA
        assert all(parquet.metadata.row_group(g).num_rows <= 64 for g in range(parquet.num_row_groups))
    sizes = {split: pq.ParquetFile(dataset / split / "part-00000.parquet").metadata.num_rows for split in SPLITS}
    assert sizes["train"] + sizes["validation"] + sizes["test"] == PAIRS
    assert (
        0.75 <= sizes["train"] / PAIRS <= 0.85
        and pq.ParquetFile(dataset / "train" / "part-00000.parquet").num_row_groups > 1
    )
    captions = {split: [p.caption for p in iter_pairs(dataset, split)] for split in SPLITS}
    train, validation, test = (set(captions[s]) for s in ("train", "validation", "test"))
    assert train.isdisjoint(validation | test) and validation.isdisjoint(test)  # no prompt crosses splits
    for held_out in ("validation", "test"):
        unique = captions[f"{held_out}_unique"]
        assert len(unique) == len(set(unique)) and set(unique) == set(captions[held_out])


def test_an_evaluation_set_holds_out_half_the_prompts_each():
    # ~2,600 distinct captions: with the default 10% the *_unique splits hold a few hundred prompts at most,
    # too few to measure an accuracy near 90% to within a point; held_out=0.5 gives most of them.
    default, wide = plan_pairs(20000, seed=3), plan_pairs(20000, seed=3, held_out=0.5)
    assert len(default["test_unique"]) < 300
    assert len(wide["train"]) < 100 and min(len(wide["validation_unique"]), len(wide["test_unique"])) > 1000
    assert {p.prompt.caption for p in wide["validation"]}.isdisjoint(p.prompt.caption for p in wide["test"])
    assert plan_pairs(300, seed=3) == plan_pairs(300, seed=3, held_out=0.1)  # the default keeps old datasets
    for bad in (0.0, 0.6):
        with pytest.raises(ValueError, match="held_out must be in"):
            plan_pairs(100, seed=3, held_out=bad)


def test_num_example_per_prompt_is_the_real_count(dataset):
    for split in SPLITS:
        pairs = list(iter_pairs(dataset, split))
        counts = Counter(p.caption for p in pairs)
        assert [p.num_example_per_prompt for p in pairs] == [counts[p.caption] for p in pairs]
    assert max(Counter(p.caption for p in iter_pairs(dataset, "train")).values()) > 1  # prompts are shared


def test_other_columns_are_plausible(dataset):
    table = pq.read_table(
        dataset / "validation" / "part-00000.parquet",
        columns=["label_0", "best_image_uid", "image_0_uid", "image_1_uid", "model_0", "has_label"],
    ).to_pylist()
    for r in table:
        best = {1.0: r["image_0_uid"], 0.0: r["image_1_uid"], 0.5: None}[r["label_0"]]
        assert r["best_image_uid"] == best and r["has_label"] and r["model_0"].startswith("synthetic-")
    assert len({r["image_0_uid"] for r in table} | {r["image_1_uid"] for r in table}) == 2 * len(table)


def test_same_seed_same_bytes(tmp_path):
    a = write_synthetic(tmp_path / "a", pairs=60, seed=5)
    b = write_synthetic(tmp_path / "b", pairs=60, seed=5)
    c = write_synthetic(tmp_path / "c", pairs=60, seed=6)
    assert all(a[s].read_bytes() == b[s].read_bytes() for s in SPLITS)
    assert a["train"].read_bytes() != c["train"].read_bytes()


def test_about_one_pair_in_ten_is_a_tie(plan):
    rows = [row for split in ("train", "validation", "test") for row in plan[split]]
    assert len(rows) == 2000
    assert 0.08 <= sum(row.label_0 == 0.5 for row in rows) / len(rows) <= 0.12


def test_preferred_image_keeps_more_of_its_prompt(plan):
    sides = Counter()
    for row in (row for rows in plan.values() for row in rows):
        kept_0, kept_1 = row.prompt.matches(row.scene_0), row.prompt.matches(row.scene_1)
        assert {(1.0, 0.0): kept_0 > kept_1, (0.0, 1.0): kept_1 > kept_0, (0.5, 0.5): kept_0 == kept_1}[
            row.label_0, row.label_1
        ]
        assert row.scene_0.colour != row.scene_0.background and row.scene_1.colour != row.scene_1.background
        sides[row.label_0] += 1
    assert sides[1.0] > 0.4 * sides[0.0] and sides[0.0] > 0.4 * sides[1.0]  # the preferred side is random


def _parse(caption: str) -> tuple[str, str, str]:
    """(colour, position, background) as written in a caption: "two red circles on the left, blue background"."""
    scene, background = caption.rsplit(", ", 1)
    words = scene.split()
    return words[1], {v: k for k, v in POSITIONS.items()}[" ".join(words[3:])], background.removesuffix(" background")


def _kept(caption: str, data: bytes) -> int:
    """How many of colour, position and background the pixels show as the caption says."""
    colour, position, background = _parse(caption)
    x = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # (H, W, 3)
    shapes = np.any(x != x[0, 0], axis=-1)  # the (0, 0) corner always shows the background
    values, counts = np.unique(x[shapes], axis=0, return_counts=True)
    ys, xs = np.nonzero(shapes)
    x0, y0, x1, y1 = REGIONS[position]
    return (
        int(tuple(values[counts.argmax()]) == PALETTE[colour])
        + int(tuple(x[0, 0]) == PALETTE[background])
        + int(x0 <= xs.mean() / x.shape[1] <= x1 and y0 <= ys.mean() / x.shape[0] <= y1)
    )


def test_pixels_of_the_preferred_image_match_its_caption_more_often(dataset):
    better = same = worse = 0
    for pair in iter_pairs(dataset, "train"):
        if pair.label_0 == pair.label_1:  # a tie
            continue
        kept_0, kept_1 = _kept(pair.caption, pair.image_0), _kept(pair.caption, pair.image_1)
        preferred, other = (kept_0, kept_1) if pair.label_0 > pair.label_1 else (kept_1, kept_0)
        better, same, worse = better + (preferred > other), same + (preferred == other), worse + (preferred < other)
    # Worse happens only where the preferred image lost a measured attribute and the other lost unmeasured ones.
    assert better > 2 * same and better > 20 * worse


def test_render_draws_the_scene():
    scene = Scene(count=3, colour="red", shape="star", position="bottom", background="blue")
    x = np.asarray(render(scene, 96, random.Random(0)))  # (96, 96, 3)
    red = np.all(x == PALETTE["red"], axis=-1)
    assert (x[~red] == PALETTE["blue"]).all() and red.sum() > 50
    assert red[: 96 // 2].sum() == 0  # nothing in the top half
    assert scene.caption == "three red stars at the bottom, blue background"


def test_position_can_be_read_from_the_pixels():
    """Wherever the jitter puts them, the shapes' centre is nearest the centre of the captioned region."""
    centres = {p: ((x0 + x1) / 2, (y0 + y1) / 2) for p, (x0, y0, x1, y1) in REGIONS.items()}
    rng = random.Random(3)
    for position in POSITIONS:
        for count in (1, 2, 3):
            for _ in range(30):
                scene = Scene(
                    count=count,
                    colour="red",
                    shape=rng.choice(("circle", "star")),
                    position=position,
                    background="blue",
                )
                ys, xs = np.nonzero(np.all(np.asarray(render(scene, 64, rng)) == PALETTE["red"], axis=-1))
                cx, cy = xs.mean() / 64, ys.mean() / 64
                nearest = min(centres, key=lambda p: (centres[p][0] - cx) ** 2 + (centres[p][1] - cy) ** 2)
                assert nearest == position, f"{scene.caption}: shapes centred at ({cx:.2f}, {cy:.2f})"


def test_cli_writes_the_dataset(tmp_path, capsys):
    assert (
        main(
            ["data", "synthetic", "--out", str(tmp_path / "cli"), "--pairs", "30", "--seed", "4", "--image-size", "32"]
        )
        == 0
    )
    assert "wrote 5 splits" in capsys.readouterr().err
    direct = write_synthetic(tmp_path / "direct", pairs=30, seed=4, image_size=32)
    assert all((tmp_path / "cli" / s / "part-00000.parquet").read_bytes() == direct[s].read_bytes() for s in SPLITS)
    image = next(iter_pairs(tmp_path / "cli", "train")).image_0
    assert Image.open(io.BytesIO(image)).size == (32, 32)
    assert (
        main(
            ["data", "synthetic", "--out", str(tmp_path / "wide"), "--pairs", "30", "--seed", "4", "--held-out", "0.5"]
        )
        == 0
    )
    wide = write_synthetic(tmp_path / "wide-direct", pairs=30, seed=4, held_out=0.5)
    assert all((tmp_path / "wide" / s / "part-00000.parquet").read_bytes() == wide[s].read_bytes() for s in SPLITS)
    assert wide["train"].read_bytes() != direct["train"].read_bytes()


def test_cli_help_documents_every_flag(capsys):
    data = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["data"]
    synthetic = next(a for a in data._actions if isinstance(a, argparse._SubParsersAction)).choices["synthetic"]
    flags = [a for a in synthetic._actions if a.option_strings and a.dest != "help"]
    assert {a.option_strings[0] for a in flags} == {
        "--out",
        "--pairs",
        "--models",
        "--seed",
        "--image-size",
        "--row-group-size",
        "--held-out",
        "--prompts",
        "--images-per-prompt",
    }
    assert all(a.help for a in flags)
    with pytest.raises(SystemExit) as e:
        main(["data", "synthetic", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(a.option_strings[0] in out for a in flags)
    with pytest.raises(SystemExit) as e:
        main(["data", "synthetic", "--out", "x", "--pairs", "0"])
    assert e.value.code == 2 and "--pairs: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["data", "synthetic", "--out", "x", "--pairs", "5", "--held-out", "0.7"])
    assert e.value.code == 2 and "--held-out: must be in (0, 0.5]" in capsys.readouterr().err
    usage = {
        ("--pairs", "5", "--models", "2"): "argument --models: not allowed with argument --pairs",
        ("--seed", "1"): "one of the arguments --pairs --models is required",
        ("--models", "6"): "--models: must be 1 to 5",
        ("--models", "2", "--held-out", "0.2"): "--held-out and --row-group-size write preference pairs",
        ("--pairs", "5", "--prompts", "3"): "--prompts and --images-per-prompt write models' images",
        ("--models", "2", "--prompts", "1001"): "--prompts: must be at most 1000",
    }
    for argv, message in usage.items():
        with pytest.raises(SystemExit) as e:
            main(["data", "synthetic", "--out", "x", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_models_layout_same_seed_same_files(tmp_path, capsys):
    argv = ["data", "synthetic", "--models", "2", "--prompts", "3", "--images-per-prompt", "2", "--image-size", "32"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert main([*argv, "--out", str(tmp_path / name), "--seed", seed]) == 0
    assert "wrote generator-good, generator-poor (best first), 3 prompts" in capsys.readouterr().err
    files = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*") if p.is_file())
    images = [f"generator-{g}/{i}/{k}.png" for g in ("good", "poor") for i in range(3) for k in range(2)]
    assert files == sorted(["prompts.txt", "models.json", *images])
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / "prompts.txt").read_bytes() != (tmp_path / "c" / "prompts.txt").read_bytes()
    assert len(set((tmp_path / "a" / "prompts.txt").read_text().splitlines())) == 3  # distinct prompts
    with Image.open(tmp_path / "a" / images[0]) as image:
        assert image.size == (32, 32)
    listed = json.loads((tmp_path / "a" / "models.json").read_text())["best_first"]
    assert [m["name"] for m in listed] == ["generator-good", "generator-poor"]


def test_better_generators_draw_more_of_their_prompt(tmp_path):
    """Generators are named best first and change each attribute with a rising probability; the pixels agree."""
    gens = generators(3)
    assert [g.name for g in gens] == ["generator-good", "generator-fair", "generator-poor"]
    assert [g.expected_kept for g in gens] == pytest.approx([4.75, 3.25, 1.75])
    assert [g.name for g in generators(5)][0] == "generator-excellent"
    write_synthetic_models(tmp_path, models=3, prompts=30, images_per_prompt=3, seed=2)
    captions = (tmp_path / "prompts.txt").read_text().splitlines()
    kept = {
        g.name: np.mean(
            [_kept(c, f.read_bytes()) for i, c in enumerate(captions) for f in (tmp_path / g.name / str(i)).iterdir()]
        )
        for g in gens
    }  # of colour, position and background: 3 when the image shows what its prompt says
    assert kept["generator-good"] > 2.7 and kept["generator-good"] > kept["generator-fair"] + 0.3
    assert kept["generator-fair"] > kept["generator-poor"] + 0.3
    with pytest.raises(ValueError, match="models must be 1 to 5"):
        generators(6)
