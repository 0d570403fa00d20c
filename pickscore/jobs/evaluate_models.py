"""``pickscore evaluate-models``: compare text-to-image models by PickScore, as the paper does (Kirstain et al.
2023, sections 4-5).

    pickscore evaluate-models --model demo --prompts gens/prompts.txt --images gens/generator-* --out report

Every model's images for one set of prompts are scored with PickScore (in this process, or on a server), and
the scores become four statistics, each a pure numpy function here that the tests call directly:

- ``mean_scores``: a model's mean image score per prompt, averaged over prompts (each prompt weighs the same),
  with a percentile ``bootstrap`` interval that resamples prompts (one resample serves every model: paired).
- ``win_rates``: per prompt, model A beats B when A's best image scores higher than B's best (ties count half);
  W[a, b] is the fraction of prompts A wins, so W[a, b] + W[b, a] = 1.
- ``elo``: Bradley-Terry ratings fitted by maximum likelihood (Newton's method) to those per-prompt games, on
  the Elo scale (400 points: 10:1 odds; mean rating 1000). One virtual tie per pair of models keeps a model that
  wins every game finite. Deterministic; its interval resamples prompts like the mean's.
- ``best_of_n``: the expected score of the best of N images drawn without replacement from a prompt's images,
  computed exactly from the sorted scores (no sampling), against one random image (N = 1, the mean): what
  choosing the best of N with PickScore buys (section 5).

A prompt for which none of a model's images could be scored is left out of that model's statistics and of its
games; bad images are skipped and listed, never fatal.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pickscore.backends import add_backend_flags, backend_options
from pickscore.datasets.image_sets import IMAGE_EXTENSIONS, ImageSet, load_image_set, parse_image_set
from pickscore.datasets.prompts import Prompt, read_prompts
from pickscore.errors import InvalidInput, PickScoreError
from pickscore.flags import int_at_least
from pickscore.limits import DEFAULT_MAX_PIXELS
from pickscore.tls import add_client_flags, connection

LEVEL = 0.95  # of every interval
ELO_SCALE, ELO_BASE = 400.0, 1000.0
ELO_PRIOR = 0.5  # points each way of the one virtual tie added to every pair of models that played
ELO_METHOD = (
    "Bradley-Terry maximum likelihood (Newton's method) on per-prompt games, ties half a win, one virtual tie "
    "per pair of models; Elo scale 400, mean 1000"
)
BEST_OF_METHOD = "exact expectation over draws without replacement from each prompt's sorted scores"
MODEL_HELP = (
    "score in this process with this model: demo (the small bundled model, trained on the drawn shapes of "
    "`pickscore data synthetic`), a Hugging Face CLIP directory such as a downloaded PickScore_v1, an open_clip "
    "directory, an ONNX export, or a hub id"
)


# ---------------------------------------------------------------- statistics (pure functions of the scores)


def best_scores(scores_by_model: Sequence[Sequence[Sequence[float]]]) -> np.ndarray:
    """(models, prompts): each model's best image score per prompt; NaN where it has none."""
    return np.array([[max(s) if len(s) else np.nan for s in prompts] for prompts in scores_by_model], np.float64)


def mean_scores(scores_by_model: Sequence[Sequence[Sequence[float]]]) -> np.ndarray:
    """(models, prompts): each model's mean image score per prompt; NaN where it has none."""
    return np.array([[np.mean(s) if len(s) else np.nan for s in prompts] for prompts in scores_by_model], np.float64)


def outcomes(best: np.ndarray) -> np.ndarray:
    """(prompts, models, models): 1 where the row model's best beats the column's, 0.5 a tie, 0 a loss.

    NaN where either has no score for the prompt, and on the diagonal (a model does not play itself).
    """
    best = np.asarray(best, np.float64)
    a, b = best.T[:, :, None], best.T[:, None, :]  # (P, M, 1), (P, 1, M)
    out = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
    out[np.isnan(a) | np.isnan(b)] = np.nan
    out[:, np.arange(best.shape[0]), np.arange(best.shape[0])] = np.nan
    return out


def win_rates(best: np.ndarray) -> np.ndarray:
    """(models, models): W[a, b], the fraction of prompts where a's best image beats b's best, ties half.

    ``best`` is (models, prompts), e.g. from ``best_scores``; only prompts both models have count. W[a, b] +
    W[b, a] = 1; the diagonal is 0.5; NaN for a pair with no prompt in common.
    """
    games = outcomes(best)
    played = (~np.isnan(games)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.nansum(games, axis=0) / played
    np.fill_diagonal(rates, 0.5)
    return rates


def points(games: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(models, models): P[a, b], the points a scored against b over the prompts of ``outcomes``, each prompt
    counted ``weights[p]`` times (a bootstrap resample) or once."""
    won = np.nan_to_num(games, nan=0.0)
    return np.tensordot(np.ones(len(won)) if weights is None else weights, won, axes=1)


def elo(pts: np.ndarray, scale: float = ELO_SCALE, base: float = ELO_BASE, prior: float = ELO_PRIOR) -> np.ndarray:
    """Elo ratings (models,) fitted by maximum likelihood to the points matrix ``pts`` (``points``).

    Bradley-Terry: P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / scale)); a tie is half a win to each side.
    ``prior`` points each way (one virtual tie) are added to every pair that played, so a model that wins every
    game gets a finite, highest rating. Ratings average ``base``; NaN for a model that played no game.
    """
    pts = np.asarray(pts, np.float64)
    games = pts + pts.T
    np.fill_diagonal(games, 0.0)
    played = games > 0
    won = np.where(played, pts + prior, 0.0)
    n = won + won.T
    theta = np.zeros(len(pts))

    def log_likelihood(t: np.ndarray) -> float:
        return float(-(won * np.logaddexp(0.0, t[None, :] - t[:, None])).sum())  # sum w_ab log sigmoid(t_a - t_b)

    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # p[a, b] = P(a beats b)
        gradient = (won - n * p).sum(axis=1)
        curvature = n * p * (1 - p)
        laplacian = np.diag(curvature.sum(axis=1)) - curvature  # minus the Hessian; ones span its null space
        step = np.linalg.lstsq(laplacian, gradient, rcond=None)[0]
        size, before = 1.0, log_likelihood(theta)
        while log_likelihood(theta + size * step) < before - 1e-12 and size > 1e-6:
            size /= 2  # the likelihood is concave: a shorter step always gains
        theta = theta + size * step
        if np.max(np.abs(size * step)) < 1e-10:
            break
    active = played.any(axis=1)
    ratings = np.full(len(pts), np.nan)
    if active.any():
        ratings[active] = base + scale / math.log(10) * (theta[active] - theta[active].mean())
    return ratings


def resample_weights(prompts: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, prompts): how often each prompt is drawn in each bootstrap resample (prompts drawn with
    replacement). Every statistic draws the same resamples from the same seed, so their intervals are paired."""
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, prompts, size=(resamples, prompts)) + prompts * np.arange(resamples)[:, None]
    return np.bincount(drawn.ravel(), minlength=resamples * prompts).reshape(resamples, prompts).astype(np.float64)


def bootstrap_mean(
    values: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``values`` (models, prompts; NaN: no score): the mean over prompts, and the percentile
    bootstrap interval at ``level`` from ``resamples`` resamples of the prompts -> (mean, low, high)."""
    values = np.atleast_2d(np.asarray(values, np.float64))
    have = ~np.isnan(values)
    mean = np.array([row[ok].mean() if ok.any() else np.nan for row, ok in zip(values, have)])
    if resamples == 0:
        return mean, np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    weights = resample_weights(values.shape[1], resamples, seed)  # (B, P)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (weights @ np.where(have, values, 0.0).T) / (weights @ have.T)  # (B, M)
    low, high = np.nanquantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return mean, low, high


def bootstrap_elo(
    games: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elo ratings from ``outcomes`` (prompts, models, models) and their percentile bootstrap interval over
    resampled prompts -> (ratings, low, high)."""
    ratings = elo(points(games))
    if resamples == 0:
        return ratings, np.full_like(ratings, np.nan), np.full_like(ratings, np.nan)
    weights = resample_weights(len(games), resamples, seed)
    fits = np.array([elo(points(games, w)) for w in weights])
    low, high = np.nanquantile(fits, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return ratings, low, high


def best_of_n(scores: Sequence[float], n: int) -> float:
    """The expected best of ``n`` images drawn at random, without replacement, from images with ``scores``.

    Exact: with the scores sorted s_1 <= ... <= s_k, the i-th is the best of a draw in C(i-1, n-1) of the C(k, n)
    draws, so E = sum_i s_i C(i-1, n-1) / C(k, n). n = 1 is the mean; n = k the maximum.
    """
    s = sorted(float(x) for x in scores)
    k = len(s)
    if not 1 <= n <= k:
        raise ValueError(f"best of {n} needs 1 <= {n} <= {k} images")
    total = math.comb(k, n)
    return sum(value * (math.comb(i, n - 1) / total) for i, value in enumerate(s) if i >= n - 1)


def best_of_n_table(scores: Sequence[Sequence[float]], ns: Sequence[int]) -> dict[int, dict[str, float] | None]:
    """One model's prompts -> N -> {score, gain, prompts}: the mean over prompts with at least N scored images of
    the expected best of N, its gain over one random image on those prompts, and how many prompts; None when no
    prompt has N images."""
    out: dict[int, dict[str, float] | None] = {}
    for n in ns:
        eligible = [s for s in scores if len(s) >= n]
        if not eligible:
            out[n] = None
            continue
        best = float(np.mean([best_of_n(s, n) for s in eligible]))
        single = float(np.mean([best_of_n(s, 1) for s in eligible]))  # the same sums: N = 1 gains exactly 0
        out[n] = {"score": best, "gain": best - single, "prompts": len(eligible)}
    return out


def summarize(
    scores: Mapping[str, Sequence[Sequence[float]]],
    best_of: Sequence[int] = (1, 2, 4, 8),
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every statistic for the models' per-prompt image scores (name -> prompts -> scores), models best first."""
    names = list(scores)
    per_model = [scores[name] for name in names]
    best, means = best_scores(per_model), mean_scores(per_model)
    games = outcomes(best)
    ratings, elo_low, elo_high = bootstrap_elo(games, resamples, seed)
    mean, mean_low, mean_high = bootstrap_mean(means, resamples, seed)
    rates = win_rates(best)
    # Best first by Elo, then by mean score; a model with no rating (no games) last.
    order = sorted(range(len(names)), key=lambda m: (-np.nan_to_num(ratings[m], nan=-np.inf), -mean[m]))
    others = len(names) - 1
    models = []
    for rank, m in enumerate(order, 1):
        models.append(
            {
                "rank": rank,
                "name": names[m],
                "elo": _num(ratings[m]),
                "elo_interval": [_num(elo_low[m]), _num(elo_high[m])],
                "mean_score": _num(mean[m]),
                "mean_score_interval": [_num(mean_low[m]), _num(mean_high[m])],
                "win_rate": _num(np.nanmean(np.delete(rates[m], m))) if others else None,
                "prompts_scored": int((~np.isnan(best[m])).sum()),
                "images_scored": int(sum(len(s) for s in per_model[m])),
                "best_of_n": {str(n): v for n, v in best_of_n_table(per_model[m], best_of).items()},
            }
        )
    return {
        "prompts": int(best.shape[1]),
        "bootstrap": {"resamples": resamples, "seed": seed, "level": LEVEL, "unit": "prompt"},
        "elo_method": ELO_METHOD,
        "best_of_n_method": BEST_OF_METHOD,
        "best_of": list(best_of),
        "models": models,
        "win_rates": {
            "models": [names[m] for m in order],
            "matrix": [[_num(rates[a, b]) for b in order] for a in order],
            "meaning": "matrix[a][b]: fraction of prompts where a's best image outscores b's best; ties count half",
        },
    }


def _num(x: float) -> float | None:
    """A JSON number (rounded to 6 decimals), or None for NaN."""
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


# ---------------------------------------------------------------- inputs


# ---------------------------------------------------------------- scoring


ScoreFn = Callable[[str, list[Path | bytes]], tuple[np.ndarray, Mapping[int, PickScoreError]]]


def score_image_sets(
    prompts: Sequence[Prompt], sets: Sequence[ImageSet], score: ScoreFn, progress: bool = True
) -> tuple[dict[str, list[list[float]]], list[dict[str, Any]]]:
    """Score every model's images prompt by prompt (one call per prompt: its text is encoded once) ->
    (name -> per-prompt scores of the images that could be scored, the skipped images with their reasons)."""
    from tqdm import tqdm

    from pickscore.jobs.batch import item_reason  # pyarrow with it: not on every `pickscore` start

    scores: dict[str, list[list[float]]] = {s.name: [] for s in sets}
    skipped: list[dict[str, Any]] = []
    for prompt in tqdm(prompts, unit="prompt", disable=not progress or None, file=sys.stderr):
        batch: list[tuple[str, str, Path | bytes]] = []  # (model, label, image)
        for s in sets:
            for label, load in s.per_prompt[prompt.index]:
                image = load()
                if image is None:
                    skipped.append(_skip(s.name, prompt, label, "no image (null)"))
                else:
                    batch.append((s.name, label, image))
        values, errors = score(prompt.text, [image for _, _, image in batch]) if batch else (np.zeros(0), {})
        for s in sets:
            scores[s.name].append([])
        for k, (model, label, _) in enumerate(batch):
            if k in errors or not np.isfinite(values[k]):
                reason = item_reason(errors.get(k, "not scored"))  # the label names the image
                skipped.append(_skip(model, prompt, label, reason))
            else:
                scores[model][-1].append(float(values[k]))
    for name, per_prompt in scores.items():
        if not any(per_prompt):
            raise InvalidInput(f"--images {name}: none of its images could be scored; first: {_first(skipped, name)}")
    return scores, skipped


def _skip(model: str, prompt: Prompt, label: str, reason: str) -> dict[str, Any]:
    return {"model": model, "prompt_index": prompt.index, "image": label, "error": reason}


def _first(skipped: list[dict[str, Any]], model: str) -> str:
    item = next((s for s in skipped if s["model"] == model), None)
    return "-" if item is None else f"{item['image']}: {item['error']}"


# ---------------------------------------------------------------- the command


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate-models",
        help="compare text-to-image models by PickScore: mean scores, win rates, Elo, best-of-N",
        description="The paper's model evaluation (Kirstain et al. 2023, sections 4-5). Score every model's images "
        "for the same prompts, then report per model: the mean PickScore (each prompt weighs the same) with a "
        "95% bootstrap interval over prompts; pairwise win rates (per prompt, a model wins when its best image "
        "outscores the other's best; ties count half); Elo ratings fitted to those per-prompt games by maximum "
        "likelihood (Bradley-Terry; scale 400, mean 1000; one virtual tie per pair keeps an undefeated model "
        "finite), which rank the models; and the expected score of the best of N random images of a prompt "
        "against one random image, computed exactly. Bad images are skipped and listed, not fatal.",
    )
    p.add_argument(
        "--prompts",
        required=True,
        type=Path,
        metavar="FILE",
        help='the prompts: a text file with one prompt a line, or JSONL (.jsonl) with {"prompt": ..., "id": ...} '
        "a line; a prompt's index is its position (0 first)",
    )
    p.add_argument(
        "--images",
        required=True,
        nargs="+",
        metavar="NAME=PATH",
        help="one text-to-image model's images for those prompts, per model: a directory PATH/<prompt index>/"
        f"<any name>{{{','.join(IMAGE_EXTENSIONS)}}} (several images a prompt allowed) or a Parquet file with "
        "columns prompt (the text, as in --prompts) or prompt_index, and image (encoded bytes); PATH alone is "
        "named after its last component, so `--images gens/generator-*` works",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", metavar="REF", help=MODEL_HELP)
    where.add_argument(
        "--server", metavar="HOST:PORT", help="score on a running `pickscore serve` instead of loading a model here"
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="also write DIR/report.json (every statistic, per-prompt best scores, skipped images), DIR/report.md "
        "(the tables) and DIR/report.png (win-rate matrix and mean scores with their intervals)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object instead of markdown")
    p.add_argument(
        "--bootstrap",
        type=int_at_least(0),
        default=1000,
        metavar="B",
        help="bootstrap resamples of the prompts behind the 95%% intervals (default 1000; 0: no intervals)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the bootstrap resamples (default 0); same seed, same report",
    )
    p.add_argument(
        "--best-of",
        type=_sizes,
        default=(1, 2, 4, 8),
        metavar="N,N,...",
        help="the N of the best-of-N table (default 1,2,4,8); an N is reported for a model over the prompts with "
        "at least N scored images, and left out where none has",
    )
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=16,
        metavar="N",
        help="images per forward pass (default 16; with --model)",
    )
    p.add_argument(
        "--max-pixels",
        type=int_at_least(1),
        default=DEFAULT_MAX_PIXELS,
        metavar="PIXELS",
        help=f"skip images with more pixels than this, a guard against decompression bombs (default "
        f"{DEFAULT_MAX_PIXELS}; with --model: a server applies its own limit)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="deadline of each server request (default 600; with --server)",
    )
    add_backend_flags(p)
    add_client_flags(p.add_argument_group("server security (with --server only)"))
    p.set_defaults(func=_cmd_evaluate_models)


def _sizes(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive integers, returned sorted without repeats."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return tuple(values)


def _cmd_evaluate_models(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts)
    named = [parse_image_set(text) for text in args.images]
    names = [name for name, _ in named]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInput(f"--images: the name {repeated[0]!r} is given twice (use NAME=PATH to name them apart)")
    sets = [load_image_set(name, path, prompts) for name, path in named]
    if args.server:
        scores, skipped, scorer = _score_on_server(args, prompts, sets)
    else:
        from pickscore.scorer import Scorer

        local = Scorer.from_pretrained(
            args.model,
            **backend_options(args),
            batch_size=args.batch_size,
            max_pixels=args.max_pixels,
        )
        try:
            scores, skipped = score_image_sets(
                prompts, sets, lambda text, images: local.score_all(text, images, skip_invalid=True)
            )
        finally:
            local.close()
        scorer = args.model
    report = summarize(scores, args.best_of, args.bootstrap, args.seed)
    report = {
        "scorer": scorer,
        "prompts_file": str(args.prompts),
        **report,
        "inputs": {s.name: str(s.path) for s in sets},
        "skipped": skipped,
        "per_prompt": [
            {
                "index": p.index,
                **({"id": p.id} if p.id is not None else {}),
                "prompt": p.text,
                "best": {name: _num(max(scores[name][p.index], default=np.nan)) for name in scores},
            }
            for p in prompts
        ],
    }
    for item in skipped:
        print(
            f"skipped: {item['model']}: prompt {item['prompt_index']}: {item['image']}: {item['error']}",
            file=sys.stderr,
        )
    text = markdown(report, "report.json" if args.out else None)
    print(json.dumps(report, ensure_ascii=False, allow_nan=False) if args.json else text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1, allow_nan=False) + "\n")
        (args.out / "report.md").write_text(text + "\n")
        plot(report, args.out / "report.png")
        print(f"wrote {args.out}/report.json, report.md, report.png", file=sys.stderr)
    return 0


def _score_on_server(
    args: argparse.Namespace, prompts: Sequence[Prompt], sets: Sequence[ImageSet]
) -> tuple[dict[str, list[list[float]]], list[dict[str, Any]], str]:
    from pickscore.client import Client

    with Client(args.server, timeout=args.timeout, **connection(args)) as client:
        source = client.model_info().source
        scores, skipped = score_image_sets(
            prompts, sets, lambda text, images: client.score_many(text, images, skip_invalid=True)
        )
    return scores, skipped, f"{source} on {args.server}"


# ---------------------------------------------------------------- the report


def markdown(report: Mapping[str, Any], skipped_in: str | None = None) -> str:
    """The report's three tables (ranking, win rates, best of N) as markdown, then the skipped images: a pointer to
    ``skipped_in`` (the report.json written beside it) when given, else a table of them with the reasons."""
    boot = report["bootstrap"]
    intervals = boot["resamples"] > 0
    lines = [
        f"## Text-to-image models by PickScore ({report['scorer']})",
        "",
        f"{report['prompts']} prompts. Ranked by Elo ({report['elo_method']}). "
        + (
            f"Intervals: {boot['level']:.0%} percentile bootstrap, {boot['resamples']} resamples of the prompts, "
            f"seed {boot['seed']}."
            if intervals
            else "No intervals (--bootstrap 0)."
        ),
        "",
        "| rank | model | Elo | Elo 95% CI | mean score | mean 95% CI | mean win rate | prompts | images |",
        "|---:|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for m in report["models"]:
        lines.append(
            f"| {m['rank']} | {m['name']} | {_f(m['elo'], 0)} | {_range(m['elo_interval'], 0)} | "
            f"{_f(m['mean_score'], 3)} | {_range(m['mean_score_interval'], 3)} | {_f(m['win_rate'], 3)} | "
            f"{m['prompts_scored']} | {m['images_scored']} |"
        )
    order = report["win_rates"]["models"]
    matrix = report["win_rates"]["matrix"]
    lines += [
        "",
        "Win rates: the row model's best image outscores the column model's best on this fraction of prompts "
        "(ties count half).",
        "",
        "| win rate | " + " | ".join(order) + " |",
        "|---|" + "---:|" * len(order),
    ]
    for a, row in enumerate(matrix):
        lines.append(f"| {order[a]} | " + " | ".join("–" if a == b else _f(v, 3) for b, v in enumerate(row)) + " |")
    shown = [n for n in report["best_of"] if any(m["best_of_n"][str(n)] for m in report["models"])]
    if shown:
        lines += [
            "",
            "Best of N: the expected score of the best of N images drawn at random from a prompt's images (exact), "
            "and its gain over one random image.",
            "",
            "| model | " + " | ".join(f"best of {n}" for n in shown) + " |",
            "|---|" + "---:|" * len(shown),
        ]
        for m in report["models"]:
            cells = []
            for n in shown:
                v = m["best_of_n"][str(n)]
                cells.append("–" if v is None else _f(v["score"], 3) + ("" if n == 1 else f" (+{v['gain']:.3f})"))
            lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    left_out = [n for n in report["best_of"] if n not in shown]
    if left_out:
        lines += ["", f"Best of {', '.join(map(str, left_out))}: no prompt has that many scored images."]
    if report.get("skipped"):
        lines += ["", *_skipped_lines(report["skipped"], skipped_in)]
    return "\n".join(lines)


def _skipped_lines(skipped: Sequence[Mapping[str, Any]], skipped_in: str | None) -> list[str]:
    head = f"{len(skipped)} image{'s' if len(skipped) > 1 else ''} could not be scored and skipped"
    if skipped_in:
        return [f"{head} (see {skipped_in})."]
    rows = [
        f"| {_cell(s['model'])} | {s['prompt_index']} | {_cell(s['image'])} | {_cell(s['error'])} |" for s in skipped
    ]
    return [f"{head}:", "", "| model | prompt | image | reason |", "|---|---:|---|---|", *rows]


def _cell(text: str) -> str:
    """Text as one markdown table cell: its pipes escaped, its line breaks spaces."""
    return " ".join(str(text).split("\n")).replace("|", "\\|")


def _f(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _range(interval: Sequence[float | None], digits: int) -> str:
    low, high = interval
    return "–" if low is None or high is None else f"{low:.{digits}f} – {high:.{digits}f}"


def plot(report: Mapping[str, Any], png: Path) -> None:
    """The win-rate matrix as a heatmap beside each model's mean score with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = report["win_rates"]["models"]
    matrix = np.array([[np.nan if v is None else v for v in row] for row in report["win_rates"]["matrix"]])
    np.fill_diagonal(matrix, np.nan)
    size = len(order)
    fig, (heat, bars) = plt.subplots(1, 2, figsize=(6 + 1.2 * size, 1.5 + 0.9 * size))
    image = heat.imshow(matrix, vmin=0, vmax=1, cmap="RdYlGn")
    for a in range(size):
        for b in range(size):
            if a != b and np.isfinite(matrix[a, b]):
                heat.text(b, a, f"{matrix[a, b]:.2f}", ha="center", va="center", fontsize=9)
    heat.set_xticks(range(size), order, rotation=30, ha="right")
    heat.set_yticks(range(size), order)
    heat.set_title("win rate: row's best image beats column's", fontsize=9)
    fig.colorbar(image, ax=heat, fraction=0.046, pad=0.04)
    models = report["models"]
    means = np.array([np.nan if m["mean_score"] is None else m["mean_score"] for m in models])
    lows = np.array([np.nan if m["mean_score_interval"][0] is None else m["mean_score_interval"][0] for m in models])
    highs = np.array([np.nan if m["mean_score_interval"][1] is None else m["mean_score_interval"][1] for m in models])
    y = np.arange(len(models))[::-1]
    errors = np.nan_to_num(np.stack([means - lows, highs - means]), nan=0.0)
    bars.errorbar(means, y, xerr=errors, fmt="o", capsize=4)
    bars.set_yticks(y, [f"{m['name']} (Elo {_f(m['elo'], 0)})" for m in models])
    level = report["bootstrap"]["level"]
    bars.set_xlabel(f"mean PickScore ({level:.0%} bootstrap interval)" if report["bootstrap"]["resamples"] else "mean")
    bars.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
