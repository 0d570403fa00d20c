"""`batch` and `evaluate-models` with several of a server's models (`--model-name pickscore,other`), on a real
two-model server on loopback: a score column per model, each equal to that model's own job; each image decoded once;
resumable; resuming with other model names refused; evaluate-models reports each scorer as it would alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest

from pickscore.cli import main
from pickscore.jobs.batch import run_batch
from pickscore.server.app import ServerThread
from tests.jobs.test_batch import PROMPTS, rows_of
from tests.server.conftest import jpeg, metric, settings_for


@pytest.fixture(scope="module")
def server(tiny_hf_dir, other_hf_dir):
    with ServerThread(settings_for(f"pickscore={tiny_hf_dir},other={other_hf_dir}")) as s:
        yield s


def address(server: ServerThread, transport: str) -> str:
    return server.address if transport == "grpc" else f"http://127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """10 rows over 3 prompts (groups: one per prompt) and a bad one."""
    rows = [{"id": f"img-{i}", "prompt": PROMPTS[i % 3], "image": jpeg(200 + i, size=64 + 8 * i)} for i in range(10)]
    rows.insert(4, {"id": "broken", "prompt": PROMPTS[0], "image": b"not an image"})
    path = tmp_path_factory.mktemp("several") / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def batch(data: Path, out: Path, server: str, names: str, **kw) -> dict:
    return run_batch([str(data)], out, servers=[server], model_name=names, shard_size=4, progress=False, **kw)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_two_models_write_a_column_each_equal_to_each_alone(tmp_path, server, data, transport):
    where = address(server, transport)
    clean = tmp_path / "clean.parquet"  # without the bad row, which costs a retry of its request image by image
    pq.write_table(pq.read_table(data).filter(pa.compute.field("id") != "broken"), clean)
    decoded = metric(server, "pickscore_images_decoded_total")
    batch(clean, tmp_path / "clean", where, "pickscore,other")
    assert metric(server, "pickscore_images_decoded_total") - decoded == 10  # each image once, for both models
    both = batch(data, tmp_path / "both", where, "pickscore,other")
    assert (both["scored"], both["errors"]) == (10, 1)
    assert both["model_names"] == ["pickscore", "other"] and both["score_columns"] == ["score_pickscore", "score_other"]
    got = rows_of(tmp_path / "both")
    columns = [f"{kind}_{name}" for name in ("pickscore", "other") for kind in ("score", "rank", "probability")]
    assert sorted(got[0]) == sorted(["row", "id", "group", "prompt", *columns])
    for name in ("pickscore", "other"):
        alone = batch(data, tmp_path / name, where, name)
        assert alone["model_names"] == [name]
        ref = rows_of(tmp_path / name)
        assert [r["id"] for r in got] == [r["id"] for r in ref]
        np.testing.assert_allclose([r[f"score_{name}"] for r in got], [r["score"] for r in ref], atol=1e-5)
        assert [r[f"rank_{name}"] for r in got] == [r["rank"] for r in ref]  # each model ranks its own scores
        np.testing.assert_allclose([r[f"probability_{name}"] for r in got], [r["probability"] for r in ref], atol=1e-5)
        assert (tmp_path / name / "errors.jsonl").read_text() == (tmp_path / "both" / "errors.jsonl").read_text()
    assert not np.allclose([r["score_pickscore"] for r in got], [r["score_other"] for r in got])  # two models
    (error,) = map(json.loads, (tmp_path / "both" / "errors.jsonl").read_text().splitlines())
    assert error["id"] == "broken" and error["error"].startswith("not a decodable image")


def test_a_partial_job_resumes_and_other_model_names_are_refused(tmp_path, server, data):
    where = address(server, "grpc")
    batch(data, tmp_path / "whole", where, "pickscore,other")
    out = tmp_path / "partial"
    shutil.copytree(tmp_path / "whole", out)
    # As a job killed while scoring its second shard leaves it: the first shard written, a temporary file, no parts.
    for path in [
        *out.glob("part-*"),
        out / "_SUCCESS",
        out / "errors.jsonl",
        *(out / "_scores").glob("shard-0000[12]*"),
    ]:
        path.unlink()
    (out / "_scores" / ".shard-00001.parquet.999.tmp").write_bytes(b"half a file")
    for names in ("other,pickscore", "pickscore", ""):
        with pytest.raises(ValueError, match="holds a different job"):
            batch(data, out, where, names, resume=True)
    resumed = batch(data, out, where, "pickscore,other", resume=True)
    assert (resumed["scored"], resumed["errors"]) == (10, 1)
    rows = rows_of(out)
    assert [r["row"] for r in rows] == sorted({r["row"] for r in rows})  # none twice
    whole = rows_of(tmp_path / "whole")
    assert [r["id"] for r in rows] == [r["id"] for r in whole]  # none lost
    assert close(rows, whole, 1e-5)  # the same scores and ranks (a server's batches may differ in the last bits)
    # One model name is the job's identity too: a job of the default model does not resume as `other`'s.
    batch(data, tmp_path / "default", where, "")
    with pytest.raises(ValueError, match="holds a different job"):
        batch(data, tmp_path / "default", where, "other", resume=True)


def test_several_model_names_need_a_server_and_distinct_names(tmp_path, data, capsys):
    with pytest.raises(ValueError, match="several models need --server"):
        run_batch([str(data)], tmp_path / "a", model="demo", model_name="pickscore,other")
    with pytest.raises(ValueError, match="other is named twice"):
        run_batch([str(data)], tmp_path / "b", servers=["127.0.0.1:1"], model_name="other,other")
    with pytest.raises(SystemExit):
        main(["batch", "--input", str(data), "--output", str(tmp_path / "c"), "--model", "demo", "--model-name", "a,b"])
    assert "several models need --server" in capsys.readouterr().err


def evaluate(capsys, gens: Path, where: str, names: str, out: Path | None = None) -> dict:
    argv = ["evaluate-models", "--prompts", str(gens / "prompts.txt"), "--images", str(gens / "generator-good")]
    argv += [str(gens / "generator-poor"), "--server", where, "--model-name", names, "--bootstrap", "20", "--json"]
    assert main(argv + (["--out", str(out)] if out else [])) == 0
    return json.loads(capsys.readouterr().out)


def close(a, b, tol: float = 1e-4) -> bool:
    """Two JSON values equal, their numbers to ``tol``."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) <= tol
    return a == b


def test_evaluate_models_reports_each_scorer_as_alone(tmp_path, server, capsys):
    gens = tmp_path / "gens"
    argv = ["data", "synthetic", "--models", "2", "--prompts", "4", "--images-per-prompt", "2", "--seed", "0"]
    assert main([*argv, "--out", str(gens)]) == 0
    (gens / "generator-poor" / "1" / "0.png").write_bytes(b"not a png")
    where = address(server, "http")
    both = evaluate(capsys, gens, where, "pickscore,other", tmp_path / "report")
    assert [s["model_name"] for s in both["scorers"]] == ["pickscore", "other"]
    assert [s["image"] for s in both["skipped"]] == [str(gens / "generator-poor" / "1" / "0.png")]
    for scorer in both["scorers"]:
        alone = evaluate(capsys, gens, where, scorer["model_name"])
        assert "scorers" not in alone and alone["scorer"] == scorer["scorer"]  # one model: today's shape
        for key in ("models", "win_rates", "prompts", "bootstrap"):
            assert close(scorer[key], alone[key]), key
        assert close(
            [p["best"][scorer["model_name"]] for p in both["per_prompt"]], [p["best"] for p in alone["per_prompt"]]
        )
        assert both["skipped"] == alone["skipped"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.count("| model | pickscore: rank | pickscore: Elo | pickscore: mean |") == 1  # side by side
    assert all(f"({s['scorer']})" in text for s in both["scorers"])  # then each scorer's own tables
    assert (tmp_path / "report" / "report.png").stat().st_size > 0


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_an_unknown_model_is_named_and_a_token_is_sent(tmp_path, tiny_hf_dir, other_hf_dir, data, transport):
    from pickscore.errors import NotFound, Unauthenticated

    settings = settings_for(f"pickscore={tiny_hf_dir},other={other_hf_dir}", auth_token="s3cret")
    with ServerThread(settings) as two:
        where = address(two, transport)
        with pytest.raises(NotFound, match="'nope'"):
            batch(data, tmp_path / "nope", where, "pickscore,nope", token="s3cret")
        with pytest.raises(Unauthenticated):
            batch(data, tmp_path / "no", where, "pickscore,other")
        manifest = batch(data, tmp_path / "yes", where, "pickscore,other", token="s3cret")
    assert (manifest["scored"], manifest["errors"]) == (10, 1)
