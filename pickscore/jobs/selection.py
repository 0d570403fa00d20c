"""``pickscore compare-selectors``: the paper's selection experiment (Kirstain et al. 2023, section 5). Scorers each
pick the best of a prompt's N candidate images, and a judge says whose pick is better.

    pickscore compare-selectors --prompts gens/prompts.txt --images gens/generator-* \\
        --selector pickscore=demo --selector clip=runs/init --judge-choices data/mine --out selection

A prompt's candidates are every ``--images`` set's images for it (``datasets.prompts``, ``datasets.image_sets``, as
evaluate-models reads them), pooled. A selector picks one: a scorer (any model reference, loaded in this process
one at a time; or one of ``--server``'s models) its highest-scoring candidate, ``random`` one at random (seeded).
The judge is a scorer (the higher-scoring pick wins) or people's choices (Pick-a-Pic-layout rows naming two images
by content: matched to the picks by the prompt and the SHA-256 of the images' bytes). For every two selectors the
report gives how often the judge prefers A's pick over B's, judge ties and identical picks counting half, with a
percentile bootstrap interval over prompts (``model_stats``); a pair no choice judged is counted as unjudged.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import sys
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pickscore.datasets.image_sets import load_image_set, parse_image_set
from pickscore.datasets.prompts import Prompt, read_prompts
from pickscore.errors import InvalidInput, item_reason
from pickscore.jobs.model_stats import LEVEL, bootstrap_mean, json_number
from pickscore.places import Place, open_place

RANDOM = "random"  # the REF of a selector that picks at random
CHOICE_SPLITS = ("train", "validation", "test")  # a dataset directory's splits; the *_unique ones repeat rows
MEANING = (  # of a comparison's "preferred"
    "the fraction of prompts on which the judge prefers A's pick over B's, a judge's tie and identical picks "
    "counting half, over the prompts both selectors picked for and the judge judged"
)

Item = tuple[str, Callable[[], Path | bytes | None]]  # a candidate: its label and how to load it
Prefer = Callable[[int, int, int], float | None]  # (prompt, candidate i, candidate j) -> points of i, None: unjudged


@dataclass(frozen=True)
class Selector:
    name: str
    ref: str  # a model reference (a server's model name with --server), or RANDOM


def parse_selectors(specs: Sequence[str]) -> list[Selector]:
    """``--selector NAME=REF`` each -> the selectors, with ``random`` added unless one already picks at random."""
    selectors = []
    for text in specs:
        name, sep, ref = text.partition("=")
        if not sep or not name.strip() or not ref.strip():
            raise InvalidInput(f"--selector {text!r}: expected NAME=REF (a model reference, or {RANDOM})")
        selectors.append(Selector(name.strip(), ref.strip()))
    if not any(s.ref == RANDOM for s in selectors):
        selectors.append(Selector(RANDOM, RANDOM))
    names = [s.name for s in selectors]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInput(f"--selector: the name {repeated[0]!r} is given twice (the random selector is named random)")
    if len(selectors) < 2:
        raise InvalidInput("--selector: give a scorer to compare with random, or two selectors")
    return selectors


def candidates(prompts: Sequence[Prompt], specs: Sequence[str]) -> list[list[Item]]:
    """``--images`` (NAME=PATH or PATH each) -> per prompt, every set's images for it, in the order given."""
    sets = [load_image_set(name, path, prompts) for name, path in map(parse_image_set, specs)]
    return [[item for s in sets for item in s.per_prompt[p.index]] for p in prompts]


def score_items(
    place: Place, prompts: Sequence[Prompt], items: Sequence[Sequence[Item]], who: str, progress: bool = True
) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Each prompt's ``items`` scored by ``place`` (one call a prompt) -> per prompt their scores (NaN where an image
    failed or is absent), and the images that could not be scored, with ``who`` and the reason."""
    out, skipped = [], []
    for prompt, row in tqdm(
        list(zip(prompts, items)), unit="prompt", desc=who, disable=not progress or None, file=sys.stderr
    ):
        images = [load() for _, load in row]
        ok = [k for k, image in enumerate(images) if image is not None]
        values = np.full(len(row), np.nan)
        errors: dict[int, Any] = {}
        if ok:
            scored, errors = place.score_all(prompt.text, [images[k] for k in ok], skip_invalid=True)
            values[ok] = scored
        for k, (label, _) in enumerate(row):
            if images[k] is None or not np.isfinite(values[k]):
                where = ok.index(k) if k in ok else None
                reason = "no image (null)" if where is None else item_reason(errors.get(where, "not scored"))
                skipped.append({"by": who, "prompt_index": prompt.index, "image": label, "error": reason})
        out.append(values)
    return out, skipped


def best(scores: Sequence[np.ndarray]) -> list[int | None]:
    """Per prompt, the candidate with the highest finite score (the first of equals), or None when none scored."""
    return [int(np.nanargmax(s)) if np.isfinite(s).any() else None for s in scores]


def random_picks(name: str, seed: int, counts: Sequence[int]) -> list[int | None]:
    """Per prompt, a candidate drawn uniformly from its ``counts[p]``; seeded by ``seed`` and the selector's name,
    so two random selectors draw apart and the same command draws the same."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return [int(rng.integers(n)) if n else None for n in counts]


def digests(items: Sequence[Sequence[Item]], picks: Sequence[Sequence[int | None]]) -> list[dict[int, str | None]]:
    """Per prompt, the SHA-256 of each picked candidate's bytes (None: no image): picks are told apart by content."""
    out = []
    for p, row in enumerate(items):
        picked = {sel[p] for sel in picks if sel[p] is not None}
        out.append({k: _sha256(row[k][1]()) for k in sorted(picked)})
    return out


def _sha256(image: Path | bytes | None) -> str | None:
    if image is None:
        return None
    return hashlib.sha256(image if isinstance(image, bytes) else Path(image).read_bytes()).hexdigest()


def scorer_judge(scores: Sequence[dict[int, float]]) -> Prefer:
    """A scorer as the judge, from its scores of each prompt's picks: the higher wins, equal scores tie."""

    def prefer(p: int, i: int, j: int) -> float | None:
        a, b = scores[p].get(i, np.nan), scores[p].get(j, np.nan)
        if not (np.isfinite(a) and np.isfinite(b)):
            return None
        return 1.0 if a > b else 0.0 if a < b else 0.5

    return prefer


def read_choices(source: str | Path) -> tuple[dict[tuple[str, str, str], list[float]], list[str]]:
    """People's choices -> (prompt, SHA-256 a, SHA-256 b with a < b) -> the points each row gives image a (1 chosen,
    0 the other chosen, 0.5 a tie), and the files read. ``source``: a Pick-a-Pic parquet file, a directory or glob
    of them, or a dataset directory (``collect export``'s: its train, validation and test splits)."""
    from pickscore.datasets.pickapic import find_split_files, iter_pairs

    path = Path(source)
    files = []
    if path.is_dir() and not any(path.glob("*.parquet")):
        for split in CHOICE_SPLITS:
            try:
                files += find_split_files(path, split)
            except FileNotFoundError:
                continue
    files = files or find_split_files(source)
    judged: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for file in files:
        for pair in iter_pairs(file, labeled_only=True):
            a, b = (hashlib.sha256(x).hexdigest() for x in (pair.image_0, pair.image_1))
            if a == b:
                continue
            first = 0.5 if pair.label_0 == pair.label_1 else float(pair.label_0 > pair.label_1)
            key = (pair.caption.strip(), min(a, b), max(a, b))
            judged[key].append(first if a < b else 1.0 - first)
    return judged, [str(f) for f in files]


def choices_judge(
    judged: dict[tuple[str, str, str], list[float]], prompts: Sequence[Prompt], sha: Sequence[dict[int, str | None]]
) -> Prefer:
    """People's choices as the judge: the mean of the points their rows give i's image against j's for the prompt;
    None when no row judges that pair."""

    def prefer(p: int, i: int, j: int) -> float | None:
        a, b = sha[p][i], sha[p][j]
        points = judged.get((prompts[p].text, min(a, b), max(a, b))) if a and b else None
        if not points:
            return None
        first = float(np.mean(points))
        return first if a < b else 1.0 - first

    return prefer


def compare(
    names: Sequence[str],
    picks: Sequence[Sequence[int | None]],
    sha: Sequence[dict[int, str | None]],
    prefer: Prefer,
    resamples: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Every two selectors A, B (in the order given): the judge's points for A's pick per prompt, their mean with
    its bootstrap interval over prompts, and what each prompt came to. Identical picks (same bytes) score 0.5."""
    pairs = list(itertools.combinations(range(len(names)), 2))
    points = np.full((len(pairs), len(sha)), np.nan)
    counts = []
    for row, (a, b) in enumerate(pairs):
        count = dict.fromkeys(("a_preferred", "b_preferred", "judge_ties", "identical", "unjudged", "no_pick"), 0)
        for p in range(len(sha)):
            i, j = picks[a][p], picks[b][p]
            if i is None or j is None:
                outcome, value = "no_pick", None
            elif i == j or sha[p][i] is not None and sha[p][i] == sha[p][j]:
                outcome, value = "identical", 0.5
            else:
                value = prefer(p, i, j)
                outcome = _outcome(value)
            count[outcome] += 1
            points[row, p] = np.nan if value is None else value
        counts.append(count)
    mean, low, high = bootstrap_mean(points, resamples, seed)
    return [
        {
            "a": names[a],
            "b": names[b],
            "preferred": json_number(mean[k]),
            "interval": [json_number(low[k]), json_number(high[k])],
            "prompts": int(np.isfinite(points[k]).sum()),
            **counts[k],
        }
        for k, (a, b) in enumerate(pairs)
    ]


def _outcome(value: float | None) -> str:
    """What the judge's points for A's pick (None: unjudged) count as."""
    if value is None:
        return "unjudged"
    return "a_preferred" if value > 0.5 else "b_preferred" if value < 0.5 else "judge_ties"


def compare_selectors(args: argparse.Namespace, progress: bool = True) -> dict[str, Any]:
    """Read, pick, judge and compare as the subcommand's ``args`` say -> the report (what report.json holds)."""
    prompts = read_prompts(args.prompts)
    items = candidates(prompts, args.images)
    selectors = parse_selectors(args.selector)
    choices = read_choices(args.judge_choices) if args.judge_choices else None  # a bad file fails before any model
    picks: list[list[int | None]] = []
    scores_by_ref: dict[str, list[np.ndarray]] = {}
    described, skipped = [], []
    for s in selectors:
        if s.ref == RANDOM:
            picks.append(random_picks(s.name, args.seed, [len(row) for row in items]))
            described.append({"name": s.name, "ref": s.ref, "scorer": f"at random, seed {args.seed}"})
            continue
        if s.ref not in scores_by_ref:
            scores_by_ref[s.ref], missed, where = _scored(args, s.ref, prompts, items, s.name, progress)
            skipped += missed
        picks.append(best(scores_by_ref[s.ref]))
        described.append({"name": s.name, "ref": s.ref, "scorer": where})
    sha = digests(items, picks)
    if choices is None:
        prefer, judge, missed = _scorer_judge(args, prompts, items, sha, scores_by_ref, progress)
        skipped += missed
    else:
        judged, files = choices
        prefer = choices_judge(judged, prompts, sha)
        judge = {"kind": "choices", "files": files, "pairs": len(judged), "rows": sum(map(len, judged.values()))}
    names = [s.name for s in selectors]
    return {
        "prompts_file": str(args.prompts),
        "prompts": len(prompts),
        "candidates": {"inputs": list(args.images), "per_prompt": sorted({len(row) for row in items})},
        "selectors": [{**d, "picked": sum(k is not None for k in pk)} for d, pk in zip(described, picks)],
        "judge": judge,
        "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "level": LEVEL, "unit": "prompt"},
        "preferred_means": MEANING,
        "comparisons": compare(names, picks, sha, prefer, args.bootstrap, args.seed),
        "skipped": skipped,
        "per_prompt": [
            {"index": p.index, "prompt": p.text, "picks": {n: _label(items[i], pk[i]) for n, pk in zip(names, picks)}}
            for i, p in enumerate(prompts)
        ],
    }


def _label(row: Sequence[Item], k: int | None) -> str | None:
    return None if k is None else row[k][0]


def _scored(
    args: argparse.Namespace,
    ref: str,
    prompts: Sequence[Prompt],
    items: Sequence[Sequence[Item]],
    who: str,
    progress: bool,
) -> tuple[list[np.ndarray], list[dict[str, Any]], str]:
    """``items`` scored by the model ``ref`` (loaded here, or a model of --server's) -> (scores, skipped images,
    what scored). The model is freed before this returns (its place was this function's only reference to it), so
    the next one loads into its memory."""
    with _open(args, ref) as place:
        scores, skipped = score_items(place, prompts, items, who, progress)
        where = place.name
    gc.collect()  # a model's tensors in reference cycles too; torch's CUDA allocator reuses the blocks for the next
    return scores, skipped, where


def _scorer_judge(
    args: argparse.Namespace,
    prompts: Sequence[Prompt],
    items: Sequence[Sequence[Item]],
    sha: Sequence[dict[int, str | None]],
    scores_by_ref: dict[str, list[np.ndarray]],
    progress: bool,
) -> tuple[Prefer, dict[str, Any], list[dict[str, Any]]]:
    """--judge REF: the picks' scores by that scorer (a selector's own when it is one: not loaded twice)."""
    picked = [sorted(s) for s in sha]
    skipped: list[dict[str, Any]] = []
    if args.judge in scores_by_ref:
        scores = [{k: float(scores_by_ref[args.judge][p][k]) for k in ks} for p, ks in enumerate(picked)]
        where = "scored once, as a selector"
    else:
        subset = [[items[p][k] for k in ks] for p, ks in enumerate(picked)]
        values, skipped, where = _scored(args, args.judge, prompts, subset, "judge", progress)
        scores = [dict(zip(ks, map(float, v))) for ks, v in zip(picked, values)]
    return scorer_judge(scores), {"kind": "scorer", "ref": args.judge, "scorer": where}, skipped


def _open(args: argparse.Namespace, ref: str) -> Place:
    """``ref`` loaded in this process (with the backend flags), or with --server the servers' model of that name."""
    if args.server:
        from pickscore.tls import connection

        servers = args.server.split(",")
        return open_place(servers=servers, model_name=ref, timeout=args.timeout, connection=connection(args))
    from pickscore.backends import backend_options

    return open_place(ref, batch_size=args.batch_size, max_pixels=args.max_pixels, **backend_options(args))


def markdown(report: dict[str, Any], skipped_in: str | None = None) -> str:
    """The report as markdown: what was compared, a row per pair of selectors, then the images left out (a pointer
    to ``skipped_in``, the report.json beside it, when given; else listed)."""
    judge = report["judge"]
    judged_by = (
        f"{judge['ref']} ({judge['scorer']}): the pick it scores higher is preferred, equal scores tie"
        if judge["kind"] == "scorer"
        else f"people's choices ({judge['rows']} on {judge['pairs']} pairs, from {', '.join(judge['files'])})"
    )
    boot = report["bootstrap"]
    sizes = report["candidates"]["per_prompt"]
    lines = [
        "## Which selector's pick the judge prefers",
        "",
        f"{report['prompts']} prompts, {sizes[0] if len(sizes) == 1 else f'{sizes[0]} to {sizes[-1]}'} candidates "
        "each; "
        "selectors: "
        + "; ".join(f"{s['name']} ({s['scorer']}, {s['picked']} picks)" for s in report["selectors"])
        + f". Judge: {judged_by}.",
        "",
        f"A preferred: {report['preferred_means']}. "
        + (
            f"Intervals: {boot['level']:.0%} percentile bootstrap, {boot['resamples']} resamples of the prompts, "
            f"seed {boot['seed']}."
            if boot["resamples"]
            else "No intervals (--bootstrap 0)."
        ),
        "",
        "| A | B | A preferred | 95% CI | prompts | A's pick | B's pick | judge ties | identical picks | unjudged | "
        "no pick |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["comparisons"]:
        low, high = c["interval"]
        interval = "–" if low is None or high is None else f"{low:.3f} – {high:.3f}"
        preferred = "–" if c["preferred"] is None else f"{c['preferred']:.3f}"
        lines.append(
            f"| {c['a']} | {c['b']} | {preferred} | {interval} | {c['prompts']} | {c['a_preferred']} | "
            f"{c['b_preferred']} | {c['judge_ties']} | {c['identical']} | {c['unjudged']} | {c['no_pick']} |"
        )
    skipped = report["skipped"]
    if skipped and skipped_in:
        lines += ["", f"{len(skipped)} images could not be scored and were left out (see {skipped_in})."]
    elif skipped:
        lines += ["", "Images that could not be scored, left out:", "", "| by | prompt | image | reason |"]
        lines += ["|---|---:|---|---|"] + [
            f"| {s['by']} | {s['prompt_index']} | {_cell(s['image'])} | {_cell(s['error'])} |" for s in skipped
        ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(str(text).split("\n")).replace("|", "\\|")


def plot(report: dict[str, Any], png: Path) -> None:
    """The comparisons as a matrix: cell (row A, column B) how often the judge prefers A's pick, with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["name"] for s in report["selectors"]]
    at = {n: k for k, n in enumerate(names)}
    rates = np.full((len(names), len(names)), np.nan)
    text: dict[tuple[int, int], str] = {}
    for c in report["comparisons"]:
        if c["preferred"] is None:
            continue
        a, b, low, high = at[c["a"]], at[c["b"]], *c["interval"]
        rates[a, b], rates[b, a] = c["preferred"], 1 - c["preferred"]
        span = "" if low is None else f"\n[{low:.2f}, {high:.2f}]"
        text[a, b] = f"{c['preferred']:.2f}{span}"
        text[b, a] = f"{1 - c['preferred']:.2f}" + ("" if low is None else f"\n[{1 - high:.2f}, {1 - low:.2f}]")
    fig, ax = plt.subplots(figsize=(2.5 + 1.3 * len(names), 1.5 + 1.0 * len(names)))
    image = ax.imshow(rates, vmin=0, vmax=1, cmap="RdYlGn")
    for (a, b), label in text.items():
        ax.text(b, a, label, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_title("judge prefers the row selector's pick over the column's", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
