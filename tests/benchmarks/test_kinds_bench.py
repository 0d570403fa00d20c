"""benchmarks/kinds_bench.py, the four kinds in process, served, and in one Rewards request, cannot rot: its --smoke
writes the four published layouts at tiny shapes, measures each in process and through one server, checks the
Rewards request against the sum of the four scores and its one decode per preprocessing, and leaves no server
behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.benchmarks.test_rewards_bench import servers_under

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kinds_bench.py"
KINDS = ["pickscore", "hps", "aesthetic", "image_reward"]


def test_smoke_measures_every_kind_in_process_and_served(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"  # the models lie in work/ (the script's temporary directory)
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--no-append"],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(work)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    assert servers_under(work) == []


def test_help_names_every_flag():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--smoke", "--image-side", "--sets", "--runs", "--kinds", "--models", "--tolerance", "--out"):
        assert flag in proc.stdout
