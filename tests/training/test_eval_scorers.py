"""`pickscore eval` as the paper's table: several scorers of any kind, people and random, best first.

The data is synthetic Pick-a-Pic with a known answer: the bundled demo model (trained on such scenes) is right
about nine pairs in ten; the untrained start of `train --init-only` knows nothing; the demo with its text
projection negated ranks every pair backwards, and the protocol's tie threshold, chosen on validation_unique,
rescues it only as far as predicting a tie everywhere. The people row comes from a real `pickscore collect export`
of two people's choices on an app with a pool of fixed pairs (tests/collect's app and visitor), whose agreement is
worked out by hand.
"""

from __future__ import annotations

import io
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pickscore import Scorer
from pickscore.backends import load_backend
from pickscore.cli import main
from pickscore.collect.settings import CollectSettings
from pickscore.datasets.pickapic import iter_pairs
from pickscore.model.checkpoint import resolve, save
from pickscore.training import evaluate as evaluate_module
from pickscore.training import metrics
from pickscore.training.synthetic import write_synthetic
from tests.collect.conftest import AppThread, Visitor
from tests.model.kind_layouts import TINY_OPEN_CLIP, open_clip_model, write_hps

LOCAL = ["--device", "cpu", "--dtype", "fp32"]
# Two people, four pairs: both pick image 0 of the first pair and image 1 of the second; on the third one of them
# calls a tie, on the fourth the other does. Exact agreement 2/4; with a tie against a choice as half, 3/4.
PEOPLE = {"ada": ["0", "1", "0", "tie"], "bob": ["0", "1", "tie", "1"]}
PEOPLE_RATE, EXACT_RATE = 0.75, 0.5


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """Pairs from a seed no stage of the demo model saw, half the prompts in each *_unique split."""
    out = tmp_path_factory.mktemp("heldout")
    write_synthetic(out, pairs=600, seed=41, held_out=0.5)
    return out


@pytest.fixture(scope="module")
def scorers(tmp_path_factory) -> dict[str, str]:
    """name -> model reference: the demo, its untrained start (`train --init-only`) and the demo inverted."""
    root = tmp_path_factory.mktemp("scorers")
    assert main(["train", "--init-only", "--preset", "tiny", "--out", str(root / "run")]) == 0
    loaded = resolve("demo")
    with torch.no_grad():
        loaded.model.text_projection.neg_()  # every score negated: each pair ranked backwards
    save(loaded, root / "inverted")
    return {"demo": "demo", "init": str(root / "run" / "init"), "inverted": str(root / "inverted")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A real `collect export` of PEOPLE's choices, made through the collection app."""
    root = tmp_path_factory.mktemp("people")
    pool = root / "pool"
    pool.mkdir()
    lines = []
    for p in range(4):
        for k in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (60 * p, 200 * k, 90)).save(buf, "PNG")
            (pool / f"{p}-{k}.png").write_bytes(buf.getvalue())
            lines.append(json.dumps({"prompt": f"pair {p}", "image": f"{p}-{k}.png", "model": f"m{k}"}) + "\n")
    (pool / "manifest.jsonl").write_text("".join(lines))
    db = f"sqlite:///{root / 'c.db'}"
    app = AppThread(CollectSettings(db=db, candidates=f"pool:{pool}", seed=9, port=0))
    try:
        by_digest = {_sha256(f.read_bytes()): f.stem for f in pool.glob("*.png")}
        for name, wants in PEOPLE.items():
            visitor = Visitor(app.url)
            visitor.sign_in(name)
            for p, want in enumerate(wants):
                visitor.post("/prompt", prompt=f"pair {p}")
                shown = by_digest[visitor.pair["image_0"]]
                label = "tie" if want == "tie" else "left" if shown == f"{p}-{want}" else "right"
                visitor.choose(label)
                assert visitor.status == 200, visitor.error
    finally:
        app.close()
    assert main(["collect", "export", "--db", db, "--out", str(root / "export")]) == 0
    return root / "export"


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def with_people(tmp_path_factory, heldout, exported) -> Path:
    """The synthetic pairs with the export's agreement.json at their root."""
    data = tmp_path_factory.mktemp("with-people") / "data"
    shutil.copytree(heldout, data)
    shutil.copy(exported / "agreement.json", data / "agreement.json")
    return data


def _eval(capsys, *args: str) -> tuple[dict, str]:
    assert main(["eval", *args, *LOCAL, "--json"]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def _probabilities(ref: str, data: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p0, label_0, label_1) of a split, scored one pair at a time through `pickscore.Scorer` (the path `score`
    takes), not through evaluate's batches."""
    scorer = Scorer.from_pretrained(ref, device="cpu", dtype="fp32")
    try:
        pairs = list(iter_pairs(data, split=split, labeled_only=True))
        s = np.array([scorer.score(p.caption, [p.image_0, p.image_1]) for p in pairs], np.float64)
    finally:
        scorer.close()
    labels = np.array([(p.label_0, p.label_1) for p in pairs])
    return metrics.preference_probabilities(s[:, 0], s[:, 1]), labels[:, 0], labels[:, 1]


def test_the_export_s_agreement_counts_a_tie_against_a_choice_as_half(exported):
    agreed = json.loads((exported / "agreement.json").read_text())
    assert (agreed["pairs"], agreed["comparisons"]) == (4, 4)
    assert agreed["tie_aware_rate"] == PEOPLE_RATE and agreed["rate"] == EXACT_RATE
    assert agreed["decisive_rate"] == 1.0 and agreed["decisive_comparisons"] == 2
    assert "0.5 when exactly one called a tie" in agreed["definitions"]["tie_aware_rate"]
    assert json.loads((exported / "export.json").read_text())["agreement"]["tie_aware_rate"] == PEOPLE_RATE


def test_the_paper_s_table_ranks_scorers_people_and_random_best_first(capsys, scorers, with_people):
    refs = scorers
    argv = [
        "--model",
        refs["demo"],
        "--model",
        refs["inverted"],
        "--baseline",
        refs["init"],
        "--data",
        str(with_people),
    ]
    result, _ = _eval(capsys, *argv)
    by_name = {row["name"]: row for row in result["ranking"]}
    names = [row["name"] for row in result["ranking"]]
    accuracies = [row["accuracy"] for row in result["ranking"]]
    assert accuracies == sorted(accuracies, reverse=True) and set(names) == {*refs.values(), "people", "random"}
    # The demo beats people, who beat the inverted demo; the untrained start is below people (above or below
    # random by chance); random is 0.5.
    assert names.index("demo") < names.index("people") < names.index(refs["inverted"])
    assert by_name[refs["init"]]["accuracy"] < PEOPLE_RATE and by_name["random"]["accuracy"] == 0.5
    assert by_name["people"] == {"name": "people", "accuracy": PEOPLE_RATE, "threshold": None, "kind": "people"}
    people = result["human_agreement"]
    assert (people["rate"], people["comparisons"], people["pairs"]) == (PEOPLE_RATE, 4, 4)
    assert people["file"] == str(with_people / "agreement.json") and "tie" in people["definition"]

    # The demo's threshold is the best one on validation_unique, not test_unique's, and its accuracy is test's there.
    validation = _probabilities("demo", with_people, "validation_unique")
    test = _probabilities("demo", with_people, "test_unique")
    threshold, _ = metrics.best_threshold(*validation)
    assert metrics.best_threshold(*test)[0] != pytest.approx(threshold, abs=1e-3)  # the split matters here
    assert result["threshold"] == pytest.approx(threshold, abs=1e-5) and result["model"] == "demo"
    assert result["accuracy"] == pytest.approx(metrics.tie_aware_accuracy(*test, threshold), abs=1e-12)
    assert result["accuracy"] > 0.85
    # Backwards on every pair, the inverted demo does best on validation by calling every pair a tie: its
    # threshold is the largest gap there, and it scores what calling ties everywhere scores on test.
    inverted = next(m for m in result["models"] if m["model"] == refs["inverted"])
    largest_gap = np.abs(2 * _probabilities(refs["inverted"], with_people, "validation_unique")[0] - 1).max()
    assert inverted["threshold"] == pytest.approx(largest_gap, abs=1e-5)
    assert inverted["accuracy"] == pytest.approx(np.where(test[1] == test[2], 1.0, 0.5).mean(), abs=1e-12)

    assert main(["eval", *argv, *LOCAL]) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in printed[1 : len(names) + 1]]
    assert [r[0] for r in rows] == names and rows[names.index("people")][1:] == ["0.7500", "-"]
    assert printed[len(names) + 2].startswith("people: ") and "4 comparisons on 4 pairs" in printed[-1]


def test_no_people_row_without_agreement_json_or_with_no_shared_pair(capsys, heldout, tmp_path):
    result, _ = _eval(capsys, "--model", "demo", "--data", str(heldout), "--limit", "20")
    assert "human_agreement" not in result and [r["name"] for r in result["ranking"]] == ["demo", "random"]
    data = tmp_path / "data"
    shutil.copytree(heldout, data)
    (data / "agreement.json").write_text(
        json.dumps({"tie_aware_rate": None, "rate": None, "comparisons": 0, "pairs": 0})
    )
    result, err = _eval(capsys, "--model", "demo", "--data", str(data), "--limit", "20")
    assert "people" not in [r["name"] for r in result["ranking"]] and result["human_agreement"]["rate"] is None
    assert "no pair was judged by two people" in err
    (data / "agreement.json").write_text("[1, 2]")
    assert main(["eval", "--model", "demo", "--data", str(data), *LOCAL]) == 1
    assert str(data / "agreement.json") in capsys.readouterr().err


def test_several_scorers_are_loaded_one_at_a_time(capsys, monkeypatch, heldout, scorers):
    """Each model is freed before the next loads (full-size scorers take gigabytes each)."""
    loaded: list[weakref.ref] = []
    real = evaluate_module.load_backend

    def load_after_the_last_is_gone(*args, **kwargs):
        assert all(ref() is None for ref in loaded), "a model was still in memory when the next one loaded"
        backend = real(*args, **kwargs)
        loaded.append(weakref.ref(backend))
        return backend

    monkeypatch.setattr(evaluate_module, "load_backend", load_after_the_last_is_gone)
    refs = [scorers["demo"], scorers["inverted"], scorers["init"]]
    result, _ = _eval(capsys, *(a for r in refs for a in ("--model", r)), "--data", str(heldout), "--limit", "10")
    assert len(loaded) == 3 and [m["model"] for m in result["models"]] == refs


def test_a_scorer_of_another_kind_is_evaluated_by_its_own_rule(heldout, tmp_path):
    """HPS v2 (its own layout) through evaluate: each pair's p0 is the softmax of HPS's own scores, the cosine its
    authors' score.py computes on open_clip (image_features @ text_features.T), not exp(logit_scale) times it."""
    hps = write_hps(tmp_path / "hps")
    result = evaluate_module.evaluate(load_backend(str(hps), device="cpu", dtype="fp32"), heldout, limit=12)
    model, transform, tokenizer = open_clip_model("hps-eval-reference", TINY_OPEN_CLIP, 99, tmp_path)
    model.load_state_dict(torch.load(hps / "HPS_v2_compressed.pt", map_location="cpu")["state_dict"])
    for split, name in (("validation", "validation_unique"), ("test", "test_unique")):
        pairs = list(iter_pairs(heldout, split=name, labeled_only=True))[:12]
        scores = [[_cosine(model, transform, tokenizer, p.caption, x) for x in (p.image_0, p.image_1)] for p in pairs]
        reference = np.array(scores)
        p0, label_0, _ = result["curves"][split]
        np.testing.assert_allclose(p0, metrics.preference_probabilities(*reference.T), atol=1e-4, rtol=0)
        np.testing.assert_array_equal(label_0, [p.label_0 for p in pairs])


@torch.no_grad()
def _cosine(model, transform, tokenizer, prompt: str, image: bytes) -> float:
    """HPS v2's score.py for one image: open_clip's normalised features, image_features @ text_features.T."""
    out = model(transform(Image.open(io.BytesIO(image)))[None], tokenizer([prompt]))
    return float(out["image_features"][0] @ out["text_features"][0])
