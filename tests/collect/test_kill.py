"""`pickscore collect` killed with SIGKILL under load loses no acknowledged choice and leaves nothing half-written.

Visitors choose as fast as they can against a real `pickscore collect` process on a SQLite file; the process is
killed mid-load. A choice the server acknowledged (its 303 led to the next pair's page) must be in the database;
a choice in flight may or may not be, but never without the next pair it was committed with. The app restarted on
the same file carries on where each person was.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.collect.conftest import Visitor, free_port

VISITORS = 12  # many requests in flight when the kill lands: a choice committed apart from its next pair shows
LOAD_S = 1.8
LABELS = ("left", "right", "tie")


def start_collect(db: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`pickscore collect` as its own process on ``db``; it and its URL once /healthz answers."""
    for _attempt in range(3):
        port = free_port()
        cmd = [sys.executable, "-m", "pickscore.cli", "collect", "--db", f"sqlite:///{db}", "--port", str(port)]
        cmd += ["--candidates", "synthetic", "--image-size", "64", "--seed", "5"]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
                    if json.load(response)["status"] == "ok":
                        return proc, url
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            pytest.fail(f"`pickscore collect` did not answer /healthz in 60 s:\n{log.read_text()[-3000:]}")
        # It exited: most likely the port was taken between free_port() and its bind; try another.
    pytest.fail(f"`pickscore collect` exited ({proc.returncode}):\n{log.read_text()[-3000:]}")


class Chooser(threading.Thread):
    """One person choosing as fast as the server answers, until the server goes away."""

    def __init__(self, url: str, index: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.name_ = f"visitor {index}"
        self.prompt = f"a red cube number {index} on a table"
        self.visitor = Visitor(url)
        self.stop = stop
        self.acknowledged: list[tuple[int, str]] = []  # (pair id, label) of the choices the server answered
        self.in_flight: tuple[int, str] | None = None  # the one sent when the server died, if any
        self.unexpected: list[str] = []  # any answer other than the next pair
        self.ended_by: BaseException | None = None

    def run(self) -> None:
        v = self.visitor
        try:
            v.sign_in(self.name_)
            v.post("/prompt", prompt=self.prompt)
            if v.status != 200 or v.pair is None:
                self.unexpected.append(f"prompt: {v.status} {v.error}")
                return
            n = 0
            while not self.stop.is_set():
                pair, label = v.pair, LABELS[n % len(LABELS)]
                self.in_flight = (pair["pair"], label)
                v.choose(label)
                self.in_flight = None
                if v.status != 200 or v.pair is None or v.pair["pair"] <= pair["pair"]:
                    self.unexpected.append(f"choice {pair['pair']} {label}: {v.status} {v.error}")
                    return
                self.acknowledged.append((pair["pair"], label))
                n += 1
        except (OSError, http.client.HTTPException) as e:  # refused, reset, cut short: the server was killed
            self.ended_by = e


def test_sigkill_under_load_loses_no_acknowledged_choice(tmp_path, start_app):
    db, log = tmp_path / "c.db", tmp_path / "collect.log"
    proc, url = start_collect(db, log)
    stop = threading.Event()
    choosers = [Chooser(url, i, stop) for i in range(VISITORS)]
    try:
        for c in choosers:
            c.start()
        deadline = time.monotonic() + 30
        started = None
        while time.monotonic() < deadline:  # load for LOAD_S once every visitor is choosing
            if started is None and all(c.acknowledged for c in choosers):
                started = time.monotonic()
            if started is not None and time.monotonic() - started >= LOAD_S:
                break
            if any(c.unexpected or not c.is_alive() for c in choosers):
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop.set()  # (only matters if the kill failed: the visitors' next requests are refused anyway)
        for c in choosers:
            c.join(timeout=30)
    assert not any(c.is_alive() for c in choosers)
    problems = [f"{c.name_}: {p}" for c in choosers for p in c.unexpected]
    assert not problems, f"{problems}\n{log.read_text()[-3000:]}"
    assert all(c.ended_by is not None for c in choosers), "a visitor stopped before the kill"
    assert all(len(c.acknowledged) >= 3 for c in choosers), [len(c.acknowledged) for c in choosers]

    # The file as the killed process left it: SQLite recovers the WAL and finds nothing broken.
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []

    app = start_app(db=f"sqlite:///{db}", candidates="synthetic", image_size=64, seed=6)
    with app.store.engine.connect() as conn:
        users = dict(conn.execute(sa.text("SELECT name, id FROM users")).all())
        pairs = {r.id: r for r in conn.execute(sa.text("SELECT id, user_id, prompt, image_0, image_1 FROM pairs"))}
        choices = {r.pair_id: r for r in conn.execute(sa.text("SELECT pair_id, user_id, label FROM choices"))}
        images = dict(conn.execute(sa.text("SELECT id, data FROM images")).all())
        per_pair = conn.execute(sa.text("SELECT max(n) FROM (SELECT count(*) AS n FROM choices GROUP BY pair_id)"))
        assert per_pair.scalar() == 1

    # Every pair's images are there, intact; every choice answers a pair of its own user.
    for p in pairs.values():
        for image in (p.image_0, p.image_1):
            assert image in images and hashlib.sha256(images[image]).hexdigest() == image, (p.id, image)
    for pair_id, c in choices.items():
        assert pair_id in pairs and pairs[pair_id].user_id == c.user_id

    for chooser in choosers:
        user = users[chooser.name_]
        mine = sorted((p for p in pairs.values() if p.user_id == user), key=lambda p: p.id)
        recorded = [(p.id, choices[p.id].label) for p in mine if p.id in choices]
        # (a) every acknowledged choice is there; beyond them at most the one in flight when the server died.
        assert recorded[: len(chooser.acknowledged)] == chooser.acknowledged, chooser.name_
        extra = recorded[len(chooser.acknowledged) :]
        assert extra in ([], [chooser.in_flight]), (chooser.name_, extra, chooser.in_flight)
        # (b) nothing partial: one prompt, then one pair per choice, each committed with the choice before it;
        # the newest pair is unanswered (a choice without its next pair would leave it answered).
        assert {p.prompt for p in mine} == {chooser.prompt}
        assert [p.id in choices for p in mine] == [True] * len(recorded) + [False], chooser.name_
        for before, after in zip(mine, mine[1:]):
            label, old, new = choices[before.id].label, (before.image_0, before.image_1), (after.image_0, after.image_1)
            if label == "left":
                assert new[0] == old[0] and new[1] not in old, (before.id, label)
            elif label == "right":
                assert new[1] == old[1] and new[0] not in old, (before.id, label)
            else:
                assert not set(new) & set(old), (before.id, label)

        # (c) the restarted app carries on: sign in again, the same pair is shown, a choice is recorded.
        v = Visitor(app.url)
        v.sign_in(chooser.name_)
        newest = mine[-1]
        assert v.status == 200 and v.pair == {"pair": newest.id, "image_0": newest.image_0, "image_1": newest.image_1}
        v.choose("tie")
        assert v.status == 200 and v.pair is not None and v.pair["pair"] > newest.id, (v.status, v.error)
        with app.store.engine.connect() as conn:
            row = conn.execute(sa.text("SELECT user_id, label FROM choices WHERE pair_id = :p"), {"p": newest.id})
            assert tuple(row.one()) == (user, "tie")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
