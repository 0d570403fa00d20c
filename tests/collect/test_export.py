"""`pickscore collect export`: the choices as the Pick-a-Pic layout that `pickscore train` and `eval` read, the
same from SQLite and PostgreSQL, with the users' agreement."""

from __future__ import annotations

import hashlib
import io
import json
import random

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pickscore.cli import main
from pickscore.collect.export import assign_splits, people_agreement
from pickscore.collect.report import agreement
from pickscore.datasets.pickapic import SCHEMA, SPLITS
from tests.collect.conftest import Visitor

PROMPTS = [
    "two red circles on the left, blue background",
    "one yellow star at the top, black background",
    "three green squares on the right, white background",
    "one purple triangle in the center, gray background",
    "two orange stars at the bottom, pink background",
    "a cat that is not a shape at all",
]


def collect(app, users=("ada", "bob", "cy"), choices_per_prompt=3, seed=0) -> list[tuple[str, str, str]]:
    """Each user goes through every prompt making a few choices; returns (user, prompt, label) in order."""
    rng = random.Random(seed)
    made = []
    for name in users:
        visitor = Visitor(app.url)
        visitor.sign_in(name)
        for prompt in PROMPTS:
            visitor.post("/prompt", prompt=prompt)
            for _ in range(choices_per_prompt):
                label = rng.choice(["left", "right", "tie", "left", "right"])
                visitor.choose(label)
                assert visitor.status == 200, visitor.error
                made.append((name, prompt, label))
    return made


def read_split(out, split):
    return pq.read_table(out / split / "part-00000.parquet")


def test_export_is_the_pickapic_layout_and_trains_and_evaluates(start_app, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    app = start_app(db=db, seed=11, image_size=64)
    made = collect(app)
    out = tmp_path / "data"
    assert main(["collect", "export", "--db", db, "--out", str(out), "--validation", "0.2", "--test", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "| train |" in printed and "Agreement between users" in printed

    tables = {split: read_split(out, split) for split in SPLITS}
    for table in tables.values():
        assert table.schema.equals(SCHEMA)
    # Every choice once, in train, validation or test; no prompt in two splits.
    main_splits = ("train", "validation", "test")
    assert sum(tables[s].num_rows for s in main_splits) == len(made)
    prompts = {s: set(tables[s]["caption"].to_pylist()) for s in SPLITS}
    assert all(prompts[s] for s in SPLITS)
    assert not (prompts["train"] & prompts["validation"] or prompts["train"] & prompts["test"])
    assert not prompts["validation"] & prompts["test"]
    for s in main_splits:
        rows = tables[s].to_pylist()
        for row in rows:
            assert row["num_example_per_prompt"] == sum(r["caption"] == row["caption"] for r in rows)
            label = {(1.0, 0.0): "left", (0.0, 1.0): "right", (0.5, 0.5): "tie"}[(row["label_0"], row["label_1"])]
            best = {"left": row["image_0_uid"], "right": row["image_1_uid"]}.get(label)
            assert row["best_image_uid"] == best and row["has_label"] and row["are_different"]
            assert Image.open(io.BytesIO(row["jpg_0"])).size == (64, 64)
    # Labels as chosen, ranking_id the choice's order.
    every = sorted((r for s in main_splits for r in tables[s].to_pylist()), key=lambda r: r["ranking_id"])
    labels = [{1.0: "left", 0.0: "right", 0.5: "tie"}[r["label_0"]] for r in every]
    assert [(r["caption"], label) for r, label in zip(every, labels)] == [(p, lab) for _, p, lab in made]
    for name in ("validation", "test"):
        unique = tables[f"{name}_unique"].to_pylist()
        assert len(unique) == len(prompts[name]) and all(r["num_example_per_prompt"] == 1 for r in unique)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["rows"]["train"] == tables["train"].num_rows
    assert manifest["ties"] == sum(label == "tie" for *_, label in made)

    # The dataset trains and evaluates.
    run = tmp_path / "run"
    train = ["train", "--preset", "tiny", "--data", str(out), "--out", str(run), "--max-steps", "6"]
    assert main([*train, "--eval-every", "3", "--save-every", "3", "--global-batch", "8"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(run / "last"), "--data", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["accuracy"] <= 1 and "validation_accuracy" in result


def test_sqlite_and_postgresql_export_the_same_dataset(start_app, tmp_path, postgres_url):
    outs = []
    for kind, db in (("sqlite", f"sqlite:///{tmp_path / 'c.db'}"), ("postgresql", postgres_url)):
        app = start_app(db=db, seed=4, image_size=48)
        collect(app, users=("ada", "bob"), choices_per_prompt=2, seed=1)
        app.close()
        out = tmp_path / kind
        assert main(["collect", "export", "--db", db, "--out", str(out)]) == 0
        outs.append(out)
    sqlite_out, pg_out = outs
    for split in SPLITS:
        a, b = read_split(sqlite_out, split), read_split(pg_out, split)
        # created_at is when each choice was made, which differs between the two runs; everything else is equal.
        assert a.drop_columns(["created_at"]).equals(b.drop_columns(["created_at"])), split
    for name in ("agreement.json", "export.json"):
        assert json.loads((sqlite_out / name).read_text()) == json.loads((pg_out / name).read_text())


def test_agreement_between_users_on_the_same_pair(start_app, tmp_path):
    """A pool with two images per prompt shows every user the same pairs, in either order."""
    gens = tmp_path / "pool"
    gens.mkdir()
    lines = []
    for p, prompt in enumerate(["a fox", "an owl", "a whale"]):
        for k in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (80 * p, 120 * k, 40)).save(buf, "PNG")
            (gens / f"{p}-{k}.png").write_bytes(buf.getvalue())
            lines.append(json.dumps({"prompt": prompt, "image": f"{p}-{k}.png", "model": f"m{k}"}) + "\n")
    (gens / "manifest.jsonl").write_text("".join(lines))
    db = f"sqlite:///{tmp_path / 'c.db'}"
    app = start_app(db=db, candidates=f"pool:{gens}", seed=9)
    # Each user says which image they prefer by its file, whatever side it is shown on.
    prefers = {
        "ada": ["0-0.png", "1-0.png", "tie"],
        "bob": ["0-0.png", "1-1.png", "tie"],
        "cy": ["0-1.png", "1-1.png", "tie"],
    }
    files = [f"{p}-{k}.png" for p in range(3) for k in range(2)]
    ids = {hashlib.sha256((gens / f).read_bytes()).hexdigest(): f for f in files}
    for name, wants in prefers.items():
        visitor = Visitor(app.url)
        visitor.sign_in(name)
        for prompt, want in zip(["a fox", "an owl", "a whale"], wants):
            visitor.post("/prompt", prompt=prompt)
            pair = visitor.pair
            label = "tie" if want == "tie" else "left" if ids[pair["image_0"]] == want else "right"
            visitor.choose(label)
            assert visitor.status == 200, visitor.error
    out = tmp_path / "out"
    assert main(["collect", "export", "--db", db, "--out", str(out)]) == 0
    report = json.loads((out / "agreement.json").read_text())
    # fox: ada=bob, ada!=cy, bob!=cy; owl: bob=cy only; whale: all tie -> 1 + 1 + 3 of 9 comparisons agree.
    assert report["pairs"] == 3 and report["comparisons"] == 9
    assert report["rate"] == pytest.approx(5 / 9)
    assert report["decisive_rate"] == pytest.approx(2 / 6)
    assert report["tie_aware_rate"] == pytest.approx(5 / 9)  # no tie against a choice here: as exact agreement
    assert set(report["definitions"]) >= {"tie_aware_rate", "rate", "decisive_rate", "comparisons", "pairs"}
    names = app.store.user_names()
    per_user = {names[int(u)]: (v["agreed"], v["comparisons"]) for u, v in report["users"].items()}
    assert per_user == {"ada": (3, 6), "bob": (4, 6), "cy": (3, 6)}


def test_agreement_counts_each_user_s_latest_judgment_and_ignores_unshared_pairs():
    def c(user, a, b, label, prompt="p"):
        return {"user_id": user, "image_0": a, "image_1": b, "label": label, "prompt": prompt}

    choices = [
        c(1, "x", "y", "right"),
        c(1, "x", "y", "left"),  # user 1 changed their mind: latest counts
        c(2, "y", "x", "right"),  # same pair, sides swapped: prefers x as well
        c(3, "x", "y", "left", prompt="q"),  # another prompt: a different pair, judged once
    ]
    report = agreement(choices)
    assert (report["pairs"], report["comparisons"], report["rate"]) == (1, 1, 1.0)
    assert set(report["users"]) == {1, 2}
    assert agreement([c(1, "x", "y", "left")])["rate"] is None


def test_tie_aware_agreement_counts_a_tie_against_a_choice_as_half():
    """The people row of `pickscore eval`: two people's choices scored as eval scores a model against a person."""

    def c(user, label, prompt="p", a="x", b="y"):
        return {"user_id": user, "image_0": a, "image_1": b, "label": label, "prompt": prompt}

    choices = [
        c(1, "left"),  # p: 1 chose x, 2 called a tie, 3 chose y (shown on the other side): 0.5, 0 and 0.5
        c(2, "tie"),
        c(3, "left", a="y", b="x"),
        c(1, "tie", prompt="q"),  # q: both called a tie: 1
        c(2, "tie", prompt="q"),
        c(1, "right", prompt="r"),  # r: both chose y: 1
        c(2, "left", prompt="r", a="y", b="x"),
    ]
    agreed = people_agreement(choices)
    assert (agreed["comparisons"], agreed["decisive_comparisons"], agreed["pairs"]) == (5, 2, 3)
    assert agreed["tie_aware_rate"] == pytest.approx((0.5 + 0 + 0.5 + 1 + 1) / 5)
    assert agreed["rate"] == pytest.approx(2 / 5) and agreed["decisive_rate"] == pytest.approx(1 / 2)
    assert people_agreement([c(1, "left")])["tie_aware_rate"] is None


def test_splits_are_by_prompt_stable_and_never_empty_with_three_prompts():
    prompts = {f"prompt {k}" for k in range(2000)}
    split = assign_splits(prompts, 0.1, 0.2, seed=0)
    share = {name: sum(v == name for v in split.values()) / len(prompts) for name in ("validation", "test")}
    assert share["validation"] == pytest.approx(0.1, abs=0.02) and share["test"] == pytest.approx(0.2, abs=0.03)
    more = assign_splits(prompts | {f"new {k}" for k in range(500)}, 0.1, 0.2, seed=0)
    assert all(more[p] == split[p] for p in prompts)  # more data never moves a prompt
    assert assign_splits(prompts, 0.1, 0.2, seed=1) != split
    small = assign_splits({"a", "b", "c"}, 0.01, 0.01)
    assert sorted(small.values()) == ["test", "train", "validation"]
    # As many prompts as splits asked for: one each, whatever the fractions.
    assert sorted(assign_splits({"a", "b", "c"}, 0.45, 0.45).values()) == ["test", "train", "validation"]
    assert sorted(assign_splits({"a", "b"}, 0.3, 0).values()) == ["train", "validation"]
    with pytest.raises(ValueError, match="sum below 1"):
        assign_splits(prompts, 0.6, 0.5)


def test_export_refuses_a_collection_too_small_for_its_splits_and_says_what_each_got(start_app, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    app = start_app(db=db, seed=2, image_size=32)
    ada = Visitor(app.url)
    ada.sign_in("ada")
    for prompt in PROMPTS[:2]:
        ada.post("/prompt", prompt=prompt)
        ada.choose("left")
        assert ada.status == 200, ada.error
    out = tmp_path / "data"
    assert main(["collect", "export", "--db", db, "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "2 prompts" in error and "3 prompts" in error and "--validation 0" in error
    assert not out.exists()  # nothing half-written
    # Asking for validation only needs two prompts; every split's rows and prompts are said.
    assert main(["collect", "export", "--db", db, "--out", str(out), "--test", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| train | 1 | 1 |" in printed and "| validation | 1 | 1 |" in printed and "| test | 0 | 0 |" in printed
    assert json.loads((out / "export.json").read_text())["prompts"]["test"] == 0
    # Everything to train is what --validation 0 --test 0 asks for.
    everything = ["--validation", "0", "--test", "0"]
    assert main(["collect", "export", "--db", db, "--out", str(tmp_path / "all"), *everything]) == 0
    assert "| train | 2 | 2 |" in capsys.readouterr().out


@pytest.mark.parametrize("given", ["{path}", "sqlite:///{path}"])
def test_export_refuses_a_missing_sqlite_file_and_creates_nothing(tmp_path, capsys, given):
    path = tmp_path / "nosuch.db"
    out = tmp_path / "data"
    assert main(["collect", "export", "--db", given.format(path=path), "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and str(path) in error and "no such" in error
    assert not path.exists() and not out.exists()
