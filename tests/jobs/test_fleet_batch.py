"""`pickscore batch` over a fleet of real servers: a server SIGKILLed mid-job costs nothing but its share (the job
completes with the one-server run's rows), a slow server gets fewer rows, and servers serving different weights are
refused, naming each address and identity, unless --expect-model says which to use."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pickscore.cli import main as cli
from pickscore.client import Client
from pickscore.errors import Conflict
from pickscore.jobs.batch import run_batch
from pickscore.server.app import ServerThread
from tests.conftest import make_hf_clip, save_hf_clip
from tests.jobs.test_batch import PROMPTS, rows_of
from tests.proxy import Proxy
from tests.server.conftest import jpeg, metric, settings_for
from tests.server.test_sigterm import start_server


@pytest.fixture(scope="module")
def twin_hf_dir(tmp_path_factory) -> Path:
    """The tiny model's architecture with other weights: what a half-finished rollout serves beside it."""
    return save_hf_clip(make_hf_clip(seed=7), tmp_path_factory.mktemp("twin"))


def write_rows(path: Path, n: int, size: int = 96) -> Path:
    rows = [{"id": f"r{i}", "prompt": PROMPTS[i % 3], "image": jpeg(i, size=size)} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def same_rows(got: list[dict], want: list[dict]) -> None:
    """The same rows in the same order with the same ranks; scores equal to float32 rounding (another server's
    batches may group the rows otherwise)."""
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [r["rank"] for r in got] == [r["rank"] for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-5)


def scored(server: ServerThread) -> float:
    return metric(server, "pickscore_images_scored_total")


def test_a_job_completes_when_a_server_is_killed_mid_job(tmp_path, tiny_hf_dir):
    data = write_rows(tmp_path / "data.parquet", 480)
    first, started_a, _ = start_server(tiny_hf_dir)
    second, started_b, _ = start_server(tiny_hf_dir)
    a, b = (f"127.0.0.1:{s['port']}" for s in (started_a, started_b))
    try:
        run_batch([str(data)], tmp_path / "one", servers=[a], shard_size=16, progress=False)
        out = tmp_path / "fleet"
        result: dict = {}

        def job() -> None:
            try:
                result["manifest"] = run_batch([str(data)], out, servers=[a, b], shard_size=16, progress=False)
            except BaseException as e:  # noqa: BLE001 - the assertion below shows it
                result["error"] = e

        thread = threading.Thread(target=job)
        thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list((out / "_scores").glob("shard-*.parquet"))) < 4:
            time.sleep(0.005)
        with Client(b, timeout=10) as client:  # b took part before it died
            assert client.model_info().identity
        os.kill(second.pid, signal.SIGKILL)
        second.wait()
        killed_at = len(list((out / "_scores").glob("shard-*.parquet")))
        thread.join(timeout=300)
        assert "error" not in result, result.get("error")
        assert killed_at < 30, killed_at  # killed mid-job, not after it
        same_rows(rows_of(out), rows_of(tmp_path / "one"))
        assert result["manifest"]["scored"] == 480 and result["manifest"]["errors"] == 0
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_a_slow_server_gets_fewer_rows(tmp_path, tiny_hf_dir):
    data = write_rows(tmp_path / "data.parquet", 768)
    with ServerThread(settings_for(tiny_hf_dir)) as fast, ServerThread(settings_for(tiny_hf_dir)) as slow:
        with Proxy(slow.port, delay_s=0.2) as delayed:
            run_batch(
                [str(data)], tmp_path / "out", servers=[fast.address, f"127.0.0.1:{delayed.port}"], progress=False
            )
        rows_fast, rows_slow = scored(fast), scored(slow)
    assert rows_fast + rows_slow == 768
    assert 0 < rows_slow < rows_fast, (rows_fast, rows_slow)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_mixed_fleet_is_refused_unless_the_model_is_expected(tmp_path, tiny_hf_dir, twin_hf_dir, transport):
    data = write_rows(tmp_path / "data.parquet", 40)
    with ServerThread(settings_for(tiny_hf_dir)) as old, ServerThread(settings_for(twin_hf_dir)) as new:
        identity = {}
        for name, server in (("old", old), ("new", new)):
            with Client(server.address) as client:
                identity[name] = client.model_info().identity
        assert identity["old"] != identity["new"]
        if transport == "grpc":
            a, b = old.address, new.address
        else:
            a, b = (f"http://127.0.0.1:{s.server.http_port}" for s in (old, new))

        with pytest.raises(Conflict) as refused:
            run_batch([str(data)], tmp_path / "mixed", servers=[a, b], progress=False)
        message = str(refused.value)
        assert f"{a} serves {identity['old']}" in message and f"{b} serves {identity['new']}" in message
        assert not list((tmp_path / "mixed" / "_scores").glob("shard-*"))  # nothing scored by either

        code = cli(["batch", "--input", str(data), "--output", str(tmp_path / "cli"), "--server", f"{a},{b}"])
        assert code == 1  # the CLI refuses too, with the message and no traceback

        digest = identity["new"].rsplit(":", 1)[1]  # the whole identity or its digest
        manifest = run_batch(
            [str(data)], tmp_path / "new", servers=[a, b], expect_model=digest, shard_size=8, progress=False
        )
        assert manifest["scored"] == 40 and scored(old) == 0 and scored(new) == 40
        assert manifest["model_identity"] == {"pickscore": identity["new"]}
        success = json.loads((tmp_path / "new" / "_SUCCESS").read_text())
        assert success["model_identity"] == {"pickscore": identity["new"]}

        # a job scored by one model is not resumed by another, though its arguments are the same
        (tmp_path / "new" / "_scores" / "shard-00002.parquet").unlink()
        with pytest.raises(ValueError, match="was scored by .* but the model now is"):
            run_batch(
                [str(data)], tmp_path / "new", servers=[a, b], expect_model=identity["old"], shard_size=8,
                resume=True, progress=False,
            )  # fmt: skip
