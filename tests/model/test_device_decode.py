"""--decode-on-device: JPEGs decoded and resized with torchvision on the model's device (the CPU here, the same
code as on a GPU) come close to the exact crops; everything else takes the exact path bit for bit; the limits
are checked from the header before any decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pickscore.errors import InvalidInput
from pickscore.model.device_decode import crop_on_device
from pickscore.model.preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig, load_uint8
from tests.conftest import _picture

CFG = PreprocessConfig()


def encoded(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("size", [(512, 512), (640, 360), (300, 900), (180, 120), (224, 224)])
def test_jpegs_come_close_to_the_exact_crop(size):
    """Same crop window; samples within a level or two (0.1 on average here): torchvision's antialiased bicubic
    is not Pillow's fixed-point one. Sizes: square, landscape, portrait, upscaled, already the crop size."""
    data = encoded(_picture(np.random.default_rng(sum(size)), *size))
    exact = load_uint8(data, CFG).astype(int)
    near = crop_on_device(data, CFG, "cpu", DEFAULT_MAX_PIXELS)
    assert near.shape == exact.shape == (224, 224, 3) and near.dtype == np.uint8
    diff = np.abs(near.astype(int) - exact)
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 2, (size, diff.mean(), np.percentile(diff, 99))


def test_grayscale_jpegs_become_rgb():
    gray = _picture(np.random.default_rng(1), 320, 240)[..., 0]
    data = encoded(gray)
    near = crop_on_device(data, CFG, "cpu", DEFAULT_MAX_PIXELS)
    assert near.shape == (224, 224, 3)
    assert np.abs(near.astype(int) - load_uint8(data, CFG).astype(int)).mean() < 0.5


def test_other_formats_and_configs_take_the_exact_path_bit_for_bit():
    pixels = _picture(np.random.default_rng(2), 300, 200)
    png = encoded(pixels, "PNG")
    np.testing.assert_array_equal(crop_on_device(png, CFG, "cpu", DEFAULT_MAX_PIXELS), load_uint8(png, CFG))
    np.testing.assert_array_equal(crop_on_device(pixels, CFG, "cpu", DEFAULT_MAX_PIXELS), load_uint8(pixels, CFG))
    jpeg = encoded(pixels)
    squash = PreprocessConfig(shortest_edge=None, resize_to=(224, 224))
    np.testing.assert_array_equal(crop_on_device(jpeg, squash, "cpu", DEFAULT_MAX_PIXELS), load_uint8(jpeg, squash))


def test_limits_are_checked_from_the_header_and_broken_jpegs_are_named():
    data = encoded(_picture(np.random.default_rng(3), 400, 300))
    with pytest.raises(InvalidInput, match="over the limit of 100000"):
        crop_on_device(data, CFG, "cpu", max_pixels=100_000)
    with pytest.raises(InvalidInput, match="aspect ratio"):
        crop_on_device(encoded(_picture(np.random.default_rng(4), 400, 40)), CFG, "cpu", DEFAULT_MAX_PIXELS, 5.0)
    with pytest.raises(InvalidInput, match="not a decodable image"):
        crop_on_device(data[: len(data) // 3], CFG, "cpu", DEFAULT_MAX_PIXELS)


@pytest.mark.parametrize("size", [(227, 224), (454, 448), (448, 454)])
def test_torchvision_style_crops_its_own_window(size):
    """Resized, these leave 3 samples beyond the crop: torchvision's window starts at 2 (1.5 rounded), transformers'
    at 1. The device path follows the config's style: close to the exact torchvision crop, not to the other."""
    data = encoded(_picture(np.random.default_rng(5), *size))
    near = crop_on_device(data, PreprocessConfig.torchvision(), "cpu", DEFAULT_MAX_PIXELS).astype(int)
    own = np.abs(near - load_uint8(data, PreprocessConfig.torchvision()))
    other = np.abs(near - load_uint8(data, CFG))
    assert own.mean() < 0.5 and np.percentile(own, 99) <= 2 and other.mean() > 1.5, (own.mean(), other.mean())
