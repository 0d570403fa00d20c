"""benchmarks/serve_bench.py's paths part (g) cannot rot: on tiny towers it serves every path this CPU has, with
each one's rank agreement with fp32, and marks the fastest that keeps 0.99."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def serve_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import serve_bench

    yield serve_bench
    for name in ("serve_bench", "common", "load"):  # the benchmarks' flat modules: not this package's
        sys.modules.pop(name, None)


def test_paths_serve_every_path_with_its_rank_agreement(serve_bench, tmp_path):
    pytest.importorskip("onnxruntime")
    from common import jpegs, write_model

    from pickscore.resources import cpu_features

    model = write_model("tiny", tmp_path / "tiny")
    args = argparse.Namespace(
        device="cpu", dtype="fp32", max_batch_size=32, max_queue_delay_ms=5.0, path_concurrency=2, requests=2
    )
    features = cpu_features()
    result = serve_bench.bench_paths(model, jpegs(8, 64), args, tmp_path, features.flags, baseline=1.0)

    paths = result["paths"]
    assert set(paths) == {"torch fp32", "torch bf16", "onnx fp32", "onnx int8"}
    assert paths["torch fp32"]["rank_agreement"] == 1.0
    assert paths["onnx fp32"]["rank_agreement"] == pytest.approx(1.0, abs=0.01)  # fp32 in another runtime
    served = {name: r for name, r in paths.items() if "skipped" not in r}
    assert all(r["images_per_s"] > 0 and 0 <= r["rank_agreement"] <= 1 for r in served.values())
    assert ("skipped" in paths["torch bf16"]) == (not features.flags & {"amx_bf16", "avx512_bf16"})
    best = result["best"]
    assert served[best]["rank_agreement"] >= 0.99
    assert all(
        served[best]["images_per_s"] >= r["images_per_s"] for r in served.values() if r["rank_agreement"] >= 0.99
    )
    table = "\n".join(serve_bench.markdown_paths(result, 64))
    assert f"| {best} **(best that keeps ranking)** |" in table
