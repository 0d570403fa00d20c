"""`pickscore serve` as a real process: SIGTERM under load drains without losing an admitted request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np

from pickscore.client import Client
from pickscore.errors import Unavailable
from pickscore.scorer import Scorer
from tests.server.conftest import PROMPT, jpeg


def start_server(
    model, *flags: str, command: tuple[str, ...] = (sys.executable, "-m", "pickscore.cli"), **popen
) -> tuple[subprocess.Popen, dict, list[dict]]:
    """Start `pickscore serve` (``command`` + serve) on free ports -> the process, its "serving" log entry, and a
    list that collects its later JSON log entries."""
    env = {**popen.pop("env", os.environ), "PICKSCORE_HOST": "127.0.0.1", "PICKSCORE_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [
            *command,
            "serve",
            "--model",
            str(model),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--device",
            "cpu",
            *flags,
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    before = []
    for line in proc.stderr:
        before.append(line)
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("message") == "serving":
            later: list[dict] = []

            def collect(later: list[dict] = later) -> None:
                for line in proc.stderr:  # keeps draining the pipe, too
                    if line.startswith("{"):
                        later.append(json.loads(line))

            threading.Thread(target=collect, daemon=True).start()
            return proc, entry, later
    raise AssertionError(f"server exited with {proc.wait()} before serving: {''.join(before[-20:])}")


def test_sigterm_under_load_loses_no_admitted_request(tiny_hf_dir):
    # admission by count alone: 8 callers of 6 images queue past the default bound of one batch
    proc, started, log = start_server(tiny_hf_dir, "--grace-period-s", "30", "--max-queue-wait-s", "0")
    address = f"127.0.0.1:{started['port']}"
    images = [jpeg(i, size=384) for i in range(6)]
    expected = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32").score(PROMPT, images)
    outcomes: list[object] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load():
        with Client(address, timeout=60) as client:
            while not stop.is_set():
                try:
                    result = client.score(PROMPT, images)
                except Unavailable as e:  # refused (draining) or nobody listening any more: never admitted
                    result = e
                except Exception as e:  # anything else would be a lost request
                    result = e
                with lock:
                    outcomes.append(result)
                if isinstance(result, Exception):
                    return

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    while len(outcomes) < 20:
        time.sleep(0.01)
    sent_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    drained_in = time.monotonic() - sent_at
    stop.set()
    for t in threads:
        t.join(timeout=60)

    scored = [o for o in outcomes if not isinstance(o, Exception)]
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert all(isinstance(e, Unavailable) for e in failed), failed
    assert len(failed) == len(threads)  # each client ended on a refusal, after the signal
    for scores in scored:
        np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert drained_in < 30
    # The server's side: it drained with requests in flight, and stopped with none left (none cancelled).
    time.sleep(0.2)
    events = {e["message"]: e for e in log}
    assert events["draining"]["inflight"] >= 1, log
    assert events["stopped"]["inflight"] == 0 and "grace period over; cancelling what is left" not in events


def test_sigterm_while_idle_exits_zero_and_refuses_connections(tiny_hf_dir):
    proc, started, _ = start_server(tiny_hf_dir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with grpc.insecure_channel(f"127.0.0.1:{started['port']}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
            connected = True
        except grpc.FutureTimeoutError:
            connected = False
    assert not connected
