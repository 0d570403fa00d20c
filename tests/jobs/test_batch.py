"""`pickscore batch` on real inputs (Parquet, WebDataset, manifest, Pick-a-Pic), in-process and on a real server:
scores equal the Scorer's, groups are ranked, bad rows are reported, SIGKILL + --resume gives the uninterrupted
run's rows, and memory stays bounded as the input grows."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pickscore.cli import main as cli
from pickscore.jobs.batch import run_batch
from pickscore.jobs.jobdir import group_ranks
from pickscore.scorer import Scorer
from pickscore.server.app import ServerThread
from tests.server.conftest import jpeg, settings_for

PROMPTS = ["a red square on a blue background", "two green circles", "a yellow star"]


def rows_of(out: Path) -> list[dict]:
    return sorted(
        (r for part in sorted(out.glob("part-*.parquet")) for r in pq.read_table(part).to_pylist()),
        key=lambda r: r["row"],
    )


def expected_scores(model: Path, rows: list[dict]) -> list[float]:
    scorer = Scorer.from_pretrained(model, device="cpu", dtype="fp32")
    return [scorer.score(r["prompt"], [r["image"]])[0] for r in rows]


@pytest.fixture(scope="module")
def dataset() -> list[dict]:
    """12 candidates over 3 prompts; groups: one per prompt, except prompt 0 split into two groups."""
    out = []
    for i in range(12):
        prompt = PROMPTS[i % 3]
        group = f"{prompt}/{i % 2}" if i % 3 == 0 else prompt
        out.append({"id": f"img-{i}", "prompt": prompt, "group": group, "image": jpeg(100 + i, size=64 + 8 * i)})
    return out


def check(out: Path, dataset: list[dict], model: Path) -> None:
    got = rows_of(out)
    assert [r["id"] for r in got] == [d["id"] for d in dataset]
    np.testing.assert_allclose([r["score"] for r in got], expected_scores(model, dataset), atol=1e-5)
    for group in {d["group"] for d in dataset}:
        members = [r for r in got if r["group"] == group]
        by_score = sorted(members, key=lambda r: -r["score"])
        assert [r["rank"] for r in by_score] == list(range(1, len(members) + 1))
        s = np.array([r["score"] for r in members], np.float64)
        np.testing.assert_allclose(
            [r["probability"] for r in members], np.exp(s - s.max()) / np.exp(s - s.max()).sum(), atol=1e-6
        )
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["scored"] == len(dataset) and success["errors"] == 0
    identity = Scorer.from_pretrained(model, device="cpu", dtype="fp32").identity
    assert success["model_identity"] == {"pickscore": identity}  # what scored the job, as a server reports it


def test_parquet_with_image_bytes(tmp_path, tiny_hf_dir, dataset):
    pq.write_table(pa.Table.from_pylist(dataset), tmp_path / "data.parquet")
    assert (
        cli(
            [
                "batch",
                "--input",
                str(tmp_path / "*.parquet"),
                "--output",
                str(tmp_path / "out"),
                "--model",
                str(tiny_hf_dir),
                "--device",
                "cpu",
                "--shard-size",
                "5",
            ]
        )
        == 0
    )
    check(tmp_path / "out", dataset, tiny_hf_dir)


def test_parquet_with_paths_webdataset_and_manifest(tmp_path, tiny_hf_dir, dataset):
    images = tmp_path / "images"
    images.mkdir()
    for d in dataset:
        (images / f"{d['id']}.jpg").write_bytes(d["image"])
    table = [
        {"id": d["id"], "prompt": d["prompt"], "group": d["group"], "image_path": f"images/{d['id']}.jpg"}
        for d in dataset
    ]
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "paths.parquet")
    run_batch(
        [str(tmp_path / "paths.parquet")],
        tmp_path / "out1",
        model=str(tiny_hf_dir),
        device="cpu",
        shard_size=4,
        progress=False,
    )
    check(tmp_path / "out1", dataset, tiny_hf_dir)

    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for d in dataset:
            for suffix, data in (
                (".jpg", d["image"]),
                (".json", json.dumps({"prompt": d["prompt"], "group": d["group"]}).encode()),
            ):
                info = tarfile.TarInfo(d["id"] + suffix)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    run_batch(
        [str(tmp_path / "shard-000.tar")],
        tmp_path / "out2",
        model=str(tiny_hf_dir),
        device="cpu",
        shard_size=7,
        progress=False,
    )
    check(tmp_path / "out2", dataset, tiny_hf_dir)

    (images / "manifest.jsonl").write_text(
        "".join(
            json.dumps({"image": f"{d['id']}.jpg", "prompt": d["prompt"], "group": d["group"], "id": d["id"]}) + "\n"
            for d in dataset
        )
    )
    run_batch([str(images)], tmp_path / "out3", model=str(tiny_hf_dir), device="cpu", progress=False)
    check(tmp_path / "out3", dataset, tiny_hf_dir)


def test_pickapic_parquet_ranks_each_pair(tmp_path, tiny_hf_dir):
    from pickscore.training.synthetic import write_synthetic

    write_synthetic(tmp_path / "syn", pairs=12, seed=3, image_size=64)
    source = pq.read_table(next((tmp_path / "syn" / "train").glob("*.parquet"))).to_pylist()
    run_batch([str(tmp_path / "syn" / "train")], tmp_path / "out", model=str(tiny_hf_dir), device="cpu", progress=False)
    got = rows_of(tmp_path / "out")
    assert len(got) == 2 * len(source)
    scorer = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32")
    for k, row in enumerate(source):
        pair = got[2 * k : 2 * k + 2]
        assert [r["id"] for r in pair] == [f"{row['ranking_id']}:0", f"{row['ranking_id']}:1"]
        expected = scorer.score(row["caption"], [row["jpg_0"], row["jpg_1"]])
        np.testing.assert_allclose([r["score"] for r in pair], expected, atol=1e-5)
        assert sorted(r["rank"] for r in pair) == [1, 2]


def test_bad_rows_are_reported_not_fatal(tmp_path, tiny_hf_dir, dataset):
    bad = [
        {"id": "broken", "prompt": PROMPTS[0], "group": None, "image": b"not an image"},
        {"id": "no-prompt", "prompt": "", "group": None, "image": dataset[0]["image"]},
        {"id": "no-image", "prompt": PROMPTS[1], "group": None, "image": None},
    ]
    rows = [dict(d) for d in dataset[:4]] + bad
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    manifest = run_batch(
        [str(tmp_path / "data.parquet")], tmp_path / "out", model=str(tiny_hf_dir), device="cpu", progress=False
    )
    assert manifest["scored"] == 4 and manifest["errors"] == 3
    errors = {
        e["id"]: e["error"] for e in map(json.loads, (tmp_path / "out" / "errors.jsonl").read_text().splitlines())
    }
    assert "not a decodable image" in errors["broken"]
    assert "no prompt" in errors["no-prompt"] and "no image" in errors["no-image"]
    assert [r["id"] for r in rows_of(tmp_path / "out")] == [d["id"] for d in dataset[:4]]


def test_resume_rules(tmp_path, tiny_hf_dir, dataset):
    pq.write_table(pa.Table.from_pylist(dataset), tmp_path / "data.parquet")
    args = dict(model=str(tiny_hf_dir), device="cpu", progress=False)
    run_batch([str(tmp_path / "data.parquet")], tmp_path / "out", **args)
    with pytest.raises(ValueError, match="not empty; pass --resume"):
        run_batch([str(tmp_path / "data.parquet")], tmp_path / "out", **args)
    with pytest.raises(ValueError, match="holds a different job"):
        run_batch([str(tmp_path / "data.parquet")], tmp_path / "out", resume=True, shard_size=3, **args)
    again = run_batch([str(tmp_path / "data.parquet")], tmp_path / "out", resume=True, **args)
    assert again["scored"] == len(dataset) and again["images_per_s_this_run"] == 0  # nothing left to score


def _job(data: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pickscore.cli",
        "batch",
        "--input",
        str(data),
        "--output",
        str(out),
        "--model",
        str(model),
        "--device",
        "cpu",
        *extra,
    ]


def test_sigkill_and_resume_give_the_uninterrupted_rows(tmp_path, tiny_hf_dir):
    rows = [{"prompt": PROMPTS[i % 3], "image": jpeg(i, size=256)} for i in range(240)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    data = tmp_path / "data.parquet"
    run_batch([str(data)], tmp_path / "whole", model=str(tiny_hf_dir), device="cpu", shard_size=8, progress=False)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_job(data, out, tiny_hf_dir, "--shard-size", "8"), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "_scores").glob("shard-*.parquet"))) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "_scores").glob("shard-*.parquet")))
    assert 3 <= finished < 30 and not (out / "_SUCCESS").exists(), finished  # killed mid-run
    done = subprocess.run(_job(data, out, tiny_hf_dir, "--shard-size", "8", "--resume"), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert rows_of(out) == rows_of(tmp_path / "whole")
    assert not list(out.glob(".*.tmp")) and not list((out / "_scores").glob(".*.tmp"))


def test_memory_stays_bounded_as_the_input_grows(tmp_path, tiny_hf_dir):
    """Four times the rows must not raise the peak RSS by what holding them costs. Measured on a 2-core AMD EPYC:
    shards of 16 grow it 60 MiB (allocator caches, settling), one shard of everything 141 MiB. Bounded means one
    shard of images and one Parquet row group (pyarrow decodes row groups whole, so the file is written in groups
    of 32 rows, as datasets meant for streaming are)."""
    peaks = []
    for n in (100, 400):
        data = tmp_path / f"data-{n}.parquet"
        table = pa.Table.from_pylist([{"prompt": PROMPTS[i % 3], "image": jpeg(i, size=512)} for i in range(n)])
        pq.write_table(table, data, row_group_size=32)
        code = (
            "import resource, sys\n"
            "from pickscore.cli import main\n"
            f"rc = main(['batch', '--input', {str(data)!r}, '--output', {str(tmp_path / f'out-{n}')!r}, '--model', "
            f"{str(tiny_hf_dir)!r}, '--device', 'cpu', '--shard-size', '16'])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            "sys.exit(rc)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks.append(int(done.stdout.split()[-1]) * 1024)
    grown = peaks[1] - peaks[0]
    assert grown < 100 << 20, f"peak RSS grew {grown / 2**20:.0f} MiB for 4x the rows"


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_on_a_server_equals_in_process(tmp_path, tiny_hf_dir, dataset, transport):
    rows = [dict(d) for d in dataset] + [{"id": "broken", "prompt": PROMPTS[0], "group": "x", "image": b"junk"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    with ServerThread(settings_for(tiny_hf_dir)) as server:
        address = server.address if transport == "grpc" else f"http://127.0.0.1:{server.server.http_port}"
        manifest = run_batch(
            [str(tmp_path / "data.parquet")], tmp_path / "out", servers=[address], shard_size=5, progress=False
        )
    assert manifest["errors"] == 1 and manifest["scored"] == len(dataset)
    check_rows = rows_of(tmp_path / "out")
    np.testing.assert_allclose([r["score"] for r in check_rows], expected_scores(tiny_hf_dir, dataset), atol=1e-5)


def test_group_ranks_by_hand():
    rank, probability = group_ranks(["a", "b", "a", "a", "b"], np.array([1.0, 5.0, 3.0, np.nan, 5.0]))
    assert rank.tolist() == [2, 1, 1, 0, 2]  # equal scores: input order; a failed row takes no part
    np.testing.assert_allclose(probability[[0, 2]], [1 / (1 + np.e**2), np.e**2 / (1 + np.e**2)])
    np.testing.assert_allclose(probability[[1, 4]], [0.5, 0.5])
    assert np.isnan(probability[3])


def test_embeddings_rescore_without_the_images(tmp_path, tiny_hf_dir, dataset):
    pq.write_table(pa.Table.from_pylist(dataset), tmp_path / "data.parquet")
    run_batch(
        [str(tmp_path / "data.parquet")],
        tmp_path / "out",
        model=str(tiny_hf_dir),
        device="cpu",
        embeddings=True,
        progress=False,
    )
    got = rows_of(tmp_path / "out")
    scorer = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32")
    image = np.array([r["image_embedding"] for r in got], np.float32)
    text = np.array([r["text_embedding"] for r in got], np.float32)
    np.testing.assert_allclose(np.exp(scorer.logit_scale) * (image * text).sum(1), [r["score"] for r in got], atol=1e-4)
    new_prompt = scorer.encode_text(["a completely different prompt"])[0]  # re-scored, no image decoded
    np.testing.assert_allclose(
        np.exp(scorer.logit_scale) * image @ new_prompt,
        scorer.score("a completely different prompt", [d["image"] for d in dataset]),
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="--embeddings needs --model"):
        run_batch([str(tmp_path / "data.parquet")], tmp_path / "out2", servers=["127.0.0.1:1"], embeddings=True)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_on_a_server_that_wants_a_token(tmp_path, tiny_hf_dir, dataset, transport):
    from pickscore.errors import Unauthenticated

    pq.write_table(pa.Table.from_pylist(dataset[:3]), tmp_path / "data.parquet")
    with ServerThread(settings_for(tiny_hf_dir, auth_token="s3cret")) as server:
        address = server.address if transport == "grpc" else f"http://127.0.0.1:{server.server.http_port}"
        with pytest.raises(Unauthenticated):
            run_batch([str(tmp_path / "data.parquet")], tmp_path / "no", servers=[address], progress=False)
        manifest = run_batch(
            [str(tmp_path / "data.parquet")], tmp_path / "yes", servers=[address], token="s3cret", progress=False
        )
    assert manifest["scored"] == 3


def _inputs_with_bad_rows(tmp_path: Path, dataset: list[dict]) -> tuple[list[str], list[tuple]]:
    """Parquet, a manifest and a WebDataset tar, each with bad rows -> (the inputs, what errors.jsonl should say of
    them: (row, file, position, id, how the reason starts))."""
    a, listed, b = str(tmp_path / "a.parquet"), tmp_path / "m", str(tmp_path / "b.tar")
    table = [dict(d) for d in dataset[:2]]
    table += [dict(dataset[2], id="broken", image=b"not an image"), dict(dataset[3], id="no-prompt", prompt="")]
    pq.write_table(pa.Table.from_pylist(table), a)
    listed.mkdir()
    (listed / "0.jpg").write_bytes(dataset[4]["image"])
    lines = ["", "not json", json.dumps({"image": "gone.jpg", "prompt": PROMPTS[1]})]  # blank, bad, missing file
    (listed / "manifest.jsonl").write_text(
        json.dumps({"image": "0.jpg", "prompt": PROMPTS[0]}) + "\n" + "\n".join(lines)
    )
    with tarfile.open(b, "w") as tar:
        for name, data in (("w0.jpg", dataset[5]["image"]), ("w0.txt", b"a prompt"), ("w1.json", b"{")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    m = str(listed / "manifest.jsonl")
    expected = [
        (2, a, 2, "broken", "not a decodable image ("),
        (3, a, 3, "no-prompt", "no prompt"),
        (5, m, 2, f"{m}:3", "not a JSON object with an image ("),
        (6, m, 3, "gone.jpg", "cannot read file (No such file or directory)"),
        (8, b, 1, "w1", ".json is not a JSON object ("),
    ]
    return [a, str(listed), b], expected


def test_errors_jsonl_names_each_bad_row_alike_on_every_path(tmp_path, tiny_hf_dir, dataset):
    inputs, expected = _inputs_with_bad_rows(tmp_path, dataset)
    outputs = {"here": tmp_path / "here", "grpc": tmp_path / "grpc", "http": tmp_path / "http"}
    run_batch(inputs, outputs["here"], model=str(tiny_hf_dir), device="cpu", shard_size=3, progress=False)
    with ServerThread(settings_for(tiny_hf_dir)) as server:
        for name, address in (("grpc", server.address), ("http", f"http://127.0.0.1:{server.server.http_port}")):
            run_batch(inputs, outputs[name], servers=[address], shard_size=3, progress=False)
    text = (outputs["here"] / "errors.jsonl").read_text()
    assert all((out / "errors.jsonl").read_text() == text for out in outputs.values())  # one style on every path
    lines = [json.loads(line) for line in text.splitlines()]
    assert [list(line) for line in lines] == [["row", "file", "position", "id", "error"]] * len(expected)
    for line, (*where, reason) in zip(lines, expected):
        assert [line[k] for k in ("row", "file", "position", "id")] == where and line["error"].startswith(reason), line
    # The rows scored and the rows in errors.jsonl are every row of the job, each once, numbered alike.
    scored = [r["row"] for r in rows_of(outputs["here"])]
    assert sorted(scored + [line["row"] for line in lines]) == list(range(9))
