"""RewardClient (and the fleet under it) over several real replicas: one SIGKILLed mid-stream costs no reward, a hung
one is left behind, DNS names are resolved and refreshed, and replicas serving different models are refused."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from pickscore.client import AsyncClient, RewardClient
from pickscore.client.fleet import Fleet
from pickscore.errors import Conflict
from pickscore.scorer import Scorer
from pickscore.server.app import ServerThread
from tests.conftest import make_hf_clip, save_hf_clip
from tests.proxy import Proxy
from tests.server.conftest import PROMPT, jpeg, metric, settings_for
from tests.server.test_sigterm import start_server

IMAGES = [jpeg(i, size=64) for i in range(48)]


@pytest.fixture(scope="module")
def expected(tiny_hf_dir) -> np.ndarray:
    return np.array(Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32").score(PROMPT, IMAGES))


def scored(server: ServerThread) -> float:
    return metric(server, "pickscore_images_scored_total")


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_every_reward_arrives_when_a_replica_is_killed_mid_stream(tiny_hf_dir, expected, transport):
    servers = [start_server(tiny_hf_dir) for _ in range(3)]
    key = "port" if transport == "grpc" else "http_port"
    addresses = [("" if transport == "grpc" else "http://") + f"127.0.0.1:{s[key]}" for _, s, _ in servers]
    try:
        futures = []
        with RewardClient(addresses, max_batch=8, max_delay_s=0.002, timeout=60) as rewards:
            for step in range(60):  # a trainer's steps: 8 images each, the next generated while these score
                futures += [(k, rewards.submit(PROMPT, IMAGES[k])) for k in range(step % 6 * 8, step % 6 * 8 + 8)]
                if step == 20:  # mid-stream, with calls in flight on it
                    os.kill(servers[1][0].pid, signal.SIGKILL)
                time.sleep(0.01)
            got = np.array([f.result(timeout=120) for _, f in futures])
            state = rewards.replicas()
        np.testing.assert_allclose(got, expected[[k for k, _ in futures]], atol=1e-5)
        assert state[addresses[1]]["failures"] >= 1  # it was taken out...
        assert state[addresses[0]]["rows"] + state[addresses[2]]["rows"] > 3 * state[addresses[1]]["rows"]
        assert sum(s["rows"] for s in state.values()) == len(futures)  # ...and no reward was sent twice
    finally:
        for proc, _, _ in servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


class _Sender:
    """Score requests on an AsyncClient: what a fleet sends in these tests."""

    def __init__(self, address: str, server_name: str | None = None):
        self.client = AsyncClient(address)

    async def score(self, images: list[bytes], timeout: float) -> list[float]:
        return await self.client.score(PROMPT, images, timeout=timeout)

    async def close(self) -> None:
        await self.client.close()


async def _score_all(fleet: Fleet, requests: int, deadline_s: float = 60.0) -> list[list[float]]:
    loop = asyncio.get_running_loop()

    async def one(k: int) -> list[float]:
        images = IMAGES[k % 6 * 8 : k % 6 * 8 + 8]
        return await fleet.call(8, lambda sender, timeout: sender.score(images, timeout), loop.time() + deadline_s)

    try:
        return await asyncio.gather(*(one(k) for k in range(requests)))
    finally:
        await fleet.close()


def test_a_hung_replica_is_left_behind(tiny_hf_dir, expected):
    with ServerThread(settings_for(tiny_hf_dir)) as good, Proxy(good.port) as hung:
        addresses = [good.address, f"127.0.0.1:{hung.port}"]
        fleet = Fleet(addresses, _Sender, [""], {}, stall_floor_s=0.5)

        async def run() -> list[list[float]]:
            await fleet.ready()  # both say which model they serve; then one hangs, its connections open
            hung.hung = True
            return await _score_all(fleet, 24)

        start = time.monotonic()
        got = asyncio.run(run())
        took = time.monotonic() - start
    np.testing.assert_allclose(np.concatenate(got), np.tile(expected, 4), atol=1e-5)
    report = fleet.report()
    assert report[addresses[1]]["rows"] == 0 and report[addresses[1]]["failures"] >= 1
    assert took < 15  # left behind after the stall limit, not at gRPC's 20 s connection timeout or the deadline


def test_a_dns_name_is_resolved_and_refreshed(tiny_hf_dir, expected):
    with ServerThread(settings_for(tiny_hf_dir)) as a, ServerThread(settings_for(tiny_hf_dir)) as b:
        answers = {"now": [a.address]}

        async def resolve(host: str, port: int) -> list[str]:
            assert (host, port) == ("scorers.internal", 8001)
            return answers["now"]

        async def run() -> tuple[float, float, float]:
            fleet = Fleet(["dns:///scorers.internal:8001"], _Sender, [""], {}, refresh_s=0.1, resolve=resolve)
            loop = asyncio.get_running_loop()

            def calls():
                return asyncio.gather(
                    *(fleet.call(8, lambda s, t: s.score(IMAGES[:8], t), loop.time() + 30) for _ in range(8))
                )

            try:
                await calls()
                only_a = scored(b)
                answers["now"] = [a.address, b.address]  # a replica appears
                await asyncio.sleep(0.3)
                await calls()
                both = scored(b)
                answers["now"] = [b.address]  # and one goes away
                await asyncio.sleep(0.3)
                before = scored(a)
                await calls()
                return only_a, both, scored(a) - before
            finally:
                await fleet.close()

        only_a, both, a_after = asyncio.run(run())
    assert only_a == 0 and both > 0 and a_after == 0

    with ServerThread(settings_for(tiny_hf_dir)) as server:  # the system's DNS, both transports
        for address in (f"dns:///localhost:{server.port}", f"dns+http://localhost:{server.server.http_port}"):
            with RewardClient(address, timeout=30) as rewards:
                got = [rewards.submit(PROMPT, image) for image in IMAGES[:8]]
                np.testing.assert_allclose([f.result() for f in got], expected[:8], atol=1e-5)


@pytest.fixture(scope="module")
def twin_hf_dir(tmp_path_factory) -> Path:
    return save_hf_clip(make_hf_clip(seed=7), tmp_path_factory.mktemp("twin"))


def test_replicas_of_different_models_are_refused_even_when_not_required(tiny_hf_dir, twin_hf_dir, expected):
    with ServerThread(settings_for(tiny_hf_dir)) as old, ServerThread(settings_for(twin_hf_dir)) as new:
        http = [f"http://127.0.0.1:{s.server.http_port}" for s in (old, new)]
        with RewardClient(http, required=False, timeout=30) as rewards:
            error = rewards.submit(PROMPT, IMAGES[0]).exception(timeout=30)
        assert isinstance(error, Conflict) and http[0] in str(error) and http[1] in str(error)
        with RewardClient([old.address], timeout=30) as rewards:
            identity = rewards.served()[""].identity
        with RewardClient(http, expect_model=identity, timeout=30) as rewards:
            got = [rewards.submit(PROMPT, image) for image in IMAGES[:8]]
            np.testing.assert_allclose([f.result() for f in got], expected[:8], atol=1e-5)
            assert rewards.replicas()[http[1]]["excluded"]
        assert scored(new) == 0


@pytest.mark.parametrize(
    "addresses, message",
    [
        (["127.0.0.1:1", "127.0.0.1:1"], "server address 127.0.0.1:1 given twice"),
        ([], "no server address"),
        (["dns:///scorers"], "dns:///scorers: a DNS name needs a host and a port"),
        (["dns+http://:8000"], "a DNS name needs a host and a port"),
    ],
)
def test_bad_addresses_are_refused_before_anything_is_dialled(addresses, message):
    with pytest.raises(ValueError, match=message):
        RewardClient(addresses)
