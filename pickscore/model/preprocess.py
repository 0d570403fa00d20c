"""Image decoding and preprocessing, reproducing the reference pipelines exactly, in one of two styles.

``style="transformers"`` (the default): ``CLIPImageProcessor`` (PIL backend), PickScore's and HF CLIP's preprocessing
decode (bounded, first frame) -> RGB (transparency composited onto white)
-> resize shortest side (PIL, bicubic) -> centre crop (floor offsets, zero fill)   = ``crop_uint8``: (H, W, 3) uint8
-> rescale (x/255) -> normalise ((x - mean) / std) -> float32 (3, H, W)            = ``normalize``

``style="torchvision"`` (``PreprocessConfig.torchvision``): torchvision's ``Resize``, ``CenterCrop``,
``convert("RGB")``, ``ToTensor``, ``Normalize``, as open_clip's eval transform (HPS v2), OpenAI CLIP's (the LAION
aesthetic predictor) and ImageReward's preprocess: the image is resized in its own mode (Pillow's bicubic,
premultiplied for RGBA/LA, nearest for P and 1), centre-cropped with rounded offsets (``round((h - 224) / 2)``,
half to even; zero padding in the image's own mode when it is smaller than the crop), and only then converted
to RGB by a plain convert (no compositing: transparent pixels keep their colour); then x / 255 and
(x - mean) / std in float32.

The two halves are separate so the expensive, exact part (decode, resize, crop) hands 3 x 224 x 224 bytes to
whoever runs the model, and the cheap part runs where the model is (a backend normalises on its device, bit for
bit what ``normalize`` computes here). ``normalize_table`` defines the values: for the transformers style, what
the reference's float64 rescale then float32 normalise make of each uint8 value; for the torchvision style,
float32 x / 255 then float32 (x - mean) / std, as ``ToTensor`` and ``Normalize`` compute. Three float32
operations reproduce it exactly for CLIP's configs in either style -- x / 255, minus the mean, over the std --
and since they act on each sample alone, checking the 256 values of each channel (``exact_divisor``) proves it
for every image; a config where they do not is looked up in the table instead.

One deliberate difference from both references: 16-bit grayscale images are scaled to 8 bits (x/257) where the
references clip them to white.

Cost is bounded by the output, not the input: when resizing the whole image would make more than
``FULL_RESIZE_AREA`` times the crop's pixels (an extreme aspect ratio: a 60000 x 1 strip would become
13 million x 224), only the source region the crop keeps is resized, in Pillow's two passes and their order.
The samples are those of resizing everything and cropping, except that Pillow takes the region as float32
coordinates: on some images a few pixels differ by one or two levels (nearest-neighbour resizes, P and 1 images
included, replay Pillow's coordinate steps and stay exact). Every ordinary image takes the whole-image path and
is bit-identical to the reference.
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError

from pickscore.errors import InvalidInput
from pickscore.limits import DEFAULT_MAX_PIXELS

ImageInput = bytes | bytearray | memoryview | str | os.PathLike | Image.Image | np.ndarray

# Formats we decode; anything else (EPS, PDF, ...) is refused before a decoder runs.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Resize the whole image (bit-identical to the reference) while that makes at most this many crops' worth of
# pixels; beyond it, only the region the crop keeps (cost bounded by the output).
FULL_RESIZE_AREA = 4

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STYLES = ("transformers", "torchvision")
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# Half-width of each resampling filter's window at scale 1, as Pillow defines its filters.
_SUPPORT = {
    Image.Resampling.BOX: 0.5,
    Image.Resampling.BILINEAR: 1.0,
    Image.Resampling.HAMMING: 1.0,
    Image.Resampling.BICUBIC: 2.0,
    Image.Resampling.LANCZOS: 3.0,
}
# Modes Pillow resizes premultiplied (converted, resized, converted back), and modes it resizes nearest-neighbour.
_PREMULTIPLIED = {"RGBA": "RGBa", "LA": "La"}
_NEAREST_MODES = ("1", "P")
_NEAREST_CHUNK = 1 << 20  # coordinates replayed per step of _nearest_indices (bounds its memory)
_PILLOW = tuple(int(part) for part in PIL.__version__.split(".")[:2])


@dataclass(frozen=True)
class PreprocessConfig:
    """What ``preprocessor_config.json`` says; defaults are PickScore_v1's (CLIP-H).

    ``style``: which reference the pipeline reproduces, "transformers" (``CLIPImageProcessor``) or "torchvision"
    (torchvision's transforms; see the module docstring). Configs that differ only in style preprocess differently.
    """

    do_resize: bool = True
    shortest_edge: int | None = 224  # resize the short side to this, keeping aspect ratio
    resize_to: tuple[int, int] | None = None  # (height, width): exact resize instead
    resample: int = Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_convert_rgb: bool = True
    style: str = "transformers"

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown preprocessing style {self.style!r}; expected one of {', '.join(STYLES)}")
        if self.style == "torchvision" and not (self.do_rescale and self.rescale_factor == 1 / 255):
            raise ValueError(
                "a torchvision-style config rescales by 1/255 (ToTensor): do_rescale=True, rescale_factor=1/255; "
                f"got do_rescale={self.do_rescale}, rescale_factor={self.rescale_factor}"
            )

    @classmethod
    def torchvision(
        cls,
        size: int = 224,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        resample: int = Image.Resampling.BICUBIC,
    ) -> PreprocessConfig:
        """``Compose([Resize(size, resample), CenterCrop(size), convert("RGB"), ToTensor(), Normalize(mean, std)])``:
        open_clip's eval transform (resize_mode "shortest"), OpenAI CLIP's and ImageReward's."""
        return cls(
            shortest_edge=size,
            resample=int(resample),
            crop_size=(size, size),
            image_mean=tuple(float(v) for v in mean),
            image_std=tuple(float(v) for v in std),
            style="torchvision",
        )

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the pixel tensor this config produces for any input."""
        if self.do_center_crop:
            return self.crop_size
        if self.resize_to is not None:
            return self.resize_to
        raise ValueError("output size depends on the input: enable do_center_crop or set an exact size")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> PreprocessConfig:
        """Parse a Hugging Face ``preprocessor_config.json`` dict (legacy int sizes included); its
        "pickscore_style" key, which ``to_hf`` writes for a torchvision-style config, sets ``style``."""
        size = cfg.get("size", {"shortest_edge": 224})
        shortest_edge, resize_to = None, None
        if isinstance(size, int):
            shortest_edge = size
        elif "shortest_edge" in size:
            shortest_edge = int(size["shortest_edge"])
        elif "height" in size and "width" in size:
            resize_to = (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(f"unsupported 'size' in preprocessor config: {size!r}")
        crop = cfg.get("crop_size", {"height": 224, "width": 224})
        crop_size = (int(crop), int(crop)) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        resample = int(cfg.get("resample", Image.Resampling.BICUBIC))
        if resample not in {int(r) for r in Image.Resampling}:
            raise ValueError(f"unsupported 'resample' in preprocessor config: {resample}")
        return cls(
            do_resize=bool(cfg.get("do_resize", True)),
            shortest_edge=shortest_edge,
            resize_to=resize_to,
            resample=resample,
            do_center_crop=bool(cfg.get("do_center_crop", True)),
            crop_size=crop_size,
            do_rescale=bool(cfg.get("do_rescale", True)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            image_mean=tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN)),
            image_std=tuple(float(v) for v in cfg.get("image_std", CLIP_STD)),
            do_convert_rgb=bool(cfg.get("do_convert_rgb", True)),
            style=str(cfg.get("pickscore_style", "transformers")),
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` dict that ``CLIPImageProcessor`` reads; a torchvision-style config adds
        "pickscore_style": "torchvision" (which ``from_hf`` reads back; ``CLIPImageProcessor`` would not)."""
        if self.resize_to is None:
            size: dict[str, int] = {"shortest_edge": self.shortest_edge}
        else:
            size = {"height": self.resize_to[0], "width": self.resize_to[1]}
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": self.do_resize,
            "size": size,
            "resample": int(self.resample),
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        } | ({} if self.style == "transformers" else {"pickscore_style": self.style})


def read_image_bytes(item: bytes | bytearray | memoryview | str | os.PathLike | Image.Image) -> bytes | Image.Image:
    """Bytes of a path or buffer (PIL images pass through). Raises InvalidInput."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    try:
        return Path(item).read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read file ({e.strerror or e})") from e


def check_size(width: int, height: int, max_pixels: int, max_aspect_ratio: float = math.inf) -> None:
    """InvalidInput unless width x height is within the pixel limit and the aspect-ratio limit (both sides >= 1)."""
    if width < 1 or height < 1:
        raise InvalidInput(f"image is {width}x{height}: empty")
    if width * height > max_pixels:
        raise InvalidInput(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(a decompression bomb or an oversized image)"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise InvalidInput(
            f"image is {width}x{height}, an aspect ratio of {ratio:.4g}:1, over the limit of {max_aspect_ratio:g}:1 "
            "(its centre crop would keep almost nothing of it)"
        )


def from_pixels(
    pixels: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: float = math.inf
) -> Image.Image:
    """Decoded pixels a caller already holds -> the image a lossless PNG of them decodes to.

    uint8, (H, W, 3) RGB, (H, W, 4) RGBA (transparency treated as the config's style treats any transparent image:
    composited onto white, or dropped after resizing) or (H, W) gray.
    """
    if pixels.dtype != np.uint8:
        raise InvalidInput(f"pixels must be uint8, got {pixels.dtype}")
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))):
        raise InvalidInput(f"pixels must be (height, width, 3 or 4) or (height, width), got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    check_size(width, height, max_pixels, max_aspect_ratio)
    return Image.fromarray(np.ascontiguousarray(pixels))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: float = math.inf) -> Image.Image:
    """Decode the first frame of an encoded image, refusing over-limit sizes (from the header) before decoding."""
    if not data:
        raise InvalidInput("empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        check_size(*img.size, max_pixels, max_aspect_ratio)
        img.load()  # first frame only for GIF/WebP/TIFF stacks
    except InvalidInput:
        raise
    except Image.DecompressionBombError as e:
        raise InvalidInput(f"image is over the pixel limit ({e})") from e
    except UnidentifiedImageError as e:
        raise InvalidInput(
            f"not a decodable image (cannot identify image file; supported: {', '.join(ALLOWED_FORMATS)})"
        ) from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as e:
        raise InvalidInput(f"not a decodable image ({e})") from e
    return img


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale as 8-bit L, scaled (x/257) where Pillow's convert would clip at 255."""
    if img.mode not in _SIXTEEN_BIT_MODES:
        return img
    wide = np.asarray(img, dtype=np.float64).clip(0, 65535)
    return Image.fromarray(np.round(wide / 257).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited onto white, as ``transformers``' ``convert_to_rgb``."""
    img = _eight_bit(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _plain_rgb(img: Image.Image) -> Image.Image:
    """``img.convert("RGB")``, as torchvision's pipelines end: no compositing, transparent pixels keep their colour."""
    if img.mode == "RGB":
        return img
    if "transparency" in img.info:  # the samples ignore it; dropping it spares Pillow's warning about it
        img = img.copy()
        del img.info["transparency"]
    return img.convert("RGB")


def resize_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """Target (width, height), as ``get_resize_output_image_size(default_to_square=False)`` (and torchvision's
    ``Resize``, which computes the same)."""
    if cfg.resize_to is not None:
        return cfg.resize_to[1], cfg.resize_to[0]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_offsets(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(top, left) of the centre crop in a (resized) image of width x height; negative where the crop is larger
    (the image is padded with zeros). transformers: floor((size - crop) / 2); torchvision's ``center_crop``:
    round((size - crop) / 2), half to even, and a larger crop pads floor((crop - size) / 2) before the image."""
    crop_h, crop_w = cfg.crop_size
    if cfg.style == "transformers":
        return (height - crop_h) // 2, (width - crop_w) // 2

    def offset(size: int, crop: int) -> int:
        return int(round((size - crop) / 2.0)) if size >= crop else -((crop - size) // 2)

    return offset(height, crop_h), offset(width, crop_w)


def crop_uint8(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One decoded image -> the resized, centre-cropped RGB samples, uint8 (H, W, 3), in the config's style."""
    if not cfg.do_convert_rgb:
        if img.mode != "RGB":
            raise InvalidInput(f"image mode {img.mode} is not RGB and the model's preprocessing does not convert")
    elif cfg.style == "transformers":
        img = to_rgb(img)
    else:  # torchvision: resized and cropped in its own mode, converted last (_plain_rgb)
        img = _eight_bit(img)
    width, height = resize_size(*img.size, cfg) if cfg.do_resize else img.size
    if not cfg.do_center_crop:
        return np.array(_plain_rgb(img.resize((width, height), resample=cfg.resample) if cfg.do_resize else img))
    crop_h, crop_w = cfg.crop_size
    top, left = crop_offsets(width, height, cfg)
    if not cfg.do_resize or width * height <= FULL_RESIZE_AREA * crop_h * crop_w:
        if cfg.do_resize:
            img = img.resize((width, height), resample=cfg.resample)
        return np.array(_plain_rgb(img.crop((left, top, left + crop_w, top + crop_h))))  # out of bounds: 0
    # Only the part of the resized image inside the crop window: x0..x1, y0..y1 in resized coordinates.
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + crop_w, width), min(top + crop_h, height)
    region = _resize_region(img, (width, height), (x0, y0, x1, y1), cfg.resample)
    return np.array(_plain_rgb(region.crop((left - x0, top - y0, left - x0 + crop_w, top - y0 + crop_h))))


def _resize_region(img: Image.Image, size: tuple[int, int], region: tuple[int, int, int, int], resample: int):
    """``img.resize(size).crop(region)``, computing only the region: two one-axis passes over the source rows
    (or columns) the region reads, in the order Pillow's whole-image resize takes (``_vertical_first``),
    premultiplied where Pillow's resize is, so the samples are those of the whole-image resize up to the float32
    rounding of Pillow's box argument. Nearest-neighbour (forced for P and 1 images, as Pillow does) is exact."""
    (width, height), (x0, y0, x1, y1) = size, region
    if resample == Image.Resampling.NEAREST or img.mode in _NEAREST_MODES:
        return _nearest_region(img, size, region)
    sx, sy = img.width / width, img.height / height
    if resample not in _SUPPORT:  # a filter whose window is not known here: one pass over the box
        return img.resize((x1 - x0, y1 - y0), resample=resample, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    if _vertical_first(img.size, size):  # over the columns the region reads
        c0, c1 = _window(img.width, width, x0, x1, _SUPPORT[resample])
        part = img.crop((c0, 0, c1, img.height))
        first = ((c1 - c0, y1 - y0), (0, y0 * sy, c1 - c0, y1 * sy))
        second = (x0 * sx - c0, 0, x1 * sx - c0, y1 - y0)
    else:  # horizontal first, over the rows the region reads
        r0, r1 = _window(img.height, height, y0, y1, _SUPPORT[resample])
        part = img.crop((0, r0, img.width, r1))
        first = ((x1 - x0, r1 - r0), (x0 * sx, 0, x1 * sx, r1 - r0))
        second = (0, y0 * sy - r0, x1 - x0, y1 * sy - r0)
    if img.mode in _PREMULTIPLIED:  # once around both passes, as Pillow's resize does around its own two
        part = part.convert(_PREMULTIPLIED[img.mode])
    tmp = part.resize(first[0], resample=resample, box=first[1])
    out = tmp.resize((x1 - x0, y1 - y0), resample=resample, box=second)
    return out.convert(img.mode) if img.mode in _PREMULTIPLIED else out


def _vertical_first(source: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether Pillow resizes ``source`` (width, height) to ``size`` vertical pass first. Before 12.2 it never
    does; 12.2 and 12.3 when the height shrinks and the source is over 100 times taller than wide (``Image.resize``,
    python-pillow/Pillow#9524); from 13, when the height shrinks by more than twice as many samples as the width
    (in C, #9549: the condition as Pillow 13.0.0 behaves, which the tests check against the installed Pillow)."""
    (in_w, in_h), (out_w, out_h) = source, size
    if _PILLOW >= (13, 0):
        return out_h < in_h and in_h - out_h > 2 * (in_w - out_w)
    return _PILLOW >= (12, 2) and out_h < in_h and in_h > 100 * in_w


def _window(in_size: int, out_size: int, lo: int, hi: int, support: float) -> tuple[int, int]:
    """Source samples [first, last) that output samples lo..hi-1 read, as Pillow's resampling computes them."""
    scale = in_size / out_size
    reach = support * max(scale, 1.0)
    first = max(int((lo + 0.5) * scale - reach + 0.5), 0)
    last = min(int((hi - 0.5) * scale + reach + 0.5), in_size)
    return first, last


def _nearest_region(img: Image.Image, size: tuple[int, int], region: tuple[int, int, int, int]) -> Image.Image:
    """``img.resize(size, NEAREST).crop(region)`` exactly, picking only the region's samples."""
    (width, height), (x0, y0, x1, y1) = size, region
    if img.mode == "1":
        img = img.convert("L")  # pointwise (0 or 255), so it commutes with picking samples; its bytes are plain
    rows = _nearest_indices(img.height, height, y0, y1)
    cols = _nearest_indices(img.width, width, x0, x1)
    source = np.asarray(img.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)))
    picked = source[(rows - rows[0])[:, None], cols - cols[0]]
    out = img.crop((0, 0, x1 - x0, y1 - y0))  # the mode, palette and info; its samples are replaced
    out.frombytes(np.ascontiguousarray(picked).tobytes())
    return out


def _nearest_indices(in_size: int, out_size: int, lo: int, hi: int) -> np.ndarray:
    """The source sample of each output sample lo..hi-1 in Pillow's nearest resize of in_size samples to out_size.
    Pillow (ImagingScaleAffine) starts the source coordinate at scale / 2 and adds scale once per output sample
    in double precision, truncating each: the same additions, in order (``np.add.accumulate``), give the same
    indices where (x + 0.5) * scale would round differently; in chunks, so a long side costs little memory."""
    scale = in_size / out_size
    coordinate, kept = scale * 0.5, []
    for start in range(0, hi, _NEAREST_CHUNK):
        steps = np.full(min(_NEAREST_CHUNK, hi - start), scale)
        steps[0] = coordinate
        coordinates = np.add.accumulate(steps)
        coordinate = coordinates[-1] + scale
        if start + len(steps) > lo:
            kept.append(coordinates[max(lo - start, 0) :].astype(np.int64))
    return np.concatenate(kept)


@functools.lru_cache(maxsize=16)
def normalize_table(cfg: PreprocessConfig) -> np.ndarray:
    """(3, 256) float32, read-only: what rescale + normalise make of each uint8 value in each channel. The rescale
    is the style's: float64 x * factor, then float32 (transformers); float32 x / 255 (torchvision's ToTensor)."""
    values = np.arange(256, dtype=np.float64)[:, None].repeat(3, axis=1)  # (256, 3)
    if cfg.style == "torchvision":
        x = values.astype(np.float32) / np.float32(255)
    elif cfg.do_rescale:
        x = (values * cfg.rescale_factor).astype(np.float32)
    else:
        x = values.astype(np.float32)
    if cfg.do_normalize:
        x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    table = np.ascontiguousarray(x.T)
    table.flags.writeable = False
    return table


def normalize_constants(cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), float32 (3,): the normalisation's constants (0 and 1 when the config does not normalise)."""
    if not cfg.do_normalize:
        return np.zeros(3, np.float32), np.ones(3, np.float32)
    return np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)


@functools.lru_cache(maxsize=16)
def exact_divisor(cfg: PreprocessConfig) -> float | None:
    """d such that ((float32(v) / d) - mean) / std in float32 equals ``normalize_table`` bit for bit for every
    uint8 v in every channel, else None. Each step acts on one sample, so the 256 values cover every input."""
    d = float(np.float32(1 / cfg.rescale_factor)) if cfg.do_rescale else 1.0
    mean, std = normalize_constants(cfg)
    values = np.arange(256, dtype=np.float32)[None, :]  # (1, 256)
    computed = (values / np.float32(d) - mean[:, None]) / std[:, None]
    return d if np.array_equal(computed, normalize_table(cfg)) else None


def normalize(crops: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 crops (..., H, W, 3) -> float32 pixel values (..., 3, H, W): the values of ``normalize_table``."""
    out = np.empty((*crops.shape[:-3], 3, *crops.shape[-3:-1]), np.float32)
    d = exact_divisor(cfg)
    if d is None:  # one lookup per sample, row c of the table for channel c
        table = normalize_table(cfg)
        for c in range(3):
            out[..., c, :, :] = table[c][crops[..., c]]
        return out
    mean, std = normalize_constants(cfg)
    out[...] = np.moveaxis(crops, -1, -3)  # uint8 -> float32, exact
    out /= np.float32(d)
    out -= mean[:, None, None]
    out /= std[:, None, None]
    return out


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One decoded image -> float32 pixel values (3, H, W)."""
    return normalize(crop_uint8(img, cfg), cfg)


def load_uint8(
    item: ImageInput, cfg: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: float = math.inf
) -> np.ndarray:
    """A path, encoded bytes or PIL image -> uint8 crop (H, W, 3). Raises InvalidInput with the reason."""
    if isinstance(item, np.ndarray):
        return crop_uint8(from_pixels(item, max_pixels, max_aspect_ratio), cfg)
    data = read_image_bytes(item)
    img = data if isinstance(data, Image.Image) else decode_image(data, max_pixels, max_aspect_ratio)
    return crop_uint8(img, cfg)


def load_pixels(item: ImageInput, cfg: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A path, encoded bytes or PIL image -> float32 (3, H, W). Raises InvalidInput with the reason."""
    return normalize(load_uint8(item, cfg, max_pixels), cfg)
