"""`pickscore serve` as a real process, where starting goes wrong or a client dials the wrong port: a busy port or
a missing GPU is one line and exit 1 (a busy port before the model loads); a client speaking the other port's
protocol leaves one JSON log line, never a traceback."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULTS = {"--port": "0", "--http-port": "0", "--metrics-port": "0", "--device": "cpu"}


def serve(*flags: str, model: str | Path, **popen) -> subprocess.Popen:
    """`pickscore serve` on loopback, JSON logs on stderr; free ports and the CPU unless ``flags`` (flag, value
    pairs) choose others."""
    given = {**DEFAULTS, **dict(zip(flags[::2], flags[1::2]))}
    env = {**os.environ, "PICKSCORE_HOST": "127.0.0.1", "PICKSCORE_LOG_FORMAT": "json"}
    argv = [sys.executable, "-m", "pickscore.cli", "serve", "--model", str(model)]
    return subprocess.Popen([*argv, *(x for kv in given.items() for x in kv)], env=env, text=True, **popen)


def refused(*flags: str, model: str | Path) -> tuple[int, list[str]]:
    """Exit status and stderr lines of a `pickscore serve` expected to refuse to start."""
    proc = serve(*flags, model=model, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.strip().splitlines()


@pytest.fixture
def listener():
    """A port another process's plain listening socket holds."""
    with socket.create_server(("127.0.0.1", 0)) as held:
        yield held.getsockname()[1]


@pytest.mark.parametrize(
    "flag, name, setting",
    [
        ("--port", "gRPC", "PICKSCORE_PORT"),
        ("--http-port", "HTTP", "PICKSCORE_HTTP_PORT"),
        ("--metrics-port", "metrics", "PICKSCORE_METRICS_PORT"),
    ],
)
def test_a_busy_port_is_one_line_before_the_model_loads(listener, tmp_path, flag, name, setting):
    # No model at this path: had the model been loaded first, the error would be about it, not the port.
    code, err = refused(flag, str(listener), model=tmp_path / "no-model")
    assert code == 1
    assert err == [
        f"pickscore: error: {name} port 127.0.0.1:{listener} ({flag} or {setting}): Address already in use: "
        "another process listens there; stop it or choose another port (0 picks a free one)"
    ]


def test_a_grpc_port_another_grpc_server_holds_is_refused_not_shared(tmp_path):
    """gRPC servers set SO_REUSEPORT by default: a second one would bind the same port and split its traffic."""
    other = grpc.server(ThreadPoolExecutor(1))
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        code, err = refused("--port", str(port), model=tmp_path / "no-model")
    finally:
        other.stop(None)
    assert code == 1 and len(err) == 1 and f"gRPC port 127.0.0.1:{port} (--port" in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_serving_on_cuda_without_a_gpu_is_one_line(tiny_hf_dir):
    code, err = refused("--device", "cuda", model=tiny_hf_dir)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(
        f"pickscore: error: model 'pickscore' version 1 ({tiny_hf_dir}): device 'cuda': CUDA is not"
    )
    assert "PICKSCORE_DEVICE" in err[0] and "cpu" in err[0]


@pytest.fixture(scope="module")
def logged_server(tiny_hf_dir, tmp_path_factory):
    """A serving process whose stderr (the JSON log) goes to a file: (ports from its "serving" line, log path)."""
    log = tmp_path_factory.mktemp("serve") / "stderr"
    with log.open("w") as stderr:
        proc = serve(model=tiny_hf_dir, stderr=stderr)
    deadline = time.monotonic() + 120
    while '"serving"' not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    started = [json.loads(line) for line in log.read_text().splitlines() if '"serving"' in line]
    assert started, log.read_text()
    yield started[0], log
    proc.terminate()
    proc.wait(60)


def wait_for_lines(log: Path, count: int, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(lines := log.read_text().splitlines()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return lines


def test_a_grpc_client_on_the_http_port_is_one_json_line(logged_server):
    started, log = logged_server
    before = len(log.read_text().splitlines())
    with grpc.insecure_channel(f"127.0.0.1:{started['http_port']}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    new = wait_for_lines(log, before + 1)[before:]
    assert new and "Traceback" not in "".join(new)
    for line in new:  # gRPC's channel may connect more than once: one line per connection
        entry = json.loads(line)
        assert entry["level"] == "warning" and "exception" not in entry
        assert "not an HTTP/1.x request" in entry["message"] and "gRPC is served on --port" in entry["message"]


def test_an_http_client_on_the_grpc_port_leaves_no_traceback(logged_server):
    """gRPC's core answers an HTTP/1.1 request with its own HTTP/2 frames and tells Python nothing (so nothing is
    logged): the client fails at once, and whatever the server writes stays JSON."""
    started, log = logged_server
    before = len(log.read_text().splitlines())
    with pytest.raises(http.client.BadStatusLine):  # gRPC's SETTINGS frame where a status line should be
        urllib.request.urlopen(f"http://127.0.0.1:{started['port']}/v2/health/live", timeout=5)
    time.sleep(0.5)  # what the server would write about it
    new = log.read_text().splitlines()[before:]
    assert "Traceback" not in "".join(new) and all(json.loads(line) for line in new), new


def test_a_text_log_says_what_a_json_one_does(tiny_hf_dir, tmp_path):
    """`--log-format text`: a line a person reads, with the record's fields after the message as key=value, so its
    "serving" line names the ports as the JSON one does (plain text once dropped every field)."""
    log = tmp_path / "stderr"
    with log.open("w") as stderr:
        proc = serve("--log-format", "text", model=tiny_hf_dir, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while " serving " not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        (line,) = [line for line in log.read_text().splitlines() if " serving " in line]
        assert " INFO pickscore" in line and not line.lstrip().startswith("{")
        fields = dict(field.split("=", 1) for field in line.split(" serving ", 1)[1].split(" "))
        assert json.loads(fields["default_model"]) == "pickscore" and json.loads(fields["models"]) == ["pickscore"]
        with grpc.insecure_channel(f"127.0.0.1:{json.loads(fields['port'])}") as channel:  # the port it serves
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
        proc.wait(60)
