"""benchmarks/gpu_run.py, the one-call GPU measurement, cannot rot: its --cpu-smoke runs every section's code on
the CPU with tiny shapes, and a section past its budget is killed (its servers with it) without losing the rest.
The wheels a GPU machine lacks are fetched and installed offline as the run there does (docs/GPU.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.benchmarks.runs import ROOT, benchmark_module, run_benchmark, servers_under


def run(tmp_path: Path, *flags: str) -> dict:
    out = run_benchmark(tmp_path, "gpu_run.py", "--cpu-smoke", *flags, timeout=900)
    return json.loads((out / "gpu-run.json").read_text())


def test_cpu_smoke_measures_every_section(tmp_path):
    # A generous budget: this checks that every section runs and reports, not how fast a busy CI machine is.
    report = run(tmp_path, "--budget-s", "600")
    sections = report["sections"]
    assert list(sections) == [
        "model",
        "roofline",
        "tower",
        "serve",
        "fidelity",
        "training",
        "tower-compiled",
        "serve-compiled",
        "serve-front-ends",
    ]
    assert {name: s["status"] for name, s in sections.items()} == {name: "ok" for name in sections}
    r = {name: s["results"] for name, s in sections.items()}
    # FLOPs counted from the architecture, the roofline measured: fractions of it follow
    assert r["model"]["flops"]["image"] > 0 and r["roofline"]["flops_per_s"] > 0
    for name in ("tower", "tower-compiled"):
        rows = r[name]["rows"]
        assert [x["batch"] for x in rows] == [2, 4]
        assert all(x["images_per_s"] > 0 and 0 < x["of_roofline"] for x in rows)
    served = r["serve"]["rows"] + r["serve-compiled"]["rows"] + r["serve-front-ends"]["rows"]
    variants = ["exact", "pixels", "reward", "decode-on-device", "compiled", "front-ends"]
    assert [x["variant"] for x in served] == variants
    for row in served:
        assert row["requests"] in (4, 32) and row["images_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["server_cpu_ms_per_image"] > 0
        profile = row["profile"]  # py-spy over one loaded second: shares of the server's busy samples
        assert isinstance(profile, dict), profile
        assert abs(sum(profile["share"].values()) - 1) < 1e-6 and profile["busy_threads"] > 0
    assert "decode" in served[0]["profile"]["share"]  # JPEGs are decoded in the server ...
    assert "decode" not in served[1]["profile"]["share"]  # ... pixels are not
    assert any("compute" in row["profile"]["share"] for row in served)
    fidelity = {x["candidate"]: x for x in r["fidelity"]["rows"]}
    assert set(fidelity) == {"fp32, exact decode", "fp32, decode on device", "bf16, exact decode", "fp16, exact decode"}
    assert fidelity["fp32, exact decode"]["largest_score_difference"] == 0
    assert fidelity["fp32, exact decode"]["rank_agreement"] == 1
    assert 0 < fidelity["bf16, exact decode"]["largest_score_difference"] < 1
    training = r["training"]["rows"]
    assert [(x["grad_checkpointing"], x["micro_batch"]) for x in training] == [
        (True, 2),
        (True, 4),
        (False, 2),
        (False, 4),
    ]
    assert all(x["fits"] and x["samples_per_s"] > 0 and 0 < x["mfu"] < 1 for x in training)
    assert report["device"]["commit"] and report["device"]["torch"]
    out = tmp_path / "out"
    markdown = (out / "gpu-run.md").read_text()
    assert "| serve | ok |" in markdown and "| decode-on-device | 2 |" in markdown
    assert (out / "gpu-run.png").stat().st_size > 10_000


def test_a_section_over_budget_is_killed_with_its_servers_and_the_rest_goes_on(tmp_path):
    # serve gets 8 s (its first server is up by then, its loads not finished); the others as long as they need
    budgets = ("--budget", "model=300", "--budget", "serve=8", "--budget", "fidelity=300")
    report = run(tmp_path, "--sections", "model,serve,fidelity", *budgets)
    sections = report["sections"]
    assert sections["model"]["status"] == "ok"
    assert sections["serve"]["status"].startswith("over budget")
    assert 8 <= sections["serve"]["seconds"] < 30
    assert sections["fidelity"]["status"] == "ok"
    assert servers_under(tmp_path / "work") == []


def test_the_wheels_a_gpu_machine_lacks_fit_and_install_offline(tmp_path):
    wheels = tmp_path / "whl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_wheels.py"), "--dest", str(wheels)], check=True)
    names = {w.name.split("-")[0].lower() for w in wheels.glob("*.whl")}
    assert names == {
        "grpcio",
        "protobuf",
        "grpcio_health_checking",
        "grpcio_reflection",
        "tritonclient",
        "python_rapidjson",
        "py_spy",
    }
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
        + ["--python-version", "3.12", "--only-binary=:all:", *map(str, wheels.glob("*.whl"))],
        check=True,
    )
    for module in ("grpc", "grpc_health", "grpc_reflection", "tritonclient/grpc", "google/protobuf", "bin/py-spy"):
        assert (site / module).exists(), module


def test_profile_stages_follow_the_innermost_frame_that_names_one():
    stage_of = benchmark_module("gpu_run").stage_of
    engine = "Engine._crop (/srv/pickscore/server/engine.py:230)"
    # Pillow decodes lazily: a JPEG's decode can run under the crop
    lazy = [engine, "crop_uint8 (/srv/pickscore/model/preprocess.py:248)", "ImageFile.load (/lib/PIL/ImageFile.py:290)"]
    assert stage_of(lazy) == "decode"
    assert stage_of(lazy[:2] + ["Image.resize (/lib/PIL/Image.py:2440)"]) == "preprocess"
    # pixels wrapped into an image are not decoded; torch's own normalize under a tower is compute
    pixels = [engine, "from_pixels (pickscore/model/preprocess.py:182)", "frombuffer (/lib/PIL/Image.py:3100)"]
    assert stage_of(pixels) == "preprocess"
    tower = ["TorchBackend._run (pickscore/backends/torch_backend.py:250)", "normalize (torch/nn/functional.py:6126)"]
    assert stage_of(tower) == "compute"
    assert stage_of(["TorchBackend.encode_image (pickscore/backends/torch_backend.py:220)"]) == "python"
    assert stage_of(["TorchBackend._to_device (pickscore/backends/torch_backend.py:231)"]) == "copy"
    assert stage_of(["Handle._run (/usr/lib/python3.11/asyncio/events.py:80)"]) == "python"
