"""The torchvision preprocessing style (``PreprocessConfig.torchvision``) against the real references: open_clip's
eval transform (HPS v2) and a transcription of ImageReward's ``_transform`` (OpenAI CLIP's, which the LAION
aesthetic predictor uses, is the same), over many sizes, modes and formats; the two styles differ where they
should; the config keeps its style through ``to_hf``/``from_hf``; the normalisation is torchvision's, bit for bit."""

from __future__ import annotations

import functools
import io
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import image_transform
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from pickscore.backends.torch_backend import DeviceNormalizer
from pickscore.model.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    FULL_RESIZE_AREA,
    PreprocessConfig,
    _vertical_first,
    crop_offsets,
    crop_uint8,
    exact_divisor,
    load_pixels,
    load_uint8,
    normalize,
)
from tests.conftest import _picture

TORCHVISION = PreprocessConfig.torchvision()


def _convert_image_to_rgb(image):
    return image.convert("RGB")


def image_reward_transform(n_px: int) -> Compose:
    """A transcription of ImageReward's ``_transform`` (ImageReward/ImageReward.py; OpenAI CLIP's is the same)."""
    return Compose(
        [
            Resize(n_px, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(n_px),
            _convert_image_to_rgb,
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )


REFERENCES = {
    "open_clip": image_transform(224, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD),
    "image_reward": image_reward_transform(224),
}

# (width, height). Resized to a short side of 224, the long side's excess over the crop is even (exact halves),
# 1 or 5 (x.5 rounds to even: the floor), or 3 (1.5 rounds up: torchvision's crop starts one sample later).
SIZES = {
    "square": (512, 512),
    "landscape": (640, 480),
    "portrait": (300, 700),
    "excess-1": (225, 224),
    "excess-3": (227, 224),
    "excess-3-portrait": (448, 454),
    "excess-5": (458, 448),
    "tiny": (16, 16),
    "tiny-odd": (17, 30),  # 224 x 395: excess 171, offset 85.5 -> 86
    "one-pixel": (1, 1),
    "region-wide": (1500, 100),  # past FULL_RESIZE_AREA: only the crop's source region is resized
    "region-tall": (90, 728),
    "banner": (728, 90),
    "region-thin": (60, 700),
    "region-vertical-first": (300, 1300),  # a shape Pillow 13 resizes vertical pass first
}
KINDS = (
    "rgb.jpg",
    "rgb.png",
    "rgb.webp",
    "rgb.bmp",
    "rgb.tiff",
    "rgba.png",
    "rgba.webp",
    "la.png",
    "l.png",
    "l.jpg",
    "p.png",
    "p-transparent.gif",
    "p-alpha.png",
    "1.png",
    "cmyk.jpg",
    "cmyk.tiff",
)
NEAREST_KINDS = ("p.png", "p-transparent.gif", "p-alpha.png", "1.png")  # Pillow resizes P and 1 nearest


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _alpha(width: int, height: int) -> Image.Image:
    """Blocks of alpha 0, 85, 170, 255: transparent pixels that keep their colour, translucent and opaque ones."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray((((x // 7 + y // 5) % 4) * 85).astype(np.uint8))


@functools.cache
def encoded(kind: str, size: tuple[int, int]) -> bytes:
    """An image of ``kind`` (mode and format, as its file name says) and ``size``, encoded."""
    width, height = size
    rgb = Image.fromarray(_picture(np.random.default_rng(width * 7919 + height), width, height))
    name, fmt = kind.rsplit(".", 1)
    fmt = {"jpg": "JPEG", "tiff": "TIFF", "bmp": "BMP", "gif": "GIF", "png": "PNG", "webp": "WEBP"}[fmt]
    options = {"JPEG": {"quality": 90}, "WEBP": {"lossless": name == "rgba", "quality": 80}}.get(fmt, {})
    if name in ("rgba", "la"):
        rgba = rgb.convert("RGBA")
        rgba.putalpha(_alpha(width, height))
        return _encode(rgba.convert(name.upper()), fmt, **options)
    if name.startswith("p"):
        palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=200)
        if name == "p-transparent":
            options["transparency"] = 3
        elif name == "p-alpha":  # a tRNS entry per palette index: Pillow keeps it as bytes
            options["transparency"] = bytes(range(0, 200, 1))
        return _encode(palette, fmt, **options)
    return _encode(rgb.convert({"rgb": "RGB", "l": "L", "1": "1", "cmyk": "CMYK"}[name]), fmt, **options)


def _takes_region_path(size: tuple[int, int]) -> bool:
    short, long = min(size), max(size)
    return 224 * int(224 * long / short) > FULL_RESIZE_AREA * 224 * 224


EXACT = [(k, s) for s in SIZES for k in KINDS if not _takes_region_path(SIZES[s]) or k in NEAREST_KINDS]
REGION = [(k, s) for s in SIZES for k in KINDS if (k, s) not in EXACT]


@pytest.mark.filterwarnings("ignore:Palette images with Transparency expressed in bytes:UserWarning")  # theirs
@pytest.mark.parametrize("reference", sorted(REFERENCES))
@pytest.mark.parametrize("kind,size", EXACT, ids=[f"{k}-{s}" for k, s in EXACT])
def test_pixels_equal_the_torchvision_references(reference, kind, size):
    """Bit for bit wherever the whole image is resized, and for P and 1 images (nearest-neighbour) everywhere."""
    data = encoded(kind, SIZES[size])
    expected = REFERENCES[reference](Image.open(io.BytesIO(data))).numpy()
    ours = load_pixels(data, TORCHVISION)
    assert ours.shape == expected.shape == (3, 224, 224) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("kind,size", REGION, ids=[f"{k}-{s}" for k, s in REGION])
def test_region_path_stays_within_a_level_or_two(kind, size):
    """Past FULL_RESIZE_AREA only the crop's source region is resized: a few samples differ by a level or two
    where Pillow's float32 box coordinates round (premultiplied: that much of colour x alpha, so a translucent
    pixel's colour, divided by its alpha again, may move further; a transparent one's is anyone's)."""
    data = encoded(kind, SIZES[size])
    resize, crop, to_rgb = REFERENCES["open_clip"].transforms[:3]
    cropped = crop(resize(Image.open(io.BytesIO(data))))
    expected = np.asarray(to_rgb(cropped)).astype(int)
    alpha = np.asarray(cropped)[..., -1] if cropped.mode in ("RGBA", "LA") else np.full((224, 224), 255)
    diff = np.abs(load_uint8(data, TORCHVISION).astype(int) - expected)
    weighted = diff * np.maximum(alpha, 1)[..., None] / 255
    assert weighted.max() <= 2 and (diff > 0).mean() < 0.01, (weighted.max(), (diff > 0).mean())


def test_sixteen_bit_gray_is_scaled_not_clipped():
    """The one deliberate difference: the references clip 16-bit samples to white; here they are x/257."""
    wide = np.linspace(0, 65535, 300 * 200).reshape(200, 300).astype(np.uint16)
    data = _encode(Image.fromarray(wide), "PNG")
    as8 = Image.fromarray(np.round(wide / 257).astype(np.uint8))
    np.testing.assert_array_equal(load_pixels(data, TORCHVISION), REFERENCES["open_clip"](as8).numpy())


def test_pixels_a_caller_holds_are_not_composited():
    rgba = Image.open(io.BytesIO(encoded("rgba.png", (300, 500))))
    expected = REFERENCES["image_reward"](rgba).numpy()
    np.testing.assert_array_equal(load_pixels(np.asarray(rgba), TORCHVISION), expected)
    np.testing.assert_array_equal(load_pixels(rgba, TORCHVISION), expected)


def test_palette_transparency_raises_no_warning():
    """The references' plain convert warns about a palette's per-entry transparency; ours drops it unread."""
    data = encoded("p-alpha.png", (240, 240))
    assert isinstance(Image.open(io.BytesIO(data)).info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_uint8(data, TORCHVISION)


def test_crop_offsets_round_half_to_even_and_pad_like_center_crop():
    transformers, torchvision = PreprocessConfig(), TORCHVISION
    assert [crop_offsets(w, 224, torchvision)[1] for w in range(224, 232)] == [0, 0, 1, 2, 2, 2, 3, 4]
    assert [crop_offsets(w, 224, transformers)[1] for w in range(224, 232)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert crop_offsets(224, 221, torchvision) == (-1, 0)  # torchvision pads 1 above, 2 below
    assert crop_offsets(224, 221, transformers) == (-2, 0)


@pytest.mark.parametrize("mode", ["RGB", "P", "RGBA"])
@pytest.mark.parametrize("size", [(10, 7), (300, 5), (21, 17)])
def test_crop_larger_than_image_pads_like_torchvision(mode, size):
    """torchvision pads with 0 in the image's own mode before converting: a P image's pad is palette entry 0."""
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    img = img.convert(mode) if mode != "P" else img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    cfg = PreprocessConfig(do_resize=False, crop_size=(16, 20), style="torchvision")
    expected = np.asarray(Compose([CenterCrop((16, 20)), _convert_image_to_rgb])(img))
    np.testing.assert_array_equal(crop_uint8(img, cfg), expected)


def test_the_styles_differ_where_they_should():
    """An excess of 3 columns: torchvision's crop starts at column 2, transformers' at 1. A transparent image:
    transformers composites it onto white, torchvision keeps the colours under the alpha."""
    img = Image.fromarray(_picture(np.random.default_rng(0), 227, 224))
    tv, hf = crop_uint8(img, TORCHVISION), crop_uint8(img, PreprocessConfig())
    assert not np.array_equal(tv, hf)
    np.testing.assert_array_equal(tv[:, :-1], hf[:, 1:])
    rgba = Image.open(io.BytesIO(encoded("rgba.png", (224, 224))))
    assert (crop_uint8(rgba, PreprocessConfig()) == 255).all(-1).mean() > 0.2  # the alpha-0 blocks, white
    np.testing.assert_array_equal(crop_uint8(rgba, TORCHVISION), np.asarray(rgba.convert("RGB")))


def test_config_keeps_its_style_through_hf_json():
    assert TORCHVISION == PreprocessConfig(style="torchvision") and TORCHVISION != PreprocessConfig()
    assert hash(TORCHVISION) != hash(PreprocessConfig())
    assert "pickscore_style" not in PreprocessConfig().to_hf()  # the transformers style: HF's own format
    assert TORCHVISION.to_hf()["pickscore_style"] == "torchvision"
    for cfg in (PreprocessConfig(), TORCHVISION, PreprocessConfig.torchvision(336, (0.5,) * 3, (0.25,) * 3)):
        assert PreprocessConfig.from_hf(cfg.to_hf()) == cfg
    big = PreprocessConfig.torchvision(336, (0.5,) * 3, (0.25,) * 3)
    assert (big.shortest_edge, big.crop_size, big.resample) == (336, (336, 336), Image.Resampling.BICUBIC)
    assert (big.image_mean, big.image_std) == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="unknown preprocessing style 'timm'"):
        PreprocessConfig.from_hf({"pickscore_style": "timm"})
    with pytest.raises(ValueError, match="rescales by 1/255"):
        PreprocessConfig(style="torchvision", rescale_factor=1 / 256)


@pytest.mark.parametrize(
    "mean,std", [(CLIP_MEAN, CLIP_STD), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.5,) * 3)]
)
def test_normalize_is_torchvisions_arithmetic_bit_for_bit(mean, std):
    """ToTensor (float32 x / 255) then Normalize (float32 (x - mean) / std), on every uint8 value of every
    channel: ``normalize`` and the torch backend's on-device normaliser (here on the CPU) give the same bits."""
    cfg = PreprocessConfig.torchvision(mean=mean, std=std)
    values = np.arange(256)
    crops = np.stack([values, np.roll(values, 85), values[::-1]], -1).reshape(4, 8, 8, 3).astype(np.uint8)
    reference = Compose([ToTensor(), Normalize(mean, std)])
    expected = np.stack([reference(crop).numpy() for crop in crops])
    assert exact_divisor(cfg) == 255.0
    np.testing.assert_array_equal(normalize(crops, cfg), expected)
    np.testing.assert_array_equal(DeviceNormalizer(cfg)(torch.from_numpy(crops)).numpy(), expected)


def test_pillow_pass_order_is_the_one_the_region_path_assumes():
    """The region path resizes in Pillow's pass order; Pillow 13 chose it by a rule of its own (vertical first
    when the height shrinks by more than twice as many samples as the width): check it on the installed Pillow."""
    rng = random.Random(0)
    for _ in range(60):
        source = (rng.randint(20, 200), rng.randint(20, 200))
        size = (rng.randint(10, 240), rng.randint(10, 240))
        img = Image.fromarray(np.random.default_rng(sum(source)).integers(0, 256, (*source[::-1], 3), np.uint8))
        whole = np.asarray(img.resize(size, Image.Resampling.BICUBIC))
        vertical = img.resize((source[0], size[1]), Image.Resampling.BICUBIC).resize(size, Image.Resampling.BICUBIC)
        horizontal = img.resize((size[0], source[1]), Image.Resampling.BICUBIC).resize(size, Image.Resampling.BICUBIC)
        first = np.asarray(vertical if _vertical_first(source, size) else horizontal)
        np.testing.assert_array_equal(first, whole, err_msg=f"{source} -> {size}")


@pytest.mark.parametrize("mode,size", [("P", (60000, 1)), ("RGBA", (1, 60000)), ("L", (40000, 3))])
def test_a_strip_costs_what_its_crop_costs(mode, size):
    """Resized whole, a 60000 x 1 strip would be 13 million x 224 samples; in a process capped at 1 GiB of
    address space it still comes out as one crop (P: nearest, replayed; RGBA: premultiplied)."""
    data = _encode(Image.new("RGB", size, (200, 30, 30)).convert(mode), "PNG")
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from pickscore.model.preprocess import PreprocessConfig, load_uint8\n"
        "x = load_uint8(sys.stdin.buffer.read(), PreprocessConfig.torchvision())\n"
        "print(x.shape, *x[112, 112])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-1000:]
    colour = np.asarray(Image.new("RGB", (1, 1), (200, 30, 30)).convert(mode).convert("RGB"))[0, 0]
    assert done.stdout.decode().split() == ["(224,", "224,", "3)", *map(str, colour)]
