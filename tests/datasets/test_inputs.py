"""A batch job's inputs read directly: every format's rows, numbered in the job's order, with their groups, ids,
places and unusable rows; the counts known without reading the images."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pickscore.datasets.inputs import count_rows, input_files, read_rows
from pickscore.errors import InvalidInput


def test_every_format_in_order(tmp_path):
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"prompt": "a", "image": b"x", "group": "g", "id": 7},
                {"prompt": "", "image": b"y", "group": None, "id": None},
            ]
        ),
        tmp_path / "a.parquet",
    )
    pair = {"caption": "c", "jpg_0": b"0", "jpg_1": b"1", "ranking_id": 5, "model_0": "m0", "model_1": None}
    pq.write_table(pa.Table.from_pylist([pair]), tmp_path / "b.parquet")
    listed = tmp_path / "m"
    listed.mkdir()
    (listed / "manifest.jsonl").write_text('{"image": "0.jpg", "prompt": "p", "model": "gen"}\n\nnot json\n')
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        for name, data in (("w0.png", b"img"), ("w0.txt", b" t "), ("w1.json", b"{")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    files = input_files([str(tmp_path / "*.parquet"), str(listed), str(tmp_path / "c.tar")])
    assert files == [tmp_path / "a.parquet", tmp_path / "b.parquet", listed / "manifest.jsonl", tmp_path / "c.tar"]
    assert count_rows(files[:3]) == 2 + 2 + 2 and count_rows(files) is None  # a tar is counted by reading it
    rows = list(read_rows(files))
    assert [r.index for r in rows] == list(range(8))
    assert [(r.id, r.group, r.prompt, r.error) for r in rows] == [
        ("7", "g", "a", ""),
        ("a.parquet:1", "", "", "no prompt"),
        ("5:0", "5", "c", ""),
        ("5:1", "5", "c", ""),
        ("0.jpg", "p", "p", ""),
        (f"{listed / 'manifest.jsonl'}:3", f"{listed / 'manifest.jsonl'}:3", "", rows[5].error),
        ("w0", "t", "t", ""),
        ("w1", "w1", "", rows[7].error),
    ]
    assert rows[5].error.startswith("not a JSON object with an image (") and rows[7].error.startswith(".json is not")
    assert [r.model for r in rows] == ["", "", "m0", "", "gen", "", "", ""]
    assert [r.position for r in rows] == [0, 1, 0, 0, 0, 2, 0, 1]  # Pick-a-Pic's two share their row
    assert rows[4].path == str(listed / "0.jpg") and rows[6].image == b"img" and rows[0].image == b"x"


def test_inputs_that_name_nothing_readable(tmp_path):
    with pytest.raises(InvalidInput, match="no such file or directory"):
        input_files([str(tmp_path / "nowhere.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no Parquet, WebDataset"):
        input_files([str(tmp_path / "empty")])
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(InvalidInput, match="needs a column prompt"):
        list(read_rows([tmp_path / "other.parquet"]))
