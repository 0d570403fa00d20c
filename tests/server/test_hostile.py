"""Hostile images against `pickscore serve` as a real process: extreme strips cost what their crop costs (the
process's peak RSS is measured), an aspect-ratio limit refuses them by name, ordinary scores are unchanged."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pickscore.client import Client
from pickscore.errors import InvalidInput
from pickscore.scorer import Scorer
from tests.server.conftest import PROMPT, jpeg
from tests.server.test_sigterm import start_server

# (width, height, mode): both orientations, with and without alpha, 8-bit and 16-bit
STRIPS = [(60000, 1, "RGB"), (1, 60000, "RGBA"), (60000, 2, "LA"), (2, 40000, "I;16"), (45000, 3, "RGBA")]


def png(width: int, height: int, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 200 if mode in ("I;16", "LA") else (200, 30, 30, 255)[: len(mode)]).save(
        buf, "PNG"
    )
    return buf.getvalue()


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_extreme_strips_are_answered_quickly_in_bounded_memory(tiny_hf_dir):
    ordinary = [jpeg(i, size=320) for i in range(4)]
    expected = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32").score(PROMPT, ordinary)
    proc, entry, _ = start_server(tiny_hf_dir, "--max-aspect-ratio", "100000", "--decode-workers", "2")
    try:
        with Client(f"127.0.0.1:{entry['port']}") as client:
            np.testing.assert_allclose(client.score(PROMPT, ordinary), expected, atol=1e-5)  # everything warm
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
            before = peak_rss(proc.pid)
            for width, height, mode in STRIPS:
                start = time.perf_counter()
                (score,) = client.score(PROMPT, [png(width, height, mode)])
                assert np.isfinite(score)
                # 46 s and 12 GB for 60000 x 1 before the crop bounded the resize; well under 1 s now
                assert time.perf_counter() - start < 10, (width, height, mode)
            grown = peak_rss(proc.pid) - before
            assert grown < 100 << 20, f"peak RSS grew {grown / 2**20:.0f} MiB"
            np.testing.assert_allclose(client.score(PROMPT, ordinary), expected, atol=1e-5)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("width, height", [(60000, 1), (1, 60000), (5100, 100)])
def test_aspect_ratio_limit_names_the_image(server, width, height):
    with Client(server.address) as client:
        strip = png(width, height, "RGBA")
        with pytest.raises(InvalidInput, match=rf"image 1: image is {width}x{height}, an aspect ratio of .* over the "):
            client.score(PROMPT, [jpeg(0), strip])
        pixels = np.zeros((height, width, 3), np.uint8)  # raw pixels meet the same limit
        with pytest.raises(InvalidInput, match=r"image 0: image is .* over the limit of 50:1"):
            client.score(PROMPT, [pixels])
        (score,) = client.score(PROMPT, [png(5000, 100, "RGB")])  # 50:1 is still taken
        assert np.isfinite(score)
