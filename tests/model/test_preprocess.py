from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pickscore.backends.torch_backend import DeviceNormalizer
from pickscore.errors import InvalidInput
from pickscore.model.preprocess import (
    PreprocessConfig,
    crop_uint8,
    decode_image,
    exact_divisor,
    load_pixels,
    normalize,
    preprocess,
    to_rgb,
)
from tests.conftest import _picture, png_bomb, varied_images


@pytest.fixture(scope="module")
def hf_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**PreprocessConfig().to_hf())


@pytest.mark.parametrize("name,data,rgb", varied_images(), ids=[n for n, _, _ in varied_images()])
def test_pixels_equal_clip_image_processor(hf_processor, name, data, rgb):
    reference_input = rgb if rgb is not None else Image.open(io.BytesIO(data))
    expected = hf_processor(images=[reference_input], return_tensors="np")["pixel_values"][0]
    ours = load_pixels(data, PreprocessConfig())
    assert ours.shape == expected.shape == (3, 224, 224) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


def test_sixteen_bit_gray_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256 * 256).reshape(256, 256).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    cfg = PreprocessConfig(do_normalize=False, do_resize=False, crop_size=(256, 256))
    x = load_pixels(buf.getvalue(), cfg)
    np.testing.assert_allclose(x[0], ramp / 65535, atol=1 / 255)  # PIL's own convert would be ~all 1.0


@pytest.mark.parametrize("size", [(10, 7), (300, 5)])
def test_crop_larger_than_image_pads_like_transformers(hf_processor, size):
    from transformers import CLIPImageProcessorPil

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    cfg = PreprocessConfig(do_resize=False, crop_size=(16, 20))
    expected = CLIPImageProcessorPil(**cfg.to_hf())(images=[img], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(img, cfg), expected, atol=1e-6)


def test_legacy_and_exact_size_configs():
    legacy = PreprocessConfig.from_hf({"size": 224, "crop_size": 224})
    assert legacy.shortest_edge == 224 and legacy.crop_size == (224, 224)
    exact = PreprocessConfig.from_hf({"size": {"height": 64, "width": 48}, "do_center_crop": False})
    assert exact.output_size == (64, 48)
    assert PreprocessConfig.from_hf(exact.to_hf()) == exact
    with pytest.raises(ValueError, match="size"):
        PreprocessConfig.from_hf({"size": {"longest_edge": 3}})


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"plain text, not an image", "cannot identify image file"),
        (png_bomb(40000, 40000), "pixel limit"),  # over PIL's own bomb threshold
        (png_bomb(9000, 9000), "over the limit of"),  # between our limit and PIL's
    ],
)
def test_undecodable_inputs_raise_invalid_input(data, reason):
    with pytest.raises(InvalidInput, match=reason):
        decode_image(data)


def test_truncated_jpeg_is_invalid():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG")
    with pytest.raises(InvalidInput, match="not a decodable image.*truncated"):
        decode_image(buf.getvalue()[:2000])


def test_formats_outside_the_allow_list_are_refused():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PPM")
    with pytest.raises(InvalidInput, match="cannot identify"):
        decode_image(buf.getvalue())


def test_pixel_limit_is_configurable():
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, "PNG")
    with pytest.raises(InvalidInput, match="10000 pixels, over the limit of 9999"):
        decode_image(buf.getvalue(), max_pixels=9999)
    assert decode_image(buf.getvalue(), max_pixels=10000).size == (100, 100)


def test_missing_file_is_invalid(tmp_path):
    with pytest.raises(InvalidInput, match="cannot read file"):
        load_pixels(tmp_path / "nope.png", PreprocessConfig())


def _resize_then_crop(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The reference's way: resize the whole image, then crop (affordable here: the images are small)."""
    short = min(img.size)
    width, height = (int(cfg.shortest_edge * s / short) if s != short else cfg.shortest_edge for s in img.size)
    full = img.resize((width, height), resample=cfg.resample)
    top, left = (height - cfg.crop_size[0]) // 2, (width - cfg.crop_size[1]) // 2
    return np.asarray(full.crop((left, top, left + cfg.crop_size[1], top + cfg.crop_size[0])))


@pytest.mark.parametrize("size", [(100, 1500), (1500, 100), (20, 3000), (3000, 20), (300, 1300), (1300, 300)])
def test_extreme_aspect_ratios_resize_only_the_crop_region_with_the_same_samples(size):
    """Past FULL_RESIZE_AREA the resize covers only the crop's source region; the samples stay those of
    resizing everything and cropping, up to one or two levels where Pillow's float32 box coordinates round."""
    cfg = PreprocessConfig()
    rng = np.random.default_rng(sum(size))
    for picture in (_picture(rng, *size), rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)):
        img = Image.fromarray(picture)
        diff = np.abs(crop_uint8(img, cfg).astype(int) - _resize_then_crop(img, cfg))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (size, diff.max(), (diff > 0).mean())


def test_ordinary_images_take_the_whole_image_path_bit_for_bit():
    cfg = PreprocessConfig()
    for _, data, rgb in varied_images():
        img = rgb if rgb is not None else to_rgb(decode_image(data))
        np.testing.assert_array_equal(crop_uint8(img, cfg), _resize_then_crop(img, cfg))


@pytest.mark.parametrize(
    "cfg, arithmetic",
    [
        (PreprocessConfig(), True),  # CLIP's: x / 255, minus mean, over std in float32 is exact
        (PreprocessConfig(rescale_factor=0.00392), False),  # no float32 divisor reproduces it: the table
        (PreprocessConfig(do_rescale=False, do_normalize=False), True),
    ],
)
def test_normalize_is_the_reference_arithmetic_bit_for_bit(cfg, arithmetic):
    """rescale in float64 then float32, normalise in float32: exactly what CLIPImageProcessorPil computes, on
    every uint8 value of every channel, through the float32 steps where they are exact and the table elsewhere;
    the torch backend's on-device version gives the same bits."""
    assert (exact_divisor(cfg) is not None) == arithmetic
    values = np.arange(256)
    crops = np.stack([values, np.roll(values, 85), values[::-1]], -1).reshape(4, 8, 8, 3).astype(np.uint8)
    expected = crops.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else crops.astype(np.float64)
    expected = expected.astype(np.float32)
    if cfg.do_normalize:
        expected = (expected - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    expected = expected.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(normalize(crops, cfg), expected)
    np.testing.assert_array_equal(DeviceNormalizer(cfg)(torch.from_numpy(crops)).numpy(), expected)


@pytest.mark.parametrize("size", [(60000, 1), (1, 60000), (30000, 2)])
def test_a_strip_costs_what_its_crop_costs(size):
    """A 300-byte PNG strip used to be resized to millions x 224 pixels (12 GB, 46 s for 60000 x 1). Decoded and
    preprocessed in a process whose address space is capped at 1 GiB, it must still come out as one crop."""
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from pickscore.model.preprocess import PreprocessConfig, load_pixels\n"
        "x = load_pixels(sys.stdin.buffer.read(), PreprocessConfig())\n"
        "print(x.shape, round(float(x[0, 112, 112]), 4))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], input=buf.getvalue(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-1000:]
    red = round((200 / 255 - PreprocessConfig().image_mean[0]) / PreprocessConfig().image_std[0], 4)
    assert done.stdout.decode().split() == ["(3,", "224,", "224)", str(red)]
