"""`pickscore batch --ray` on a local Ray instance the test starts (CPU only, small data): the same rows as the
in-process path, for Parquet, WebDataset and manifest inputs in one job."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pickscore.jobs.batch import run_batch
from tests.jobs.test_batch import PROMPTS, rows_of
from tests.server.conftest import jpeg

pytest.importorskip("ray", reason="the Ray path needs the ray extra (make test installs it)")


def test_ray_path_gives_the_in_process_rows(tmp_path, tiny_hf_dir):
    rows = [
        {"id": f"p{i}", "prompt": PROMPTS[i % 3], "group": f"g{i % 4}", "image": jpeg(i, size=64 + 4 * i)}
        for i in range(20)
    ]
    rows.append({"id": "bad", "prompt": PROMPTS[0], "group": "g0", "image": b"not an image"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=8)
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        for i in range(7):
            for suffix, data in ((".png", jpeg(50 + i)), (".txt", PROMPTS[i % 3].encode())):
                info = tarfile.TarInfo(f"w{i}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = tmp_path / "m"
    manifest.mkdir()
    for i in range(5):
        (manifest / f"{i}.jpg").write_bytes(jpeg(80 + i))
    (manifest / "manifest.jsonl").write_text(
        "".join(json.dumps({"image": f"{i}.jpg", "prompt": PROMPTS[i % 3]}) + "\n" for i in range(5))
    )
    inputs = [str(tmp_path / "a.parquet"), str(tmp_path / "b.tar"), str(manifest)]
    run_batch(inputs, tmp_path / "here", model=str(tiny_hf_dir), device="cpu", shard_size=6, progress=False)

    command = [
        sys.executable,
        "-m",
        "pickscore.cli",
        "batch",
        "--input",
        *inputs,
        "--output",
        str(tmp_path / "ray"),
        "--model",
        str(tiny_hf_dir),
        "--device",
        "cpu",
        "--shard-size",
        "6",
        "--ray",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    here, there = rows_of(tmp_path / "here"), rows_of(tmp_path / "ray")
    assert len(here) == 32 and [r["id"] for r in there] == [r["id"] for r in here]
    for a, b in zip(here, there):
        assert (a["row"], a["group"], a["prompt"], a["rank"]) == (b["row"], b["group"], b["prompt"], b["rank"])
    np.testing.assert_allclose([r["score"] for r in there], [r["score"] for r in here], atol=1e-5)
    np.testing.assert_allclose([r["probability"] for r in there], [r["probability"] for r in here], atol=1e-5)
    errors = (tmp_path / "ray" / "errors.jsonl").read_text()
    assert errors == (tmp_path / "here" / "errors.jsonl").read_text() and "not a decodable image" in errors
    assert sorted(p.name for p in (tmp_path / "ray").glob("part-*")) == sorted(
        p.name for p in (tmp_path / "here").glob("part-*")
    )
