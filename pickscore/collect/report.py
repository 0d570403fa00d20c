"""What the collected choices say: counts, choices per hour, tie rate, each model's win rate, and how often two
users agree on the same pair (the paper's human baseline). The admin page and ``collect export`` both read it.

    summary(store)          # a dict; plot_hourly(summary), plot_models(summary) -> PNG bytes
    agreement(choices)      # pure: {"rate", "decisive_rate", "comparisons", "pairs", "users": {user_id: ...}}

Agreement: a pair is the same prompt with the same two images, on either side. For every pair that two or more
users judged, every two of those users' judgments (each user's latest) are compared with the sides aligned; they
agree when both chose the same image or both called a tie. ``decisive_rate`` leaves out comparisons with a tie.
A user's agreement is over the comparisons they take part in.
"""

from __future__ import annotations

import io
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from pickscore.collect.store import Store


def _oriented(choice: Mapping[str, Any]) -> tuple[tuple[str, str, str], str]:
    """(prompt, first image id, second image id) with the ids sorted, and the choice as "first", "second" or "tie"."""
    a, b = choice["image_0"], choice["image_1"]
    label = choice["label"]
    if label == "tie":
        verdict = "tie"
    else:
        winner = a if label == "left" else b
        verdict = "first" if winner == min(a, b) else "second"
    return (choice["prompt"], min(a, b), max(a, b)), verdict


def agreement(choices: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    judged: dict[tuple[str, str, str], dict[int, str]] = defaultdict(dict)
    for choice in choices:
        if choice["image_0"] == choice["image_1"]:
            continue
        key, verdict = _oriented(choice)
        judged[key][choice["user_id"]] = verdict  # in choice order: each user's latest stays
    agree = comparisons = decisive_agree = decisive = 0
    per_user: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    shared = 0
    for verdicts in judged.values():
        if len(verdicts) < 2:
            continue
        shared += 1
        for (u, x), (v, y) in itertools.combinations(verdicts.items(), 2):
            same = int(x == y)
            agree += same
            comparisons += 1
            if "tie" not in (x, y):
                decisive_agree += same
                decisive += 1
            for who in (u, v):
                per_user[who][0] += same
                per_user[who][1] += 1
    return {
        "rate": agree / comparisons if comparisons else None,
        "decisive_rate": decisive_agree / decisive if decisive else None,
        "comparisons": comparisons,
        "decisive_comparisons": decisive,
        "pairs": shared,
        "users": {u: {"agreed": a, "comparisons": n, "rate": a / n} for u, (a, n) in sorted(per_user.items())},
    }


def model_wins(choices: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per model, over pairs of two different models: pairs, wins, ties, losses and win rate (a tie is half)."""
    tally: dict[str, Counter] = defaultdict(Counter)
    for c in choices:
        m0, m1 = c["model_0"], c["model_1"]
        if m0 == m1:
            continue
        for model, won, lost in ((m0, "left", "right"), (m1, "right", "left")):
            t = tally[model]
            t["pairs"] += 1
            t["wins" if c["label"] == won else "losses" if c["label"] == lost else "ties"] += 1
    rows = [
        {
            "model": model,
            "pairs": t["pairs"],
            "wins": t["wins"],
            "ties": t["ties"],
            "losses": t["losses"],
            "win_rate": (t["wins"] + 0.5 * t["ties"]) / t["pairs"],
        }
        for model, t in tally.items()
    ]
    return sorted(rows, key=lambda r: (-r["win_rate"], r["model"]))


def summary(store: Store) -> dict[str, Any]:
    choices = list(store.choices())
    hourly = Counter(c["chosen_at"].replace(minute=0, second=0, microsecond=0) for c in choices)
    ties = sum(c["label"] == "tie" for c in choices)
    agreed = agreement(choices)
    names = store.user_names()
    per_user: dict[int, Counter] = defaultdict(Counter)
    for c in choices:
        per_user[c["user_id"]]["choices"] += 1
        per_user[c["user_id"]]["ties"] += c["label"] == "tie"
    users = [
        {
            "name": names.get(u, str(u)),
            "choices": t["choices"],
            "ties": t["ties"],
            "agreement": agreed["users"].get(u, {}).get("rate"),
        }
        for u, t in sorted(per_user.items(), key=lambda kv: -kv[1]["choices"])
    ]
    return {
        "counts": store.counts(),
        "tie_rate": ties / len(choices) if choices else None,
        "hourly": sorted(hourly.items()),
        "models": model_wins(choices),
        "agreement": agreed,
        "users": users,
    }


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_hourly(summary: Mapping[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    hours = summary["hourly"]
    if hours:
        ax.bar([h for h, _ in hours], [n for _, n in hours], width=1 / 24 * 0.9, align="edge", color="#20303f")
        fig.autofmt_xdate()
    else:
        ax.text(0.5, 0.5, "no choices yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("choices")
    ax.set_title("Choices per hour (UTC)")
    return _png(fig)


def plot_models(summary: Mapping[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["models"]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * max(len(rows), 1)))
    if rows:
        names = [r["model"] for r in rows][::-1]
        rates = [r["win_rate"] for r in rows][::-1]
        ax.barh(names, rates, color="#20303f")
        ax.axvline(0.5, color="#a01010", linestyle="--", linewidth=1)
        for y, (rate, row) in enumerate(zip(rates, rows[::-1])):
            ax.text(min(rate + 0.01, 0.9), y, f"{rate:.2f} ({row['pairs']} pairs)", va="center", fontsize=8)
        ax.set_xlim(0, 1)
    else:
        ax.text(
            0.5, 0.5, "no pair of two different models judged yet", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_xlabel("win rate (ties count half)")
    ax.set_title("Win rate by model")
    return _png(fig)
