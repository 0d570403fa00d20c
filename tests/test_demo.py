"""The bundled demo model: shipped inside the package, small, loadable as `--model demo`, and served by default."""

from __future__ import annotations

import io
import random

from pickscore.backends import load_backend
from pickscore.model.checkpoint import DEMO_DIR, resolve
from pickscore.scenes import random_scene, render, vary
from pickscore.scorer import Scorer
from pickscore.server.settings import Settings
from pickscore.training.evaluate import evaluate
from pickscore.training.synthetic import write_synthetic


def test_demo_is_bundled_small_and_safetensors():
    files = {p.name: p.stat().st_size for p in DEMO_DIR.iterdir()}
    assert "open_clip_model.safetensors" in files and not any(n.endswith((".bin", ".pt")) for n in files)
    assert sum(files.values()) <= 20 * 1024 * 1024
    assert resolve("demo").source == "demo"
    assert Settings().model == "demo"  # what `make serve` serves


def test_demo_prefers_the_image_that_matches_its_prompt():
    scorer = Scorer.from_pretrained("demo", device="cpu", dtype="fp32")
    rng = random.Random(20261122)  # never used in training
    wins = 0
    for _ in range(40):
        prompt = random_scene(rng)
        images = []
        for scene in (prompt, vary(prompt, 3, rng)):
            buf = io.BytesIO()
            render(scene, 64, rng).save(buf, "PNG")
            images.append(buf.getvalue())
        scores = scorer.score(prompt.caption, images)
        wins += scores[0] > scores[1]
    assert wins >= 36, f"matching image preferred in {wins} of 40"


def test_demo_accuracy_on_fresh_held_out_pairs(tmp_path):
    # The README's figure, on a smaller set: the paper's protocol on ~530 prompts per split from a seed no
    # training stage used. 87% sits about three standard errors (1.2 points each here) under what the
    # bundled model measures: it refuses a broken or badly undertrained model, not a point or two.
    write_synthetic(tmp_path, pairs=3000, seed=31, held_out=0.5)
    result = evaluate(load_backend("demo", device="cpu", dtype="fp32"), tmp_path)
    assert result["test_pairs"] > 500 and result["skipped"] == 0
    assert result["accuracy"] >= 0.87, result
