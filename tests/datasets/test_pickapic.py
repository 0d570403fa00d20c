"""Reading Pick-a-Pic parquet: split layouts, streaming, labeled-only filtering, files that are not Pick-a-Pic's."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pickscore.datasets.pickapic import SCHEMA, PreferencePair, find_split_files, iter_pairs

READ = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "num_example_per_prompt")


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, "PNG")
    return buf.getvalue()


def row(i: int, **overrides) -> dict:
    return {
        "caption": f"prompt {i}",
        "jpg_0": png((i, 0, 0)),
        "jpg_1": png((0, i, 0)),
        "label_0": 1.0,
        "label_1": 0.0,
        "has_label": True,
        "num_example_per_prompt": 1,
        **overrides,
    }


def write(path: Path, rows: list[dict], columns=READ, row_group_size: int | None = None) -> Path:
    """``rows`` as parquet with the Pick-a-Pic types of ``columns`` only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([SCHEMA.field(c) for c in columns])
    pq.write_table(
        pa.Table.from_pylist([{c: r[c] for c in columns} for r in rows], schema=schema),
        path,
        row_group_size=row_group_size,
    )
    return path


@pytest.mark.parametrize(
    "layout",
    [
        ("{split}/part-00000.parquet", "{split}/part-00001.parquet"),
        ("{split}-00000-of-00002.parquet", "{split}-00001-of-00002.parquet"),
        ("data/{split}-00000-of-00002.parquet", "data/{split}-00001-of-00002.parquet"),  # Hugging Face
    ],
    ids=["split-directory", "flat", "hugging-face"],
)
def test_find_split_files_in_each_layout(tmp_path, layout):
    for split in ("validation", "validation_unique"):  # validation-* must not pick up validation_unique-*
        for i, name in enumerate(layout):
            write(tmp_path / name.format(split=split), [row(i, caption=f"{split} {i}")])
    files = find_split_files(tmp_path, "validation")
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [name.format(split="validation") for name in layout]
    assert [p.caption for p in iter_pairs(tmp_path, "validation")] == ["validation 0", "validation 1"]


def test_missing_split_says_where_it_looked_and_what_exists(tmp_path):
    write(tmp_path / "data" / "train-00000-of-00001.parquet", [row(0)])
    with pytest.raises(FileNotFoundError) as e:
        find_split_files(tmp_path, "valid")
    assert "valid/*.parquet" in str(e.value) and "data/valid-*.parquet" in str(e.value)
    assert "splits found there: train" in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_split_files(tmp_path / "nowhere", "train")


def test_a_file_a_directory_or_a_glob(tmp_path):
    a = write(tmp_path / "shards" / "a.parquet", [row(0)])
    b = write(tmp_path / "shards" / "b.parquet", [row(1), row(2)])
    assert find_split_files(a) == [a]
    assert find_split_files(tmp_path / "shards") == [a, b]
    assert find_split_files(str(tmp_path / "shards" / "b*.parquet")) == [b]
    assert [p.caption for p in iter_pairs(tmp_path / "shards")] == ["prompt 0", "prompt 1", "prompt 2"]
    with pytest.raises(FileNotFoundError, match="give a split"):
        find_split_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="no files match"):
        find_split_files(str(tmp_path / "*.nothing"))


def test_rows_come_in_order_across_row_groups_batches_and_files(tmp_path):
    write(tmp_path / "train" / "part-0.parquet", [row(i) for i in range(10)], row_group_size=4)
    write(tmp_path / "train" / "part-1.parquet", [row(i) for i in range(10, 13)])
    pairs = list(iter_pairs(tmp_path, "train", batch_rows=3))
    assert [p.caption for p in pairs] == [f"prompt {i}" for i in range(13)]
    assert [p.row for p in pairs] == [*range(10), *range(3)]
    assert pairs[11].origin == "part-1.parquet row 1"
    assert pairs[5] == PreferencePair("prompt 5", png((5, 0, 0)), png((0, 5, 0)), 1.0, 0.0, 1)


def test_reading_streams_one_batch_not_the_file(tmp_path):
    blob = np.random.default_rng(0).bytes(16384)  # incompressible, so the file is as big as its images
    path = write(
        tmp_path / "big.parquet", [row(i, jpg_0=blob + bytes([i % 256])) for i in range(512)], row_group_size=32
    )
    before = pa.total_allocated_bytes()
    pairs = iter_pairs(path, batch_rows=4)
    next(pairs)
    assert pa.total_allocated_bytes() - before < path.stat().st_size / 4
    assert sum(1 for _ in pairs) == 511


def test_labeled_only_drops_unjudged_rows(tmp_path):
    rows = [
        row(0),
        row(1, has_label=False),
        row(2, label_0=0.0, label_1=0.0),
        row(3, label_0=None, label_1=None),
        row(4, label_0=0.5, label_1=0.5),
        row(5, has_label=None),
    ]
    path = write(tmp_path / "test.parquet", rows)
    assert len(list(iter_pairs(path))) == 6
    assert [p.caption for p in iter_pairs(path, labeled_only=True)] == ["prompt 0", "prompt 4", "prompt 5"]


def test_optional_columns_may_be_missing(tmp_path):
    path = write(tmp_path / "minimal.parquet", [row(0), row(1, label_0=0.0)], columns=READ[:5])
    pairs = list(iter_pairs(path, labeled_only=True))
    assert [p.caption for p in pairs] == ["prompt 0"] and pairs[0].num_example_per_prompt == 1


def test_not_pick_a_pic_parquet_fails_naming_the_file(tmp_path):
    no_images = write(tmp_path / "captions.parquet", [row(0)], columns=("caption", "label_0", "label_1"))
    with pytest.raises(ValueError, match=r"captions\.parquet: missing column\(s\) jpg_0, jpg_1"):
        next(iter_pairs(no_images))
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"text\.parquet: not a readable parquet file"):
        next(iter_pairs(tmp_path / "text.parquet"))
