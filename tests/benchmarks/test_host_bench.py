"""benchmarks/host_bench.py, the projection of the host that feeds a GPU, cannot rot: a short run of a mode measures
a real `pickscore serve` end to end (its images counted from its metrics, its CPU from /proc, its interpreter lock
from py-spy), projects a ceiling, and leaves no server behind."""

from __future__ import annotations

import json

from tests.benchmarks.runs import help_text, run_benchmark, servers_under


def test_a_short_run_measures_cpu_and_lock_per_image_and_projects_a_ceiling(tmp_path):
    flags = ("--modes", "processes", "--warmup-s", "1", "--window-s", "2", "--gil-window-s", "1", "--rate", "50")
    out = run_benchmark(tmp_path, "host_bench.py", *flags)
    (report,) = [json.loads(p.read_text()) for p in out.glob("host-*.json")]
    mode = report["modes"]["processes"]
    assert mode["images"] > 0 and mode["images_per_s"] > 0  # the server's own counter moved
    assert mode["cpu_ms_per_image"] > 0 and mode["gil_ms_per_image"] > 0
    assert mode["gil_workers_ms_per_image"]  # each decode worker's lock counted apart
    assert mode["ceiling"] == min(mode["cores_over_cpu"], mode["one_over_gil"])
    assert "| exact path, `--decode-processes` |" in next(out.glob("host-*.md")).read_text()
    assert servers_under(tmp_path / "work") == []


def test_help_documents_every_flag():
    text = help_text("host_bench.py")
    for flag in ("--modes", "--window-s", "--gil-window-s", "--rate", "--cores", "--target", "--py-spy", "--out"):
        assert flag in text
