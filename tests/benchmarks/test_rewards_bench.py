"""benchmarks/rewards_bench.py, two servers in turn against one Rewards request, cannot rot: its --smoke serves
two tiny models of different shapes as side A (two servers) and side B (one server, one Rewards request),
measures both at two concurrencies, checks B's rewards against A's sums, and leaves no server behind."""

from __future__ import annotations

import json

from tests.benchmarks.runs import help_text, run_benchmark, servers_under


def test_smoke_measures_both_sides_and_checks_the_rewards(tmp_path):
    out = run_benchmark(tmp_path, "rewards_bench.py", "--smoke")
    report = json.loads((out / "rewards-smoke-64px.json").read_text())

    assert set(report["sides"]) == {"A", "B"}
    for side in report["sides"].values():
        assert set(side) == {"1", "2"}  # the smoke's concurrency levels (JSON keys)
        for c, level in side.items():
            assert level["images_per_s"] > 0 and 0 < level["p50_ms"] <= level["p99_ms"]
            assert level["requests"] == max(2, 2 * int(c)) and level["cpu_ms_per_image"] > 0  # 2, at least 2 a caller
    # A decodes every image once per server, B once for both models (they preprocess alike)
    assert {c: r["decodes_per_image"] for c, r in report["sides"]["A"].items()} == {"1": 2.0, "2": 2.0}
    assert {c: r["decodes_per_image"] for c, r in report["sides"]["B"].items()} == {"1": 1.0, "2": 1.0}
    # every request of B (4 warm-up, then 2 and 4 measured, 8 images each) matched against A's weighted sum
    assert report["check"]["rewards"] == 80 and report["check"]["max_abs_diff"] < 1e-4
    assert report["sizes"]["a"] != report["sizes"]["b"]

    table = (out / "rewards-smoke-64px.md").read_text()
    assert table.count("| B: one server, one Rewards |") == 2 and "max abs difference" in table
    assert servers_under(tmp_path / "work") == []


def test_help_names_every_flag():
    text = help_text("rewards_bench.py")
    for flag in ("--smoke", "--image-side", "--concurrency", "--requests", "--rounds", "--tolerance", "--out"):
        assert flag in text
