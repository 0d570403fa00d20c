"""Shared fixtures: tiny randomly initialised CLIP checkpoints and a varied set of test images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pickscore.model.preprocess import PreprocessConfig
from pickscore.model.tokenizer import save_hf_files

# A PickScore_v1-shaped config, shrunk: same vocabulary, context, image size, patch grid style and activation.
TINY_HF_CONFIG = {
    "projection_dim": 16,
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_act": "gelu",
        "vocab_size": 49408,
        "max_position_embeddings": 77,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 224,
        "patch_size": 32,
        "hidden_act": "gelu",
    },
}


def save_hf_clip(model, directory: Path) -> Path:
    """A transformers CLIPModel saved in the published PickScore_v1 layout: weights, tokenizer, CLIP-H preprocessing."""
    model.save_pretrained(directory)
    save_hf_files(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(PreprocessConfig().to_hf()))
    return directory


def make_hf_clip(seed: int = 0, **overrides):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = {**TINY_HF_CONFIG, **overrides}
    return CLIPModel(
        CLIPConfig(
            text_config=cfg["text_config"], vision_config=cfg["vision_config"], projection_dim=cfg["projection_dim"]
        )
    ).eval()


@pytest.fixture(scope="session")
def tiny_hf_model():
    return make_hf_clip()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_hf_model) -> Path:
    return save_hf_clip(tiny_hf_model, tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session")
def other_hf_dir(tmp_path_factory) -> Path:
    """A second tiny CLIP of another shape (wider, deeper image tower; another embedding width) and the same
    preprocessing as ``tiny_hf_dir``: the second model of a several-models server."""
    vision = {**TINY_HF_CONFIG["vision_config"], "hidden_size": 48, "num_hidden_layers": 3, "intermediate_size": 96}
    return save_hf_clip(make_hf_clip(seed=1, projection_dim=24, vision_config=vision), tmp_path_factory.mktemp("other"))


@pytest.fixture(scope="session")
def small_crop_hf_dir(tmp_path_factory) -> Path:
    """A third tiny CLIP that crops to 160 px (another preprocessing: its images are decoded apart)."""
    vision = {**TINY_HF_CONFIG["vision_config"], "image_size": 160}
    directory = save_hf_clip(make_hf_clip(seed=2, vision_config=vision), tmp_path_factory.mktemp("small_crop"))
    config = PreprocessConfig(shortest_edge=160, crop_size=(160, 160)).to_hf()
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return directory


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _picture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour gradients plus blocks, so resampling differences would show."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [(x * rng.uniform(0.2, 2)) % 256, (y * rng.uniform(0.2, 2)) % 256, ((x + y) * rng.uniform(0.1, 1)) % 256], -1
    )
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        base[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(0, 256, 3)
    return base.astype(np.uint8)


def varied_images(seed: int = 0) -> list[tuple[str, bytes, Image.Image]]:
    """(file name, encoded bytes, the RGB picture a reference processor should see) for many formats and modes.

    The third element is None where the reference should decode the bytes itself; it is given only
    for 16-bit images, where this package deliberately scales to 8 bits instead of clipping.
    """
    rng = np.random.default_rng(seed)
    out = []
    rgb = lambda w, h: Image.fromarray(_picture(rng, w, h))  # noqa: E731
    for i, (w, h) in enumerate(
        [(512, 512), (640, 480), (300, 700), (225, 224), (1024, 256), (16, 16), (224, 224), (97, 351)]
    ):
        out.append((f"rgb_{i}_{w}x{h}.jpg", _encode(rgb(w, h), "JPEG", quality=90), None))
    out.append(("rgb.png", _encode(rgb(320, 240), "PNG"), None))
    rgba = rgb(256, 300).convert("RGBA")
    alpha = np.zeros((300, 256), np.uint8)
    alpha[50:250, 30:200] = 255
    alpha[100:150] = 128
    rgba.putalpha(Image.fromarray(alpha))
    out.append(("rgba.png", _encode(rgba, "PNG"), None))
    out.append(("la.png", _encode(rgba.convert("LA"), "PNG"), None))
    out.append(("gray.png", _encode(rgb(200, 260).convert("L"), "PNG"), None))
    out.append(("palette.png", _encode(rgb(240, 240).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), None))
    pal_t = rgb(180, 220).convert("P", palette=Image.Palette.ADAPTIVE)
    out.append(("palette_transparent.png", _encode(pal_t, "PNG", transparency=0), None))
    out.append(("bilevel.png", _encode(rgb(128, 128).convert("1"), "PNG"), None))
    wide = (np.linspace(0, 65535, 300 * 200).reshape(200, 300) * rng.uniform(0.5, 1)).astype(np.uint16)
    as8 = Image.fromarray(np.round(wide / 257).astype(np.uint8), "L").convert("RGB")
    out.append(("gray16.png", _encode(Image.fromarray(wide), "PNG"), as8))
    out.append(("rgb.webp", _encode(rgb(400, 300), "WEBP", quality=80), None))
    out.append(("rgba.webp", _encode(rgba, "WEBP", lossless=True), None))
    frames = [rgb(200, 150).convert("P", palette=Image.Palette.ADAPTIVE) for _ in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    out.append(("animated.gif", gif.getvalue(), None))
    out.append(("gray.jpg", _encode(rgb(333, 222).convert("L"), "JPEG"), None))
    out.append(("cmyk.jpg", _encode(rgb(260, 340).convert("CMYK"), "JPEG"), None))
    out.append(("rgb.bmp", _encode(rgb(150, 170), "BMP"), None))
    out.append(("rgb.tiff", _encode(rgb(210, 190), "TIFF"), None))
    return out


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for name, data, _ in varied_images():
        (d / name).write_bytes(data)
    return d


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A valid-looking PNG whose header declares a huge image over a tiny body."""
    import struct
    import zlib

    small = _encode(Image.new("L", (8, 8)), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    return small[:8] + patched + small[8 + 4 + 4 + 13 + 4 :]


@pytest.fixture
def bad_images(tmp_path) -> dict[str, Path]:
    """Truncated JPEG, decompression bomb, text named .png, empty file: each must fail clearly."""
    good = _encode(Image.fromarray(_picture(np.random.default_rng(1), 300, 300)), "JPEG")
    files = {
        "truncated.jpg": good[: len(good) // 2],
        "bomb.png": png_bomb(),
        "notes.png": b"this is a text file, not an image\n",
        "empty.jpg": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}
