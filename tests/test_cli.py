from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pickscore.cli import main
from pickscore.scorer import Scorer

PROMPT = "a bowl of ramen, studio photo"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_score_json_matches_in_process_scores(capsys, tiny_hf_dir, image_dir):
    code, out, _ = run(capsys, "score", "--model", tiny_hf_dir, "--prompt", PROMPT, "--json", image_dir)
    assert code == 0
    doc = json.loads(out)
    files = sorted(p for p in image_dir.iterdir())
    assert doc["model"] == str(tiny_hf_dir) and doc["prompt"] == PROMPT
    assert [r["image"] for r in doc["results"]] == [str(f) for f in files]
    expected = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32").score(PROMPT, files)
    np.testing.assert_allclose([r["score"] for r in doc["results"]], expected, atol=1e-6)


def test_rank_json_best_first_with_probability_and_rank(capsys, tiny_hf_dir, image_dir):
    code, out, _ = run(capsys, "rank", "--model", tiny_hf_dir, "--prompt", PROMPT, "--json", "--top-k", 5, image_dir)
    assert code == 0
    results = json.loads(out)["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(0 < r["probability"] < 1 for r in results)
    assert results[0]["probability"] == max(r["probability"] for r in results)


def test_table_output(capsys, tiny_hf_dir, image_dir):
    code, out, _ = run(
        capsys, "rank", "--model", tiny_hf_dir, "--prompt", PROMPT, image_dir / "rgb.png", image_dir / "gray.png"
    )
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split() == ["rank", "score", "probability", "image"] and len(lines) == 3
    assert lines[1].split()[0] == "1" and lines[2].split()[0] == "2"


@pytest.mark.parametrize(
    "name,reason",
    [
        ("truncated.jpg", "not a decodable image"),
        ("bomb.png", "pixel limit"),
        ("notes.png", "cannot identify image file"),
        ("empty.jpg", "empty file"),
    ],
)
def test_bad_image_fails_naming_the_file(capsys, tiny_hf_dir, image_dir, bad_images, name, reason):
    code, out, err = run(
        capsys, "score", "--model", tiny_hf_dir, "--prompt", PROMPT, "--json", image_dir / "rgb.png", bad_images[name]
    )
    assert code == 1 and out == ""
    assert str(bad_images[name]) in err and reason in err


def test_skip_invalid_reports_each_bad_file_and_scores_the_rest(capsys, tiny_hf_dir, image_dir, bad_images):
    good = [image_dir / "rgb.png", image_dir / "gray.png"]
    code, out, _ = run(
        capsys,
        "rank",
        "--model",
        tiny_hf_dir,
        "--prompt",
        PROMPT,
        "--json",
        "--skip-invalid",
        good[0],
        *bad_images.values(),
        good[1],
    )
    assert code == 0
    doc = json.loads(out)
    assert sorted(r["image"] for r in doc["results"]) == sorted(map(str, good))
    assert abs(sum(r["probability"] for r in doc["results"]) - 1) < 1e-5
    assert sorted(e["image"] for e in doc["errors"]) == sorted(map(str, bad_images.values()))
    assert all(e["image"] in e["error"] for e in doc["errors"])


def test_all_invalid_fails_even_with_skip_invalid(capsys, tiny_hf_dir, bad_images):
    code, _, err = run(
        capsys, "score", "--model", tiny_hf_dir, "--prompt", PROMPT, "--skip-invalid", *bad_images.values()
    )
    assert code == 1 and "none of the 4 images" in err


def test_bad_model_reference_fails_clearly(capsys, tmp_path, image_dir):
    code, _, err = run(capsys, "score", "--model", tmp_path, "--prompt", PROMPT, image_dir / "rgb.png")
    assert code == 1 and "none of the layouts this package loads" in err and "ImageReward.pt" in err


def test_convert_writes_a_loadable_model(capsys, tmp_path, tiny_hf_dir, image_dir):
    assert run(capsys, "convert", "--model", tiny_hf_dir, "--out", tmp_path / "oc")[0] == 0
    _, a, _ = run(capsys, "score", "--model", tmp_path / "oc", "--prompt", PROMPT, "--json", image_dir)
    _, b, _ = run(capsys, "score", "--model", tiny_hf_dir, "--prompt", PROMPT, "--json", image_dir)
    np.testing.assert_allclose(
        [r["score"] for r in json.loads(a)["results"]], [r["score"] for r in json.loads(b)["results"]], atol=1e-6
    )


def test_console_script_exit_codes(tiny_hf_dir, image_dir, bad_images):
    exe = Path(sys.executable).with_name("pickscore")
    ok = subprocess.run(
        [exe, "score", "--model", tiny_hf_dir, "--prompt", PROMPT, "--json", image_dir / "rgb.png"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and len(json.loads(ok.stdout)["results"]) == 1
    bad = subprocess.run(
        [exe, "score", "--model", tiny_hf_dir, "--prompt", PROMPT, bad_images["notes.png"]],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "notes.png" in bad.stderr
    usage = subprocess.run([exe, "rank", "--prompt", PROMPT], capture_output=True, text=True)
    assert usage.returncode == 2 and "--model" in usage.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda", "device 'cuda': CUDA is not available on this machine"),
        ("cuda:1", "device 'cuda:1': CUDA is not available on this machine"),
        ("gpu", "device 'gpu': not a torch device; use auto, cpu, cuda or cuda:N"),
    ],
)
def test_a_device_this_machine_lacks_is_one_line(capsys, tiny_hf_dir, image_dir, device, message):
    code, out, err = run(
        capsys, "score", "--model", tiny_hf_dir, "--device", device, "--prompt", PROMPT, image_dir / "rgb.png"
    )
    assert code == 1 and out == ""
    assert err.splitlines() == [err.strip()] and err.startswith(f"pickscore: error: {message}")
