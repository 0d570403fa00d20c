"""`pickscore evaluate-models`: the paper's comparison of text-to-image models, on real components.

The known ranking comes from `pickscore data synthetic --models` (fake generators that keep fewer and fewer of
their prompt's scene) scored by the bundled demo model, which was trained on those scenes. The statistics are
checked against sums worked out by hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pickscore.cli import build_parser, main
from pickscore.datasets.prompts import read_prompts
from pickscore.jobs.model_report import markdown
from pickscore.jobs.model_stats import (
    best_of_n,
    best_of_n_table,
    best_scores,
    bootstrap_mean,
    elo,
    outcomes,
    points,
    win_rates,
)
from pickscore.server.app import ServerThread
from pickscore.server.settings import Settings

ORDER = ["generator-good", "generator-fair", "generator-poor"]
PROMPTS = 24
LOCAL = ["--model", "demo", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def gens(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gens")
    argv = ["data", "synthetic", "--models", "3", "--prompts", str(PROMPTS), "--images-per-prompt", "3"]
    assert main([*argv, "--out", str(out), "--seed", "0"]) == 0
    return out


def evaluate(capsys, gens: Path, *extra: str, images: list[str] | None = None) -> tuple[int, dict | None, str]:
    """Run `pickscore evaluate-models --json` -> (exit status, the printed report or None, stderr)."""
    images = images if images is not None else [str(gens / name) for name in reversed(ORDER)]  # worst given first
    code = main(["evaluate-models", "--prompts", str(gens / "prompts.txt"), "--images", *images, "--json", *extra])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_synthetic_models_rank_in_their_known_order(gens, tmp_path, capsys):
    images = [str(gens / name) for name in reversed(ORDER)]  # worst given first
    out = tmp_path / "report"
    argv = ["--prompts", str(gens / "prompts.txt"), "--images", *images, "--out", str(out), "--best-of", "1,2,3,8"]
    assert main(["evaluate-models", *argv, *LOCAL]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    models = report["models"]
    assert [m["name"] for m in models] == ORDER  # ranked by Elo
    assert models[0]["elo"] > models[1]["elo"] > models[2]["elo"]
    assert models[0]["mean_score"] > models[1]["mean_score"] > models[2]["mean_score"]
    # The intervals hold their estimate, and the best generator's is clear of the worst's.
    for m in models:
        assert m["mean_score_interval"][0] <= m["mean_score"] <= m["mean_score_interval"][1]
        assert m["elo_interval"][0] <= m["elo"] <= m["elo_interval"][1]
        assert (m["prompts_scored"], m["images_scored"]) == (PROMPTS, 3 * PROMPTS)
    assert models[0]["mean_score_interval"][0] > models[2]["mean_score_interval"][1]
    assert models[0]["elo_interval"][0] > models[2]["elo_interval"][1]
    matrix = np.array(report["win_rates"]["matrix"])
    assert report["win_rates"]["models"] == ORDER and matrix[0, 2] > 0.8 and matrix[0, 1] > 0.5 < matrix[1, 2]
    for m in models:  # best of N never loses to one random image; N = 8 > 3 images is left out
        assert m["best_of_n"]["1"]["gain"] == 0 and m["best_of_n"]["8"] is None
        assert 0 <= m["best_of_n"]["2"]["gain"] <= m["best_of_n"]["3"]["gain"]
    assert len(report["per_prompt"]) == PROMPTS and report["skipped"] == [] and report["scorer"] == "demo"
    # The tables printed are report.md; the plot is a PNG.
    assert printed == (out / "report.md").read_text()
    assert printed.startswith("## Text-to-image models by PickScore (demo)")
    assert "| 1 | generator-good |" in printed and "| 3 | generator-poor |" in printed
    assert "| win rate | generator-good | generator-fair | generator-poor |" in printed
    assert "best of 3" in printed and "Best of 8: no prompt has that many scored images." in printed
    with Image.open(out / "report.png") as png:
        assert png.format == "PNG" and png.width > 400


def test_a_server_scores_like_the_local_model_and_skips_bad_images(gens, tmp_path, capsys):
    sets = tmp_path / "gens"
    shutil.copytree(gens, sets)
    bad = sets / "generator-fair" / "3" / "1.png"
    bad.write_bytes(b"this is not a png")
    settings = Settings(
        model="demo", host="127.0.0.1", port=0, metrics_port=0, http_port=0, device="cpu", dtype="fp32",
        max_queue_delay_ms=2.0, log_format="text",
    )  # fmt: skip
    with ServerThread(settings) as server:
        code, remote, err = evaluate(capsys, sets, "--server", server.address, "--bootstrap", "50")
    assert code == 0, err
    code, local, _ = evaluate(capsys, sets, *LOCAL, "--bootstrap", "50")
    assert code == 0
    assert remote["scorer"] == f"demo on {server.address}" and local["scorer"] == "demo"
    # the model that scored is named by its identity, the same served and in process (same weights, same precision)
    assert remote["model_identity"] == local["model_identity"] and local["model_identity"]["pickscore"]
    for a, b in zip(remote["per_prompt"], local["per_prompt"]):
        assert a["best"] == pytest.approx(b["best"], abs=1e-3)
    assert [m["name"] for m in remote["models"]] == ORDER
    for report in (remote, local):  # the bad image is skipped and named, the rest scored
        assert [(s["model"], s["prompt_index"], s["image"]) for s in report["skipped"]] == [
            ("generator-fair", 3, str(bad))
        ]
        fair = next(m for m in report["models"] if m["name"] == "generator-fair")
        assert fair["images_scored"] == 3 * PROMPTS - 1 and fair["prompts_scored"] == PROMPTS
    assert f"skipped: generator-fair: prompt 3: {bad}: not a decodable image" in err


def test_without_out_the_printed_report_names_the_skipped_images(gens, tmp_path, capsys):
    sets = tmp_path / "gens"
    shutil.copytree(gens, sets)
    bad = sets / "generator-poor" / "7" / "0.png"
    bad.write_bytes(b"not a png")
    argv = ["--prompts", str(sets / "prompts.txt"), "--images", *(str(sets / name) for name in ORDER)]
    assert main(["evaluate-models", *argv, *LOCAL, "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert "report.json" not in printed and not list(tmp_path.rglob("report.json"))  # no --out: no file to point to
    skipped = printed[printed.index("1 image could not be scored and skipped:") :].splitlines()
    assert skipped[2:4] == ["| model | prompt | image | reason |", "|---|---:|---|---|"]
    assert skipped[4].startswith(f"| generator-poor | 7 | {bad} | not a decodable image (") and len(skipped) == 5


def test_parquet_images_bad_rows_skipped_and_named(gens, tmp_path, capsys):
    """Parquet by prompt text (with a null and an undecodable image) beside Parquet by prompt index."""
    prompts = read_prompts(gens / "prompts.txt")
    rows = [
        (p.text, p.index, (gens / "generator-good" / str(p.index) / f"{k}.png").read_bytes())
        for p in prompts
        for k in range(3)
    ]
    rows[4] = (rows[4][0], rows[4][1], None)
    rows[7] = (rows[7][0], rows[7][1], b"\x89PNG but not really")
    by_text = tmp_path / "by_text.parquet"
    pq.write_table(pa.table({"prompt": [r[0] for r in rows], "image": [r[2] for r in rows]}), by_text)
    by_index = tmp_path / "by_index.parquet"
    poor = [(p.index, (gens / "generator-poor" / str(p.index) / "0.png").read_bytes()) for p in prompts]
    pq.write_table(pa.table({"prompt_index": [i for i, _ in poor], "image": [b for _, b in poor]}), by_index)
    code, report, err = evaluate(
        capsys, gens, *LOCAL, "--bootstrap", "0", images=[f"good={by_text}", f"poor={by_index}"]
    )
    assert code == 0, err
    assert [m["name"] for m in report["models"]] == ["good", "poor"]
    assert [(s["image"], s["prompt_index"]) for s in report["skipped"]] == [
        (f"{by_text} row 4", 1),
        (f"{by_text} row 7", 2),
    ]
    assert (
        report["skipped"][0]["error"] == "no image (null)" and "not a decodable image" in report["skipped"][1]["error"]
    )
    assert report["models"][0]["images_scored"] == 3 * PROMPTS - 2
    assert report["models"][1]["best_of_n"]["2"] is None  # one image a prompt: no best of 2
    tables = markdown(report)
    assert "No intervals (--bootstrap 0)." in tables and "| 1 | good | " in tables and "| – | " in tables
    assert "2 images could not be scored and skipped:" in tables and "report.json" not in tables
    assert f"| good | 1 | {by_text} row 4 | no image (null) |" in tables
    assert "2 images could not be scored and skipped (see report.json)." in markdown(report, "report.json")
    # A row whose prompt is not in --prompts, and an index out of range, are errors naming the row.
    pq.write_table(pa.table({"prompt": ["a prompt nobody wrote"], "image": [rows[0][2]]}), tmp_path / "stray.parquet")
    code, _, err = evaluate(capsys, gens, *LOCAL, images=[f"x={tmp_path / 'stray.parquet'}"])
    assert (
        code == 1 and f"--images x: {tmp_path / 'stray.parquet'} row 0: prompt 'a prompt nobody wrote' is not in" in err
    )
    pq.write_table(pa.table({"prompt_index": [PROMPTS], "image": [rows[0][2]]}), tmp_path / "far.parquet")
    code, _, err = evaluate(capsys, gens, *LOCAL, images=[f"x={tmp_path / 'far.parquet'}"])
    assert code == 1 and f"row 0: prompt_index {PROMPTS} is not 0 to {PROMPTS - 1}" in err


def test_missing_prompts_and_bad_layouts_are_named(gens, tmp_path, capsys):
    sets = tmp_path / "gens"
    shutil.copytree(gens, sets)
    text = read_prompts(gens / "prompts.txt")[5].text
    shutil.rmtree(sets / "generator-fair" / "5")
    code, _, err = evaluate(capsys, sets, *LOCAL)
    assert code == 1
    assert f"--images generator-fair: no images for 1 of {PROMPTS} prompts: prompt 5 ({text!r}): " in err
    assert f"{sets / 'generator-fair'}/5 is missing" in err
    (sets / "generator-fair" / "5").mkdir()
    code, _, err = evaluate(capsys, sets, *LOCAL)
    assert code == 1 and f"{sets / 'generator-fair' / '5'} holds no image" in err and "prompt 5" in err
    shutil.copytree(gens / "generator-fair" / "5", sets / "generator-fair" / "5", dirs_exist_ok=True)
    (sets / "generator-poor" / str(PROMPTS)).mkdir()
    code, _, err = evaluate(capsys, sets, *LOCAL)
    assert code == 1 and f"prompt index {PROMPTS}, but --prompts has {PROMPTS} prompts" in err
    code, _, err = evaluate(capsys, sets, *LOCAL, images=[str(sets)])  # the parent, not a model's directory
    assert code == 1 and "generator-fair is not a prompt index" in err
    code, _, err = evaluate(capsys, sets, *LOCAL, images=[f"a={sets / 'generator-good'}", f"a={sets / 'nowhere'}"])
    assert code == 1 and "the name 'a' is given twice" in err


# ---------------------------------------------------------------- the statistics, against sums done by hand

# Three models, four prompts, several images each: only a prompt's best image plays.
HAND = [
    [[5.0, 0.5], [3.0], [4.0, 1.0, 2.0], [2.0]],  # A: best 5, 3, 4, 2
    [[4.0], [3.0, 2.9], [1.0], [6.0, 0.0]],  # B: best 4, 3, 1, 6
    [[1.0], [2.0], [3.0], [1.0, 0.9]],  # C: best 1, 2, 3, 1
]


def test_win_rates_by_hand():
    best = best_scores(HAND)
    np.testing.assert_array_equal(best, [[5, 3, 4, 2], [4, 3, 1, 6], [1, 2, 3, 1]])
    # A-B: A wins prompts 0 and 2, ties 1 (half), loses 3: 2.5/4. A-C: A wins all 4. B-C: B wins 0, 1, 3: 3/4.
    expected = np.array([[0.5, 2.5 / 4, 4 / 4], [1.5 / 4, 0.5, 3 / 4], [0 / 4, 1 / 4, 0.5]])
    rates = win_rates(best)
    np.testing.assert_allclose(rates, expected)
    np.testing.assert_allclose(rates + rates.T, np.ones((3, 3)))  # W[a, b] + W[b, a] = 1
    np.testing.assert_allclose(points(outcomes(best)), expected * 4 - np.diag([2, 2, 2]))
    # A prompt one model has no score for is left out of that model's games only.
    best[2, 0] = np.nan
    rates = win_rates(best)
    assert rates[0, 2] == 1.0 and rates[1, 2] == 2 / 3 and rates[0, 1] == 2.5 / 4


def test_elo_by_hand():
    ratings = elo(points(outcomes(best_scores(HAND))))
    assert ratings[0] > ratings[1] > ratings[2]  # the order the win rates imply
    assert ratings.mean() == pytest.approx(1000)
    # Two models, 3 points to 1 over 4 games, plus one virtual tie: P(a beats b) = 3.5 / 5, so on the Elo scale
    # R_a - R_b = 400 log10(0.7 / 0.3).
    a, b = elo(np.array([[0.0, 3.0], [1.0, 0.0]]))
    assert a - b == pytest.approx(400 * math.log10(0.7 / 0.3)) and a + b == pytest.approx(2000)
    # Maximum likelihood: each model's expected points equal its points (with the virtual ties).
    pts = np.array([[0, 7, 9, 5.5], [3, 0, 6, 4], [1, 4, 0, 2.5], [4.5, 6, 7.5, 0]])
    ratings = elo(pts)
    p = 1 / (1 + 10 ** ((ratings[None, :] - ratings[:, None]) / 400))
    games = (pts + pts.T + 1) * (1 - np.eye(4))
    np.testing.assert_allclose((games * p).sum(axis=1), (pts + 0.5 * (1 - np.eye(4))).sum(axis=1), atol=1e-8)
    # A model that wins every game: finite and highest, above one that only wins most.
    undefeated = np.array([[0, 10, 10], [0, 0, 8], [0, 2, 0]], float)
    ratings = elo(undefeated)
    assert np.isfinite(ratings).all() and ratings[0] > ratings[1] > ratings[2]
    assert np.isnan(elo(np.zeros((2, 2)))).all()  # nobody played


def test_bootstrap_mean_resamples_prompts():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(2, 30))
    values[1, 4] = np.nan  # no score for one prompt: left out of that model's mean
    mean, low, high = bootstrap_mean(values, resamples=400, seed=9)
    np.testing.assert_allclose(mean, [values[0].mean(), np.nanmean(values[1])])
    # The same resamples drawn directly: 400 draws of 30 prompt indices with replacement.
    drawn = np.random.default_rng(9).integers(0, 30, size=(400, 30))
    direct = np.nanmean(values[:, drawn], axis=-1)  # (2, 400)
    np.testing.assert_allclose(low, np.quantile(direct, 0.025, axis=1))
    np.testing.assert_allclose(high, np.quantile(direct, 0.975, axis=1))
    assert (low < mean).all() and (mean < high).all()
    assert bootstrap_mean(values, 400, seed=9)[1].tolist() == low.tolist()  # same seed, same interval
    assert bootstrap_mean(values, 400, seed=10)[1].tolist() != low.tolist()
    constant = bootstrap_mean(np.full((1, 10), 2.5), 100)
    assert [x.item() for x in constant] == [2.5, 2.5, 2.5]
    assert np.isnan(bootstrap_mean(values, 0)[1]).all()  # no resamples, no interval


def test_best_of_n_by_hand():
    # Scores 1, 2, 3, 4. Best of 2: the six pairs' best are 2, 3, 4, 3, 4, 4 -> 20/6. Best of 3: the four
    # triples' best are 3, 4, 4, 4 -> 15/4. Best of 1 is the mean, best of 4 the maximum.
    assert best_of_n([4, 1, 3, 2], 1) == pytest.approx(2.5)
    assert best_of_n([4, 1, 3, 2], 2) == pytest.approx(20 / 6)
    assert best_of_n([4, 1, 3, 2], 3) == pytest.approx(15 / 4)
    assert best_of_n([4, 1, 3, 2], 4) == pytest.approx(4)
    assert best_of_n([3, 1, 3], 2) == pytest.approx(3)  # pairs (3, 1), (3, 3), (1, 3): always 3
    scores = np.random.default_rng(0).normal(size=7)
    for n in range(1, 8):  # every draw of n of 7, counted
        draws = [max(c) for c in itertools.combinations(scores, n)]
        assert best_of_n(scores, n) == pytest.approx(np.mean(draws))
    with pytest.raises(ValueError, match="best of 5 needs"):
        best_of_n([1, 2, 3, 4], 5)
    # Per model: an N counts the prompts with at least N images; the gain is over one image on those prompts.
    table = best_of_n_table([[1, 2, 3, 4], [10, 20]], [1, 2, 4, 8])
    assert table[1] == {"score": pytest.approx((2.5 + 15) / 2), "gain": 0.0, "prompts": 2}
    assert table[2] == {
        "score": pytest.approx((20 / 6 + 20) / 2),
        "gain": pytest.approx((20 / 6 - 2.5 + 5) / 2),
        "prompts": 2,
    }
    assert table[4] == {"score": 4.0, "gain": 1.5, "prompts": 1} and table[8] is None


def test_help_documents_every_flag(capsys):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["evaluate-models"]
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {"--prompts", "--images", "--model", "--server", "--out", "--json", "--bootstrap", "--seed", "--best-of",
            "--device", "--dtype", "--backend"} <= {a.option_strings[0] for a in flags}  # fmt: skip
    assert all(a.help for a in flags)
    with pytest.raises(SystemExit) as e:
        main(["evaluate-models", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(a.option_strings[0] in out for a in flags)
    for bad in ("0,2", "two", ""):
        with pytest.raises(SystemExit) as e:
            main(["evaluate-models", "--prompts", "p", "--images", "x", "--model", "demo", "--best-of", bad])
        assert e.value.code == 2 and "--best-of" in capsys.readouterr().err
