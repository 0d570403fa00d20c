"""The report of ``pickscore evaluate-models`` rendered: its tables as markdown, its plot as a PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def markdown(report: Mapping[str, Any], skipped_in: str | None = None) -> str:
    """The report's three tables (ranking, win rates, best of N) as markdown, then the skipped images: a pointer to
    ``skipped_in`` (the report.json written beside it) when given, else a table of them with the reasons. A report
    of several scorers (``scorers``) opens with the text-to-image models ranked by each, side by side, then each
    scorer's own tables."""
    if "scorers" in report:
        lines = _side_by_side_lines(report)
        for scorer in report["scorers"]:
            lines += ["", *_tables(scorer, "###")]
    else:
        lines = _tables(report, "##")
    if report.get("skipped"):
        lines += ["", *_skipped_lines(report["skipped"], skipped_in)]
    return "\n".join(lines)


def _side_by_side_lines(report: Mapping[str, Any]) -> list[str]:
    """One row per text-to-image model (in the first scorer's order): its rank, Elo and mean score by each scorer."""
    scorers = report["scorers"]
    head = " | ".join(f"{s['model_name']}: rank | {s['model_name']}: Elo | {s['model_name']}: mean" for s in scorers)
    lines = [
        f"## Text-to-image models by {len(scorers)} scorers, side by side",
        "",
        f"{report['prompts']} prompts; every image scored by each scorer, in one request ("
        + "; ".join(f"{s['model_name']}: {s['scorer']}" for s in scorers)
        + "). Each ranks by its own Elo; mean scores are on each scorer's own scale.",
        "",
        f"| model | {head} |",
        "|---|" + "---:|---:|---:|" * len(scorers),
    ]
    by_name = [{m["name"]: m for m in s["models"]} for s in scorers]
    for model in scorers[0]["models"]:
        cells = []
        for models in by_name:
            m = models[model["name"]]
            cells += [str(m["rank"]), _f(m["elo"], 0), _f(m["mean_score"], 3)]
        lines.append(f"| {model['name']} | " + " | ".join(cells) + " |")
    return lines


def _tables(report: Mapping[str, Any], heading: str) -> list[str]:
    """One scorer's tables: ranking, win rates, best of N."""
    boot = report["bootstrap"]
    intervals = boot["resamples"] > 0
    lines = [
        f"{heading} Text-to-image models by PickScore ({report['scorer']})",
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
    return lines + _best_of_lines(report)


def _best_of_lines(report: Mapping[str, Any]) -> list[str]:
    """The best-of-N table, for the N some prompt has that many scored images for, and a line naming the others."""
    shown = [n for n in report["best_of"] if any(m["best_of_n"][str(n)] for m in report["models"])]
    lines = []
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
    return lines


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
    """The win-rate matrix as a heatmap beside each model's mean score with its interval; a row of the two per
    scorer when several scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorers = report.get("scorers") or [report]
    size = len(scorers[0]["win_rates"]["models"])
    fig, axes = plt.subplots(
        len(scorers), 2, figsize=(6 + 1.2 * size, (1.5 + 0.9 * size) * len(scorers)), squeeze=False
    )
    for scorer, (heat, bars) in zip(scorers, axes):
        _plot_scorer(fig, heat, bars, scorer, f" ({scorer['model_name']})" if "scorers" in report else "")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _plot_scorer(fig, heat, bars, report: Mapping[str, Any], title: str) -> None:
    order = report["win_rates"]["models"]
    matrix = np.array([[np.nan if v is None else v for v in row] for row in report["win_rates"]["matrix"]])
    np.fill_diagonal(matrix, np.nan)
    size = len(order)
    image = heat.imshow(matrix, vmin=0, vmax=1, cmap="RdYlGn")
    for a in range(size):
        for b in range(size):
            if a != b and np.isfinite(matrix[a, b]):
                heat.text(b, a, f"{matrix[a, b]:.2f}", ha="center", va="center", fontsize=9)
    heat.set_xticks(range(size), order, rotation=30, ha="right")
    heat.set_yticks(range(size), order)
    heat.set_title(f"win rate: row's best image beats column's{title}", fontsize=9)
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
    label = f"mean PickScore ({level:.0%} bootstrap interval)" if report["bootstrap"]["resamples"] else "mean"
    bars.set_xlabel(label + title)
    bars.grid(axis="x", alpha=0.3)
