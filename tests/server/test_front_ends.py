"""`pickscore serve --front-ends N`: front-end processes on the same ports, one process running every forward pass.

The towers' host and its client in process (loads shared, batches merged, failures contained), then the real
command: several clients' connections spread over two front ends, scores equal to the model's in process, a bad
image named, one scrape with every front end's series, a drain on SIGTERM, and a failed front end stopping it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pickscore.backends import load_backend
from pickscore.client import Client
from pickscore.errors import InvalidInput
from pickscore.scorer import Scorer
from pickscore.server.settings import Settings
from pickscore.server.towers import TowerClient, TowerHost
from tests.server.conftest import PROMPT, jpeg, settings_for
from tests.server.test_sigterm import start_server


@pytest.fixture
def host(tiny_hf_dir):
    towers = TowerHost(settings_for(tiny_hf_dir))
    towers.start()
    yield towers
    towers.close()


def test_two_front_ends_share_one_load_and_get_the_models_outputs(host, tiny_hf_dir):
    settings = settings_for(tiny_hf_dir, max_batch_size=16)
    a, b = TowerClient(host.path), TowerClient(host.path)
    first, second = a.load(str(tiny_hf_dir), settings), b.load(str(tiny_hf_dir), settings)
    assert len(host._loaded) == 1 and next(iter(host._loaded.values())).users == 2  # the weights once
    local = load_backend(str(tiny_hf_dir), device="cpu", dtype="fp32")
    assert first.weights_digest == local.weights_digest and first.kind == local.kind and not first.joint
    assert first.tokenizer(["a cat"]).tolist() == local.tokenizer(["a cat"]).tolist()  # the tokenizer travelled
    h, w = local.preprocess.output_size
    crops = np.random.default_rng(0).integers(0, 256, (5, h, w, 3), dtype=np.uint8)
    tokens = local.tokenizer(["a cat", "a dog"])
    np.testing.assert_allclose(first.encode_image(crops), local.encode_image(crops), atol=1e-5)
    np.testing.assert_allclose(second.encode_text(tokens), local.encode_text(tokens), atol=1e-5)
    del first
    deadline = time.monotonic() + 10  # the release is sent by a thread of the client
    while next(iter(host._loaded.values())).users != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert next(iter(host._loaded.values())).users == 1
    del second
    while host._loaded and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not host._loaded  # nobody holds it: unloaded


def test_batches_waiting_together_share_a_forward_pass_up_to_the_batch_size(host, tiny_hf_dir):
    settings = settings_for(tiny_hf_dir, max_batch_size=8)
    backend = TowerClient(host.path).load(str(tiny_hf_dir), settings)
    tower = next(iter(host._loaded.values())).towers["image"]
    sizes, gate = [], threading.Event()
    compute = tower.fn

    def slow_first(x):  # the first pass holds the tower while the others queue behind it
        sizes.append(len(x))
        gate.wait(10)
        return compute(x)

    tower.fn = slow_first
    h, w = backend.preprocess.output_size
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8) for n in (1, 3, 3, 3)]
    out: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        out[i] = backend.encode_image(batches[i])  # each thread: a connection of its own

    threads = [threading.Thread(target=call, args=(0,))]
    threads[0].start()
    while not sizes:
        time.sleep(0.005)
    threads += [threading.Thread(target=call, args=(i,)) for i in (1, 2, 3)]
    for t in threads[1:]:
        t.start()
    while len(tower._jobs) < 3:
        time.sleep(0.005)
    gate.set()
    for t in threads:
        t.join()
    assert sizes == [1, 6, 3]  # 3 + 3 merged; the third 3 would pass 8
    local = load_backend(str(tiny_hf_dir), device="cpu", dtype="fp32")
    for i, batch in enumerate(batches):  # each caller got its own rows back
        np.testing.assert_allclose(out[i], local.encode_image(batch), atol=1e-5)


def test_a_failed_forward_pass_fails_its_callers_only(host, tiny_hf_dir):
    backend = TowerClient(host.path).load(str(tiny_hf_dir), settings_for(tiny_hf_dir))
    with pytest.raises(RuntimeError, match="RuntimeError"):  # the host's exception, named
        backend.encode_image(np.zeros((2, 7, 7, 3), np.uint8))  # not the model's crop size
    h, w = backend.preprocess.output_size
    assert backend.encode_image(np.zeros((2, h, w, 3), np.uint8)).shape == (2, backend.embed_dim)
    with pytest.raises(ValueError, match="nonexistent"):  # a model that cannot load: the repository's error
        TowerClient(host.path).load("/nonexistent/model", settings_for(tiny_hf_dir))


def test_settings_refuse_what_front_ends_cannot_do():
    with pytest.raises(ValueError, match="drop --decode-on-device"):
        Settings(front_ends=2, decode_on_device=True).validate()
    with pytest.raises(ValueError, match="explicit"):
        Settings(front_ends=2, model_control_mode="explicit").validate()


def front_end_series(metrics_port: int, name: str) -> dict[str, float]:
    """``name``'s samples summed by front end, from one scrape of the device process's metrics port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    by: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                by[sample.labels["front_end"]] = by.get(sample.labels["front_end"], 0.0) + sample.value
    return by


def test_front_ends_serve_as_one_server(tiny_hf_dir):
    # admission by count: 16 callers at once, not refused by a tiny CPU's measured batch time
    proc, started, log = start_server(
        tiny_hf_dir, "--front-ends", "2", "--decode-workers", "1", "--max-queue-wait-s", "0"
    )
    try:
        assert len(started["front_ends"]) == 2 and started["device_process"] == proc.pid
        address = f"127.0.0.1:{started['port']}"
        images = [jpeg(i) for i in range(6)]
        expected = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32").score(PROMPT, images)
        clients = [Client(address, timeout=60) for _ in range(16)]  # 16 connections: both front ends, but 2^-15
        results = [None] * len(clients)

        def score(i: int) -> None:
            results[i] = clients[i].score(PROMPT, images)

        threads = [threading.Thread(target=score, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for got in results:
            np.testing.assert_allclose(got, expected, atol=1e-4)
        requests = front_end_series(started["metrics_port"], "pickscore_requests_total")
        assert set(requests) == {"0", "1"} and all(n > 0 for n in requests.values()), requests
        assert sum(front_end_series(started["metrics_port"], "pickscore_images_scored_total").values()) >= 16 * 6
        with pytest.raises(InvalidInput, match=r"image 2: not a decodable image"):
            clients[0].score(PROMPT, [images[0], images[1], b"junk", images[2]])
        body = json.dumps({"prompt": PROMPT, "images": [{"data": base64.b64encode(b).decode()} for b in images]})
        request = urllib.request.Request(
            f"http://127.0.0.1:{started['http_port']}/v1/score",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            np.testing.assert_allclose([x["score"] for x in json.loads(r.read())["results"]], expected, atol=1e-4)
        for pid in started["front_ends"]:  # a front end loads no model and imports no torch: ~100 MB, not ~500
            assert "libtorch" not in open(f"/proc/{pid}/maps").read()
        for client in clients:
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        for pid in started["front_ends"]:  # every front end drained and exited
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_front_end_that_dies_stops_the_server(tiny_hf_dir):
    proc, started, log = start_server(tiny_hf_dir, "--front-ends", "2", "--decode-workers", "1")
    try:
        os.kill(started["front_ends"][0], signal.SIGKILL)
        assert proc.wait(timeout=60) == 1  # for its supervisor to restart it whole
        time.sleep(0.5)  # the log's reader thread
        assert any(e.get("message") == "a front end exited; stopping the server" for e in log), log
        with pytest.raises(ProcessLookupError):
            os.kill(started["front_ends"][1], 0)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_busy_port_or_a_bad_model_is_one_line_and_exit_1(tiny_hf_dir, tmp_path):
    cli = [sys.executable, "-m", "pickscore.cli", "serve", "--front-ends", "2", "--host", "127.0.0.1"]
    cli += ["--metrics-port", "0", "--http-port", "0", "--device", "cpu"]
    with socket.create_server(("127.0.0.1", 0)) as held:  # another process's listener: not shared, refused
        port = held.getsockname()[1]
        busy = subprocess.run([*cli, "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert busy.returncode == 1 and f"gRPC port 127.0.0.1:{port} (--port" in busy.stderr, busy.stderr
    bad = subprocess.run([*cli, "--port", "0", "--model", str(tmp_path / "no-model")], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("pickscore: error: front end")]
    assert errors and all("no-model" in line for line in errors), bad.stderr


def test_front_ends_drain_and_exit_when_the_device_process_is_gone(tiny_hf_dir):
    proc, started, log = start_server(tiny_hf_dir, "--front-ends", "2", "--decode-workers", "1")
    try:
        proc.kill()  # SIGKILL: no chance to stop them
        proc.wait()
        deadline = time.monotonic() + 60
        alive = list(started["front_ends"])
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if os.path.exists(f"/proc/{pid}") and "Z" not in state(pid)]
            time.sleep(0.2)
        assert not alive, "front ends outlived their device process"
    finally:
        for pid in started["front_ends"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def state(pid: int) -> str:
    """The process's state letter (Z: exited, not yet reaped), or "Z" when it is gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_watched_repository_swaps_every_front_end_and_the_device_loads_each_version_once(
    tmp_path, tiny_hf_dir, other_hf_dir
):
    from tests.server.test_models import version

    root = tmp_path / "repository"
    root.mkdir()
    version(root, "pickscore", 1, tiny_hf_dir)
    flags = ("--front-ends", "2", "--model-repository", str(root), "--model-control-mode", "poll")
    proc, started, log = start_server("unused", *flags, "--repository-poll-s", "0.2", "--decode-workers", "1")
    try:
        clients = [Client(f"127.0.0.1:{started['port']}", timeout=60) for _ in range(16)]  # both front ends
        version(root, "pickscore", 2, other_hf_dir)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            served = {c.list_models()[0].model_version for c in clients}
            if served == {"2"}:
                break
            time.sleep(0.2)
        assert served == {"2"}
        images = [jpeg(i) for i in range(4)]
        expected = Scorer.from_pretrained(other_hf_dir, device="cpu", dtype="fp32").score(PROMPT, images)
        for client in clients:
            np.testing.assert_allclose(client.score(PROMPT, images), expected, atol=1e-4)
        while time.monotonic() < deadline and not any(e["message"] == "towers unloaded" for e in log):
            time.sleep(0.2)  # the old version, once both front ends let it go
        loads = [e["ref"] for e in log if e["message"] == "towers loaded"]
        unloads = [e["ref"] for e in log if e["message"] == "towers unloaded"]
        assert loads == [str(root / "pickscore" / "2")]  # once, though both front ends loaded it (v1: before "serving")
        assert unloads == [str(root / "pickscore" / "1")]
        for client in clients:
            client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
