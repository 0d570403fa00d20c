"""benchmarks/soak_bench.py, a server under mixed traffic watched for leaks, cannot rot: its --smoke runs every kind of
traffic against a real `pickscore serve` (decode worker processes) for about 20 s, each kind gets the answers it
should (bad input refused as such, never a 500 or an INTERNAL), the server drains and exits 0, and the report has
its samples, points and slopes, and a plot."""

from __future__ import annotations

import json

from tests.benchmarks.runs import help_text, run_benchmark, servers_under

INVALID = {  # the refusal each invalid kind must get, as the transports map bad input
    "corrupt_image/grpc": "INVALID_ARGUMENT",
    "corrupt_image/http": "400",
    "empty_prompt/grpc": "INVALID_ARGUMENT",
    "empty_prompt/http": "400",
    "oversized_image/grpc": "INVALID_ARGUMENT",
    "oversized_message/grpc": "RESOURCE_EXHAUSTED",  # gRPC's own receive limit
    "too_many_images/http": "400",
    "unknown_model/grpc": "NOT_FOUND",
    "unknown_model/http": "404",
}


def test_smoke_exercises_every_kind_and_reports_the_curve(tmp_path):
    out = run_benchmark(tmp_path, "soak_bench.py", "--smoke")
    report = json.loads((out / "soak-smoke.json").read_text())

    kinds = report["kinds"]
    assert report["unexpected"] == {}
    groups = {k["group"] for k in kinds.values()}
    assert groups == {"valid", "invalid", "abandoned"} and len(kinds) == 22
    assert set(INVALID) | {"oversized_body/http"} == {n for n, k in kinds.items() if k["group"] == "invalid"}
    assert all(sum(k["outcomes"].values()) > 0 for k in kinds.values()), {n: k["outcomes"] for n, k in kinds.items()}
    for kind, group in (("score/grpc", "ok"), ("score_json/http", "200"), ("kserve_infer/http", "ok")):
        assert set(kinds[kind]["outcomes"]) == {group}
    for kind, code in INVALID.items():
        assert set(kinds[kind]["outcomes"]) == {code}, (kind, kinds[kind]["outcomes"])
    assert set(kinds["oversized_body/http"]["outcomes"]) == {"413"}
    # the abandoned kinds did what they say: calls cancelled mid-flight, deadlines missed, connections dropped
    assert kinds["cancelled/grpc"]["outcomes"].get("cancelled", 0) > 0
    assert kinds["over_deadline/grpc"]["outcomes"].get("DEADLINE_EXCEEDED", 0) > 0
    assert set(kinds["disconnect/http"]["outcomes"]) == {"disconnected"}
    assert set(kinds["stream_closed_early/grpc"]["outcomes"]) == {"closed"}

    # the server saw them too: each transport's refusals of bad input, its cancellations, and no INTERNAL
    codes = {key.split()[-1] for key, n in report["server"]["requests"].items() if n > 0}
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED"} <= codes and report["server_errors"] == {}
    assert report["crashed"] is None and report["drained"] and report["exit_code"] == 0
    assert report["server_log_levels"].get("ERROR", 0) == 0 and report["server_log_problems"] == []

    samples = report["samples"]
    assert len(samples) >= 10 and samples[-1]["t_s"] >= 20
    assert all(s["rss_mb"] > 0 and s["fds"] > 0 and s["threads"] > 0 for s in samples)
    assert all(s["children"] >= 1 and s["children_rss_mb"] > 0 for s in samples)  # the decode worker processes
    assert sum(samples[-1]["client"].values()) == sum(sum(k["outcomes"].values()) for k in kinds.values())
    assert set(report["points"]) == {"start", "after_warm_up", "end"}
    assert set(report["growth"]) == {"rss_mb", "children_rss_mb", "fds", "children_fds", "threads"}
    assert all({"per_hour", "rise", "noise", "growing"} <= set(g) for g in report["growth"].values())

    table = (out / "soak-smoke.md").read_text()
    assert "| disconnect/http | abandoned |" in table and "| rss_mb |" in table
    assert (out / "soak-smoke.png").stat().st_size > 10_000
    assert servers_under(tmp_path / "work") == []


def test_help_names_every_flag():
    text = help_text("soak_bench.py")
    for flag in ("--smoke", "--minutes", "--model", "--image-side", "--per-request", "--concurrency", "--pause"):
        assert flag in text
    assert "--sample-s" in text and "--decode" in text and "--out" in text and "--no-append" in text
