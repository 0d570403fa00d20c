"""``pickscore collect export``: the collected choices as a Pick-a-Pic dataset that ``pickscore train`` and
``pickscore eval`` read, with the users' agreement.

    export(store, "data/mine")   # DIR/<split>/part-00000.parquet for the five splits, agreement.json, export.json

agreement.json is ``report.agreement`` over every choice of the export, with ``tie_aware_rate`` added (the people row
``pickscore eval`` prints beside the models: two people's choices for one pair scored against each other with the
points eval gives a model) and ``definitions``, a sentence per figure saying what it counts.

Rows follow ``pickscore.training.data.SCHEMA``: the prompt, both images' bytes, label_0/label_1 (1/0, 0/1, or 0.5/0.5
for a tie), the models, the image ids (SHA-256), the user, the choice id as ``ranking_id`` and its time.

Splits are by prompt, so no prompt is in two of them: a prompt's SHA-256 (salted by ``seed``) places it in
validation, test or train by fixed fractions, so a prompt stays in its split as more data arrives. With at least
as many prompts as splits asked for (train, and validation and test unless their fraction is 0), each gets one even
when the fractions round to none; with fewer, ``export`` refuses rather than write an empty split that training
would validate on, or evaluation test on, without a word. ``num_example_per_prompt``
counts a prompt's rows in its split; ``validation_unique`` and ``test_unique`` keep each prompt's first row.
Same database contents, same files, whichever database they are in.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pickscore.collect.report import agreement
from pickscore.collect.store import Store
from pickscore.datasets.pickapic import SCHEMA, SPLITS
from pickscore.errors import InvalidInput

ROW_GROUP = 256


def _position(prompt: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(prompts: set[str], validation: float, test: float, seed: int = 0) -> dict[str, str]:
    """prompt -> "validation", "test" or "train", by each prompt's hash position; with at least as many prompts as
    ``asked_splits``, each of those gets one (the lowest-placed prompt of the largest split moves to an empty one)."""
    if not (0 <= validation and 0 <= test and validation + test < 1):
        raise ValueError(f"split fractions: validation {validation} and test {test} must be >= 0 and sum below 1")
    position = {p: _position(p, seed) for p in prompts}
    split = {
        p: "validation" if x < validation else "test" if x < validation + test else "train" for p, x in position.items()
    }
    for name in asked_splits(validation, test):  # small collections still get something in every split
        if name not in split.values():
            sizes = Counter(split.values())
            donor = max(sizes, key=lambda s: (sizes[s], s), default=None)  # the largest; by name on a tie
            if donor is not None and sizes[donor] > 1:
                split[min((p for p in prompts if split[p] == donor), key=position.__getitem__)] = name
    return split


def asked_splits(validation: float, test: float) -> list[str]:
    """The splits that must not be empty: train, and validation and test unless their fraction is 0."""
    return ["train"] + [name for name, fraction in (("validation", validation), ("test", test)) if fraction > 0]


def check_splits(split_of: dict[str, str], validation: float, test: float) -> None:
    """InvalidInput when an asked split got no prompt, naming how many prompts there are and how many it takes."""
    asked = asked_splits(validation, test)
    if not split_of:
        raise InvalidInput("collect export: the database holds no choices yet; nothing to export")
    if set(asked) <= set(split_of.values()):
        return
    names = ", ".join(asked[:-1]) + " and " + asked[-1]
    prompts = f"{len(split_of)} prompt{'s' * (len(split_of) != 1)}"
    raise InvalidInput(
        f"collect export: {prompts}, but {names} need one each ({len(asked)} prompts); collect more, or give "
        "--validation 0 --test 0 to export every prompt to train"
    )


AGREEMENT_DEFINITIONS = {
    "tie_aware_rate": "people's agreement as `pickscore eval` scores a model against a person (the paper's human "
    "baseline): for every two people who chose for the same pair (the same prompt and two images, on either side; "
    "each person's latest choice; every split of this export), 1 when both chose the same image or both called a "
    "tie, 0.5 when exactly one called a tie, 0 when they chose opposite images; the mean over those comparisons",
    "rate": "the fraction of those comparisons where both chose the same image or both called a tie (a tie against "
    "a choice counts as disagreement)",
    "decisive_rate": "rate over the decisive_comparisons, those where neither called a tie",
    "comparisons": "one per two people who chose for the same pair",
    "pairs": "pairs chosen for by two or more people",
    "users": "per user id: the comparisons they take part in, and how many agree exactly (as rate)",
}


def people_agreement(choices: list[dict[str, Any]]) -> dict[str, Any]:
    """``report.agreement`` with ``tie_aware_rate`` and ``definitions`` (``AGREEMENT_DEFINITIONS``).

    The tie-aware points come from agreement's counts: of C comparisons, A agree exactly and D are decisive, A_d of
    them agreeing; the other C - D have a tie, and A - A_d of those are two ties (1 point each), the rest one tie
    (0.5 each); so the points are A + (C - D - (A - A_d)) / 2."""
    agreed = agreement(choices)
    comparisons, decisive = agreed["comparisons"], agreed["decisive_comparisons"]
    exact = round((agreed["rate"] or 0.0) * comparisons)  # counts, back from agreement's fractions
    decisive_exact = round((agreed["decisive_rate"] or 0.0) * decisive)
    points = exact + (comparisons - decisive - (exact - decisive_exact)) / 2
    return {
        "tie_aware_rate": points / comparisons if comparisons else None,
        **agreed,
        "definitions": AGREEMENT_DEFINITIONS,
    }


def export(
    store: Store, out: str | Path, validation: float = 0.1, test: float = 0.1, seed: int = 0, progress: bool = False
) -> dict[str, Any]:
    """Write the dataset under ``out``; return what export.json says (rows per split, agreement)."""
    out = Path(out)
    choices = list(store.choices())
    split_of = assign_splits({c["prompt"] for c in choices}, validation, test, seed)
    check_splits(split_of, validation, test)
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in choices:
        rows[split_of[c["prompt"]]].append(c)
    for name in ("validation", "test"):
        first: dict[str, dict[str, Any]] = {}
        for c in rows[name]:
            first.setdefault(c["prompt"], c)
        rows[f"{name}_unique"] = list(first.values())
    total = sum(len(rows[s]) for s in SPLITS)
    with tqdm(total=total, unit="pair", disable=not progress or None, file=sys.stderr, desc="export") as bar:
        for split in SPLITS:
            _write_split(store, out / split / "part-00000.parquet", rows[split], bar)
    agreed = people_agreement(choices)
    (out / "agreement.json").write_text(json.dumps(agreed, indent=2) + "\n")
    manifest = {
        "rows": {s: len(rows[s]) for s in SPLITS},
        "prompts": {s: len({c["prompt"] for c in rows[s]}) for s in SPLITS},
        "fractions": {"validation": validation, "test": test, "seed": seed},
        "ties": sum(c["label"] == "tie" for c in choices),
        "agreement": {k: agreed[k] for k in ("tie_aware_rate", "rate", "decisive_rate", "comparisons", "pairs")},
    }
    (out / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_split(store: Store, path: Path, rows: list[dict[str, Any]], bar: tqdm) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    per_prompt = Counter(c["prompt"] for c in rows)
    tmp = path.with_suffix(".parquet.tmp")
    with pq.ParquetWriter(tmp, SCHEMA) as writer:
        if not rows:
            writer.write_table(SCHEMA.empty_table())
        for start in range(0, len(rows), ROW_GROUP):
            chunk = rows[start : start + ROW_GROUP]
            images = store.images([i for c in chunk for i in (c["image_0"], c["image_1"])])
            table = pa.Table.from_pylist([_columns(c, images, per_prompt) for c in chunk], schema=SCHEMA)
            writer.write_table(table, row_group_size=ROW_GROUP)
            bar.update(len(chunk))
    tmp.replace(path)


def _columns(c: dict[str, Any], images: dict[str, bytes], per_prompt: Counter[str]) -> dict[str, Any]:
    best = {"left": c["image_0"], "right": c["image_1"]}.get(c["label"])  # null for a tie
    return {
        "caption": c["prompt"],
        "jpg_0": images[c["image_0"]],
        "jpg_1": images[c["image_1"]],
        "label_0": c["label_0"],
        "label_1": c["label_1"],
        "has_label": True,
        "are_different": c["image_0"] != c["image_1"],
        "num_example_per_prompt": per_prompt[c["prompt"]],
        "model_0": c["model_0"],
        "model_1": c["model_1"],
        "best_image_uid": best,
        "image_0_uid": c["image_0"],
        "image_1_uid": c["image_1"],
        "user_id": c["user_id"],
        "ranking_id": c["id"],
        "created_at": c["chosen_at"],
    }


def markdown(manifest: dict[str, Any], agreed: dict[str, Any], names: dict[int, str]) -> str:
    """``agreed`` as agreement.json holds it (user ids as strings)."""
    lines = ["| split | rows | prompts |", "|---|---:|---:|"]
    lines += [f"| {s} | {manifest['rows'][s]} | {manifest['prompts'][s]} |" for s in SPLITS]
    rate = agreed["rate"]
    lines += [
        "",
        f"Agreement between users: {'-' if rate is None else f'{rate:.3f}'} over {agreed['comparisons']} "
        f"comparisons on {agreed['pairs']} pairs judged by two or more users"
        + ("" if agreed["decisive_rate"] is None else f"; {agreed['decisive_rate']:.3f} leaving out ties")
        + (
            ""
            if rate is None
            else f"; {agreed['tie_aware_rate']:.3f} with a tie against a choice as half "
            "(the people row of `pickscore eval`)"
        ),
    ]
    if agreed["users"]:
        lines += ["", "| user | comparisons | agreed | rate |", "|---|---:|---:|---:|"]
        for user, u in agreed["users"].items():
            lines.append(f"| {names.get(int(user), user)} | {u['comparisons']} | {u['agreed']} | {u['rate']:.3f} |")
    return "\n".join(lines)
