"""The collection app under load: how fast people can choose, and how the admin summary and export grow.

    python benchmarks/collect_bench.py [--users 8] [--seconds 20] [--rows 10000,100000] [--postgres URL]

1. A real `CollectApp` on loopback (synthetic candidates, 256 px, SQLite file or --postgres) and USERS
   concurrent visitors, each signing in, writing a prompt and choosing as fast as the app answers: choices/s and
   the latency of one choice (its POST, the app's generation and commit, the 303 and the next page), p50/p99.
2. The same database grown to each of --rows choices by bulk inserts (one small image per choice), then the
   admin page's summary (every choice read once, agreement included) and `collect export`, timed, best of 3
   and once.

Appends a section to benchmarks/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

from PIL import Image
from sqlalchemy import insert
from sqlalchemy.orm import Session
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, machine  # noqa: E402
from pickscore.collect import report  # noqa: E402
from pickscore.collect.app import CollectSettings  # noqa: E402
from pickscore.collect.export import export  # noqa: E402
from pickscore.collect.store import ChoiceRow, Pair, Store, StoredImage, User  # noqa: E402
from tests.collect.conftest import AppThread, Visitor  # noqa: E402


def choosing(db: str, users: int, seconds: float) -> dict[str, float]:
    app = AppThread(CollectSettings(db=db, port=0, seed=0, image_size=256))
    url = app.url
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    def person(k: int) -> None:
        visitor = Visitor(url)
        visitor.sign_in(f"user-{k}")
        visitor.post("/prompt", prompt=f"prompt {k}")
        rng = random.Random(k)
        while time.perf_counter() < stop:
            start = time.perf_counter()
            visitor.choose(rng.choice(["left", "right", "tie"]))
            if visitor.status != 200:
                raise RuntimeError(f"{visitor.status}: {visitor.error}")
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    threads = [threading.Thread(target=person, args=(k,)) for k in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    app.close()
    latencies.sort()
    return {
        "choices": len(latencies),
        "per_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def grow(store: Store, rows: int) -> None:
    """Add choices until the database holds ``rows`` of them: 50 users, 2,000 prompts, one 16 px PNG each."""
    with Session(store.engine) as s:
        have = s.query(ChoiceRow).count()
        users = s.query(User).count()
    if users < 50:
        with Session(store.engine) as s, s.begin():
            t = datetime(2026, 1, 1)
            s.execute(insert(User), [dict(name=f"bulk-{u}", consent_version="x", consented_at=t) for u in range(50)])
    with Session(store.engine) as s:
        user_ids = [u.id for u in s.query(User)]
    rng = random.Random(rows)
    start = datetime(2026, 1, 1)
    with tqdm(total=rows - have, unit="choice", desc=f"grow to {rows}") as bar:
        while have < rows:
            n = min(5000, rows - have)
            images, pairs, choices = [], [], []
            with Session(store.engine) as s:
                next_pair = (s.query(Pair).order_by(Pair.id.desc()).first() or Pair(id=0)).id + 1
            for i in range(n):
                buf = io.BytesIO()
                Image.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3))).save(buf, "PNG")
                data = buf.getvalue()
                ident = hashlib.sha256(data).hexdigest()
                images.append(dict(id=ident, data=data, mime="image/png", width=16, height=16, created_at=start))
                other = images[i - 1]["id"] if i else ident
                when = start + timedelta(seconds=have + i)
                pid = next_pair + i
                pairs.append(
                    dict(
                        id=pid,
                        user_id=rng.choice(user_ids),
                        prompt=f"prompt {rng.randrange(2000)}",
                        image_0=ident,
                        image_1=other,
                        model_0=f"model-{rng.randrange(4)}",
                        model_1=f"model-{rng.randrange(4)}",
                        provenance_0={},
                        provenance_1={},
                        shown_at=when,
                    )
                )
                label = rng.choice(["left", "right", "tie"])
                l0, l1 = {"left": (1.0, 0.0), "right": (0.0, 1.0), "tie": (0.5, 0.5)}[label]
                choices.append(
                    dict(
                        pair_id=pid,
                        user_id=pairs[-1]["user_id"],
                        label=label,
                        label_0=l0,
                        label_1=l1,
                        chosen_at=when,
                    )
                )
            with Session(store.engine) as s, s.begin():
                unique = {image["id"]: image for image in images}
                existing = set(s.scalars(StoredImage.__table__.select().with_only_columns(StoredImage.id)))
                fresh = [image for k, image in unique.items() if k not in existing]
                if fresh:
                    s.execute(insert(StoredImage), fresh)
                s.execute(insert(Pair), pairs)
                s.execute(insert(ChoiceRow), choices)
            have += n
            bar.update(n)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8, help="concurrent visitors choosing")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long they choose")
    parser.add_argument("--rows", default="10000,100000", help="database sizes (choices) to time the summary at")
    parser.add_argument("--postgres", default="", help="a PostgreSQL URL to use instead of a SQLite file")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.postgres or f"sqlite:///{tmp}/bench.db"
        kind = "PostgreSQL" if args.postgres else "SQLite"
        load = choosing(db, args.users, args.seconds)
        print(load)
        lines = [
            f"Choosing ({kind}, synthetic 256 px candidates, {args.users} concurrent users, {args.seconds:.0f} s): "
            f"{load['per_s']:.1f} choices/s; one choice (POST, generation, commit, next page) "
            f"p50 {load['p50_ms']:.0f} ms, p99 {load['p99_ms']:.0f} ms.",
            "",
            "| choices in the database | admin summary (best of 3) | export, all splits |",
            "|---:|---:|---:|",
        ]
        store = Store(db)
        for rows in (int(r) for r in args.rows.split(",")):
            grow(store, rows)
            summary_s = best_of(lambda: report.summary(store), 3)
            export_s = best_of(lambda: export(store, Path(tmp) / "export"), 1)
            print(rows, summary_s, export_s)
            lines.append(f"| {rows:,} | {summary_s:.2f} s | {export_s:.2f} s |")
        store.close()
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        append_results(
            "Collection app (`pickscore collect`)",
            markdown,
            {"machine": machine(), "command": "python benchmarks/collect_bench.py " + " ".join(sys.argv[1:])},
        )


if __name__ == "__main__":
    main()
