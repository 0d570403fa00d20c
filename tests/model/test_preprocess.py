from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pickscore.errors import InvalidInput
from pickscore.model.preprocess import PreprocessConfig, decode_image, load_pixels, preprocess
from tests.conftest import png_bomb, varied_images


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
