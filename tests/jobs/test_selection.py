"""`pickscore compare-selectors`: the paper's selection experiment, end to end through the CLI on real components.

The candidates come from `pickscore data synthetic --models` (fake generators of known quality, pooled: nine images a
prompt). The bundled demo model, trained on those scenes, is the judge; as a selector it picks the image the judge
scores highest, so the judge never prefers another's pick to it. The demo with its text projection negated picks the
image the judge scores lowest. Two random selectors are as good as each other. People's choices are a Pick-a-Pic
parquet whose labels are the demo's preferences, so with them as the judge every judged prompt comes out as with
the demo as the judge.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import weakref
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pickscore import Scorer
from pickscore.cli import build_parser, main
from pickscore.jobs import selection
from pickscore.model.checkpoint import resolve, save
from pickscore.server.app import ServerThread
from tests.server.conftest import settings_for

PROMPTS, PER_MODEL = 24, 3
GENERATORS = ["generator-good", "generator-fair", "generator-poor"]
LOCAL = ["--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def gens(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gens")
    argv = ["data", "synthetic", "--models", "3", "--prompts", str(PROMPTS), "--images-per-prompt", str(PER_MODEL)]
    assert main([*argv, "--out", str(out), "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def inverted(tmp_path_factory) -> str:
    """The demo with every score negated: it picks the candidate the demo scores lowest."""
    loaded = resolve("demo")
    with torch.no_grad():
        loaded.model.text_projection.neg_()
    return str(save(loaded, tmp_path_factory.mktemp("inverted") / "model"))


@pytest.fixture(scope="module")
def demo_scores(gens) -> dict[str, dict[str, float]]:
    """prompt -> candidate file -> the demo's score, computed apart from the command (one call a prompt)."""
    prompts = (gens / "prompts.txt").read_text().splitlines()
    scorer = Scorer.from_pretrained("demo", device="cpu", dtype="fp32")
    out = {}
    try:
        for index, prompt in enumerate(prompts):
            files = [f for g in GENERATORS for f in sorted((gens / g / str(index)).glob("*.png"))]
            out[prompt] = dict(zip(map(str, files), map(float, scorer.score(prompt, files))))
    finally:
        scorer.close()
    return out


def run(capsys, gens: Path, *argv: str) -> dict:
    images = [str(gens / g) for g in GENERATORS]
    code = main(["compare-selectors", "--prompts", str(gens / "prompts.txt"), "--images", *images, "--json", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def pair(report: dict, a: str, b: str) -> dict:
    return next(c for c in report["comparisons"] if (c["a"], c["b"]) == (a, b))


def test_a_scorer_judge_prefers_its_own_picks_and_random_ties_random(capsys, gens, inverted, tmp_path):
    selectors = ["pick=demo", "same=demo", f"inverted={inverted}", "random=random", "random2=random"]
    out = tmp_path / "report"
    argv = [a for s in selectors for a in ("--selector", s)]
    report = run(capsys, gens, *argv, "--judge", "demo", "--out", str(out), *LOCAL)
    assert [s["name"] for s in report["selectors"]] == ["pick", "same", "inverted", "random", "random2"]
    assert all(s["picked"] == PROMPTS for s in report["selectors"])
    assert report["candidates"]["per_prompt"] == [len(GENERATORS) * PER_MODEL] and report["skipped"] == []
    assert report["judge"] == {"kind": "scorer", "ref": "demo", "scorer": "scored once, as a selector"}
    assert len(report["comparisons"]) == 10  # every two of five selectors
    for c in report["comparisons"]:
        assert c["prompts"] + c["unjudged"] + c["no_pick"] == PROMPTS and c["unjudged"] == c["no_pick"] == 0
        low, high = c["interval"]
        assert low <= c["preferred"] <= high
    # The judge's own choice: never beaten, and clear of random.
    for other in ("inverted", "random", "random2"):
        c = pair(report, "pick", other)
        assert c["b_preferred"] == 0 and c["interval"][0] > 0.5, c
    same = pair(report, "pick", "same")  # the same model: the same image on every prompt, each a tie
    assert (same["identical"], same["preferred"], same["interval"]) == (PROMPTS, 0.5, [0.5, 0.5])
    # The judge's least favourite: never preferred, and clear below random.
    for other in ("random", "random2"):
        c = pair(report, "inverted", other)
        assert c["a_preferred"] == 0 and c["interval"][1] < 0.5, c
    chance = pair(report, "random", "random2")  # independent draws: 0.5 within the interval
    assert chance["interval"][0] < 0.5 < chance["interval"][1] and chance["identical"] < PROMPTS
    # Picks are named; report.md and report.png are written beside report.json.
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "report.png").stat().st_size > 0
    markdown = (out / "report.md").read_text()
    assert "| pick | random |" in markdown and "| A | B | A preferred | 95% CI |" in markdown
    first = report["per_prompt"][0]
    assert set(first["picks"]) == {"pick", "same", "inverted", "random", "random2"}
    assert first["picks"]["pick"].startswith(str(gens)) and first["picks"]["pick"].endswith(".png")
    # The same seed draws the same random picks; another seed other ones.
    again = run(capsys, gens, *argv, "--judge", "demo", "--bootstrap", "0", *LOCAL)
    assert [p["picks"]["random"] for p in again["per_prompt"]] == [p["picks"]["random"] for p in report["per_prompt"]]
    assert pair(again, "pick", "random")["interval"] == [None, None]
    other = run(capsys, gens, "--selector", "pick=demo", "--judge", "demo", "--seed", "1", "--bootstrap", "0", *LOCAL)
    assert [p["picks"]["random"] for p in other["per_prompt"]] != [p["picks"]["random"] for p in report["per_prompt"]]


def test_models_are_loaded_one_at_a_time(capsys, monkeypatch, gens, inverted):
    """Each in-process scorer is freed before the next loads (full-size scorers take gigabytes each)."""
    opened: list[weakref.ref] = []
    real = selection.open_place

    def open_after_the_last_is_gone(*args, **kwargs):
        assert all(ref() is None for ref in opened), "a model was still in memory when the next one loaded"
        place = real(*args, **kwargs)
        opened.append(weakref.ref(place.scorer.backend))
        return place

    monkeypatch.setattr(selection, "open_place", open_after_the_last_is_gone)
    selectors = ["--selector", "pick=demo", "--selector", f"inverted={inverted}"]
    run(capsys, gens, *selectors, "--judge", "demo", "--bootstrap", "0", *LOCAL)
    assert len(opened) == 2  # the judge is a selector: scored once


def write_choices(path: Path, gens: Path, demo_scores: dict, prompts: list[str]) -> int:
    """A Pick-a-Pic parquet judging every two candidates of ``prompts`` as the demo scores them (a tie where equal),
    the images on alternating sides; returns the rows."""
    rows = []
    for prompt in prompts:
        for k, (a, b) in enumerate(itertools.combinations(sorted(demo_scores[prompt]), 2)):
            first, second = (a, b) if k % 2 else (b, a)
            s0, s1 = demo_scores[prompt][first], demo_scores[prompt][second]
            label = (0.5, 0.5) if s0 == s1 else (1.0, 0.0) if s0 > s1 else (0.0, 1.0)
            rows.append(
                {
                    "caption": prompt,
                    "jpg_0": Path(first).read_bytes(),
                    "jpg_1": Path(second).read_bytes(),
                    "label_0": label[0],
                    "label_1": label[1],
                }
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return len(rows)


def expected_outcomes(report: dict, demo_scores: dict, a: str, b: str, judged: set[str]) -> dict[str, int]:
    """What the demo's preferences make of the report's picks for selectors a and b, worked out here."""
    count = dict.fromkeys(("a_preferred", "b_preferred", "judge_ties", "identical", "unjudged"), 0)
    for p in report["per_prompt"]:
        x, y = p["picks"][a], p["picks"][b]
        same = hashlib.sha256(Path(x).read_bytes()).digest() == hashlib.sha256(Path(y).read_bytes()).digest()
        sx, sy = demo_scores[p["prompt"]][x], demo_scores[p["prompt"]][y]
        if same:
            key = "identical"
        elif p["prompt"] not in judged:
            key = "unjudged"
        else:
            key = "a_preferred" if sx > sy else "b_preferred" if sx < sy else "judge_ties"
        count[key] += 1
    return count


def test_people_s_choices_judge_by_image_content_and_unjudged_pairs_are_counted(
    capsys, gens, inverted, demo_scores, tmp_path
):
    prompts = list(demo_scores)
    judged = set(prompts[2:])  # nobody judged the first two prompts
    export = tmp_path / "export"  # a dataset directory as `collect export` writes it
    rows = write_choices(export / "train" / "part-00000.parquet", gens, demo_scores, prompts[2:12])
    rows += write_choices(export / "test" / "part-00000.parquet", gens, demo_scores, prompts[12:])
    write_choices(export / "test_unique" / "part-00000.parquet", gens, demo_scores, prompts[12:])  # not read again
    selectors = ["--selector", "pick=demo", "--selector", f"inverted={inverted}", "--selector", "random=random"]
    report = run(capsys, gens, *selectors, "--judge-choices", str(export), *LOCAL)
    judge = report["judge"]
    assert judge["kind"] == "choices" and judge["rows"] == rows and len(judge["files"]) == 2
    for a, b in (("pick", "inverted"), ("pick", "random"), ("inverted", "random")):
        c = pair(report, a, b)
        expected = expected_outcomes(report, demo_scores, a, b, judged)
        assert {k: c[k] for k in expected} == expected and c["no_pick"] == 0
        assert c["prompts"] == PROMPTS - expected["unjudged"]
    assert pair(report, "pick", "random")["unjudged"] >= 1 and pair(report, "pick", "random")["interval"][0] > 0.5
    assert pair(report, "inverted", "random")["interval"][1] < 0.5
    # Two people disagreeing on every pair of one prompt judge it a tie: their mean.
    flipped = tmp_path / "flipped.parquet"
    write_choices(flipped, gens, {p: {f: -s for f, s in demo_scores[p].items()} for p in prompts[2:3]}, prompts[2:3])
    both = pq.read_table(flipped).to_pylist() + pq.read_table(export / "train" / "part-00000.parquet").to_pylist()
    pq.write_table(pa.Table.from_pylist(both), flipped)
    tied = run(capsys, gens, *selectors, "--judge-choices", str(flipped), "--bootstrap", "0", *LOCAL)
    c = pair(tied, "pick", "inverted")
    assert c["judge_ties"] == 1 and c["prompts"] == 10 and c["unjudged"] == PROMPTS - 10


def test_selectors_and_judge_on_a_server(capsys, gens, inverted):
    """With --server each REF is one of the servers' models, scored there."""
    with ServerThread(settings_for(f"demo=demo,inverted={inverted}")) as server:
        selectors = ["--selector", "pick=demo", "--selector", "inverted=inverted"]
        report = run(capsys, gens, *selectors, "--server", server.address, "--judge", "demo", "--bootstrap", "200")
    where = [s["scorer"] for s in report["selectors"]]
    assert where == [f"demo on {server.address}", f"{inverted} on {server.address}", "at random, seed 0"]
    assert pair(report, "pick", "random")["interval"][0] > 0.5 and pair(report, "pick", "inverted")["b_preferred"] == 0
    assert pair(report, "inverted", "random")["interval"][1] < 0.5


def test_bad_selectors_and_inputs_are_named(capsys, gens, tmp_path):
    base = ["compare-selectors", "--prompts", str(gens / "prompts.txt"), "--images", str(gens / GENERATORS[0])]
    for selectors, message in (
        (["demo"], "expected NAME=REF"),
        (["a=demo", "a=demo"], "the name 'a' is given twice"),
        (["random=demo"], "the name 'random' is given twice"),
        (["r=random"], "give a scorer to compare with random"),
    ):
        argv = [a for s in selectors for a in ("--selector", s)]
        assert main([*base, *argv, "--judge", "demo"]) == 1
        assert message in capsys.readouterr().err
    assert main([*base, "--selector", "a=demo", "--judge-choices", str(tmp_path / "none.parquet")]) == 1
    assert "none.parquet" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*base, "--selector", "a=demo"])  # a judge is required
    assert e.value.code == 2 and "--judge" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["compare-selectors"]
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    named = {"--prompts", "--images", "--selector", "--judge", "--judge-choices", "--server", "--seed", "--bootstrap"}
    named |= {"--out", "--json", "--device", "--dtype", "--backend", "--batch-size", "--max-pixels", "--timeout"}
    assert named <= {a.option_strings[0] for a in flags}
    assert all(a.help for a in flags)
    with pytest.raises(SystemExit) as e:
        main(["compare-selectors", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(a.option_strings[0] in out for a in flags)
