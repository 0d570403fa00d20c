"""`pickscore precision`: each path's speed and rank agreement with fp32 on the tiny model, the agreement the export
check's own (the same inputs, the same function), and the fastest path that keeps --min-agreement chosen."""

from __future__ import annotations

import json

import pytest

from pickscore.backends import load_backend
from pickscore.cli import main
from pickscore.exporter.onnx import export_onnx
from pickscore.exporter.precision import fastest_kept
from pickscore.exporter.verify import rank_agreement, verification_inputs


@pytest.fixture(scope="module")
def int8(tiny_hf_dir, tmp_path_factory):
    """An int8 export written whatever its agreement; its manifest carries the export check's."""
    out = tmp_path_factory.mktemp("precision") / "int8"
    return out, export_onnx(str(tiny_hf_dir), out, precision="int8", min_agreement=0.0)


def precision(capsys, *flags: str) -> tuple[int, str, str]:
    code = main(["precision", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_each_path_is_measured_against_fp32_as_the_export_check_measures(tiny_hf_dir, int8, capsys):
    directory, manifest = int8
    code, out, _ = precision(capsys, "--model", str(tiny_hf_dir), "--candidates", f"bf16,{directory}", "--json")
    assert code == 0
    result = json.loads(out)
    fp32, bf16, onnx = result["paths"]
    assert (fp32["path"], bf16["path"], onnx["path"]) == ("torch fp32", "torch bf16", f"onnxruntime int8 ({directory})")
    assert (fp32["rank_agreement"], fp32["max_score_diff"], fp32["over_fp32"]) == (1.0, 0.0, 1.0)
    assert all(r["images_per_s"] > 0 for r in result["paths"])
    # the int8 export's own check, on the same 8 sets, gave the same agreement
    assert onnx["rank_agreement"] == manifest["verification"]["rank_agreement"]
    # bf16 against fp32, computed apart with the export check's function
    fp32_backend = load_backend(str(tiny_hf_dir), device="cpu", dtype="fp32")
    pixels, tokens = verification_inputs(fp32_backend.preprocess, fp32_backend.tokenizer, 64)
    bf16_backend = load_backend(str(tiny_hf_dir), device="cpu", dtype="bf16")
    assert bf16["rank_agreement"] == rank_agreement(bf16_backend, fp32_backend, pixels, tokens)
    assert bf16["max_score_diff"] > 0  # bf16 changes scores
    kept = [r for r in result["paths"] if r["rank_agreement"] >= 0.99]
    assert [r["keeps_ranking"] for r in result["paths"]] == [r in kept for r in result["paths"]]
    assert result["fastest"] == max(kept, key=lambda r: r["images_per_s"])["path"]
    assert bf16["serve"] == f"pickscore serve --model {tiny_hf_dir} --dtype bf16"
    assert onnx["serve"] == f"pickscore serve --model {directory}"


def test_the_table_marks_the_fastest_path_that_keeps_ranking_and_how_to_serve_it(tiny_hf_dir, int8, capsys):
    directory, manifest = int8
    assert manifest["verification"]["rank_agreement"] < 1.0  # so that --min-agreement 1.0 leaves it out
    code, out, _ = precision(
        capsys, "--model", str(tiny_hf_dir), "--candidates", str(directory), "--min-agreement", "1"
    )
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2 and rows[0].startswith("| torch fp32 (fastest that keeps ranking) |")
    assert rows[1].startswith(f"| onnxruntime int8 ({directory}) |") and rows[1].endswith("| no |")
    assert f"serve it: pickscore serve --model {tiny_hf_dir} --dtype fp32" in out


def test_a_candidate_that_is_neither_a_lower_dtype_nor_an_export_is_named(tiny_hf_dir, tmp_path, capsys):
    for candidate in ("fp32", str(tmp_path)):
        code, _, err = precision(capsys, "--model", str(tiny_hf_dir), "--candidates", f"bf16,{candidate}")
        assert code == 1 and f"pickscore: error: {candidate!r}: a candidate is a torch dtype below fp32" in err
    with pytest.raises(SystemExit) as exit_info:  # one set would leave none to time
        main(["precision", "--model", str(tiny_hf_dir), "--sets", "1"])
    assert exit_info.value.code == 2


def test_the_fastest_path_below_the_agreement_is_passed_over():
    rows = [
        {"path": "torch fp32", "images_per_s": 10.0, "rank_agreement": 1.0},
        {"path": "torch bf16", "images_per_s": 14.0, "rank_agreement": 0.995},
        {"path": "onnxruntime int8 (m-int8)", "images_per_s": 20.0, "rank_agreement": 0.97},
    ]
    assert fastest_kept(rows, 0.99) == "torch bf16"
    assert [(r["over_fp32"], r["keeps_ranking"]) for r in rows] == [(1.0, True), (1.4, True), (2.0, False)]
    assert fastest_kept(rows, 0.96) == "onnxruntime int8 (m-int8)"
    assert fastest_kept(rows, 1.0) == "torch fp32"  # fp32 is its own reference: always kept
