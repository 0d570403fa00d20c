"""benchmarks/kinds_bench.py, the four kinds in process, served, and in one Rewards request, cannot rot: its --smoke
writes the four published layouts at tiny shapes, measures each in process and through one server, checks the
Rewards request against the sum of the four scores and its one decode per preprocessing, and leaves no server
behind."""

from __future__ import annotations

import json

from tests.benchmarks.runs import help_text, run_benchmark, servers_under

KINDS = ["pickscore", "hps", "aesthetic", "image_reward"]


def test_smoke_measures_every_kind_in_process_and_served(tmp_path):
    out = run_benchmark(tmp_path, "kinds_bench.py", "--smoke")
    report = json.loads((out / "kinds-smoke-64px.json").read_text())

    assert list(report["in_process"]) == KINDS and list(report["served"]["per_model"]) == KINDS
    assert all(r["images_per_s"] > 0 and len(r["runs"]) == 1 for r in report["in_process"].values())
    assert all(rate > 0 for rate in report["served"]["per_model"].values())
    served = report["served"]
    # in turn, each model decodes every image; one Rewards request decodes it once per preprocessing: PickScore's
    # (transformers) and the torchvision style HPS, the aesthetic predictor and ImageReward share
    assert served["in_turn"]["decodes_per_image"] == 4.0 and served["rewards"]["decodes_per_image"] == 2.0
    assert served["check"]["rewards"] == 8 and served["check"]["max_abs_diff"] < 1e-4  # one set, one run
    assert report["sizes"]["hps"] != report["sizes"]["pickscore"]

    table = (out / "kinds-smoke-64px.md").read_text()
    assert "| all 4 in turn |" in table and "| one Rewards request |" in table and "max abs difference" in table
    assert servers_under(tmp_path / "work") == []


def test_help_names_every_flag():
    text = help_text("kinds_bench.py")
    for flag in ("--smoke", "--image-side", "--sets", "--runs", "--kinds", "--models", "--tolerance", "--out"):
        assert flag in text
