"""`pickscore eval` on ONNX exports: an export's tie-aware accuracy, measured exactly as its checkpoint's."""

from __future__ import annotations

import json

import pytest

from pickscore.cli import main
from pickscore.exporter.onnx import export_onnx
from pickscore.training.synthetic import write_synthetic


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Pairs from a seed no stage of the demo model saw, half the prompts in each *_unique split."""
    out = tmp_path_factory.mktemp("heldout")
    write_synthetic(out, pairs=600, seed=41, held_out=0.5)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-exports")
    for precision in ("fp32", "int8"):
        # The gate is the exporter's business (tested there); here int8 only has to load and score.
        export_onnx("demo", root / precision, precision=precision, min_agreement=0.95)
    return root


def _eval(capsys, *args: str) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_an_fp32_export_scores_the_checkpoints_accuracy(capsys, heldout, exports):
    checkpoint = _eval(capsys, "--model", "demo", "--data", str(heldout))
    export = _eval(capsys, "--model", str(exports / "fp32"), "--data", str(heldout))
    assert export["model"] == str(exports / "fp32") and checkpoint["model"] == "demo"
    assert export["test_pairs"] == checkpoint["test_pairs"] > 100 and export["skipped"] == 0
    assert checkpoint["accuracy"] > 0.8  # a model with signal, so equality below means something
    assert export["accuracy"] == checkpoint["accuracy"]
    assert export["validation_accuracy"] == checkpoint["validation_accuracy"]
    assert export["threshold"] == pytest.approx(checkpoint["threshold"], abs=1e-6)


def test_an_int8_export_beside_its_checkpoint(capsys, heldout, exports):
    result = _eval(capsys, "--model", str(exports / "int8"), "--baseline", "demo", "--data", str(heldout))
    assert result["model"] == str(exports / "int8") and result["baseline"]["model"] == "demo"
    assert result["test_pairs"] == result["baseline"]["test_pairs"]
    assert result["accuracy"] > 0.8 and abs(result["accuracy"] - result["baseline"]["accuracy"]) <= 0.03, result


def test_an_export_on_the_torch_backend_is_refused_clearly(capsys, heldout, exports):
    assert main(["eval", "--model", str(exports / "fp32"), "--backend", "torch", "--data", str(heldout)]) == 1
    assert "is an ONNX export" in capsys.readouterr().err


def test_several_models_side_by_side_each_as_evaluated_alone(capsys, heldout, exports):
    """`eval --model A --model B`: the paper's table, one row a scorer, each row what evaluating it alone gives."""
    refs = ["demo", str(exports / "fp32"), str(exports / "int8")]
    together = _eval(capsys, *(a for ref in refs for a in ("--model", ref)), "--data", str(heldout))
    assert [m["model"] for m in together["models"]] == refs and together["model"] == "demo"
    for row in together["models"]:
        alone = _eval(capsys, "--model", row["model"], "--data", str(heldout))
        assert (row["accuracy"], row["threshold"], row["test_pairs"]) == (
            alone["accuracy"],
            pytest.approx(alone["threshold"], abs=1e-6),
            alone["test_pairs"],
        )
    assert main(["eval", *(a for ref in refs for a in ("--model", ref)), "--data", str(heldout)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    table = {r.split()[0]: float(r.split()[1]) for r in rows}  # best first (test_eval_scorers checks the order)
    assert set(table) == {*refs, "random"}
    assert all(table[row["model"]] == pytest.approx(row["accuracy"], abs=5e-5) for row in together["models"])
