"""A real server on loopback for each test module, on the tiny model of the top-level conftest."""

from __future__ import annotations

import io
import urllib.request

import numpy as np
import pytest
from PIL import Image

from pickscore.server.app import ServerThread
from pickscore.server.settings import Settings

PROMPT = "a red square on a blue background"


def settings_for(model, **overrides) -> Settings:
    base = dict(
        model=str(model),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        device="cpu",
        dtype="fp32",
        max_queue_delay_ms=5.0,
        log_format="text",
        grace_period_s=10.0,
        http_port=0,
    )
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="module")
def server(tiny_hf_dir):
    with ServerThread(settings_for(tiny_hf_dir)) as s:
        yield s


def jpeg(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def scrape(server: ServerThread) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(server: ServerThread, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, from a real /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(scrape(server)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
