"""JPEG decode and resize on the model's device (``--decode-on-device``): nvJPEG and the GPU's own resampling
instead of libjpeg and Pillow on the host's cores, for hosts whose CPUs cannot feed their GPU.

    crop = crop_on_device(jpeg_bytes, cfg, "cuda", max_pixels, max_aspect_ratio)   # (H, W, 3) uint8

The samples are close to, not equal to, the reference's: torchvision's antialiased bicubic is not Pillow's
fixed-point one, and a GPU decoder rounds its IDCT its own way. Scores move by a little and rankings almost
never (benchmarks/device_decode_bench.py measures the rank agreement with the exact path; RESULTS.md has it).
Everything else takes the exact path (``preprocess.load_uint8``): other formats, CMYK JPEGs, configs that do
not resize the short side and centre-crop, and shapes whose whole-image resize would cost more than
``FULL_RESIZE_AREA`` crops. The pixel and aspect-ratio limits are checked from the header first, as there.
The crop window is the config's style's (``preprocess.crop_offsets``: floor offsets for transformers, rounded for
torchvision); a JPEG is RGB or grayscale, so resizing it in its own mode (torchvision) or as RGB is the same.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pickscore.errors import InvalidInput
from pickscore.model.preprocess import (
    FULL_RESIZE_AREA,
    PreprocessConfig,
    check_size,
    crop_offsets,
    load_uint8,
    resize_size,
)

JPEG_START = b"\xff\xd8\xff"


def crop_on_device(
    data: bytes | np.ndarray,
    cfg: PreprocessConfig,
    device: torch.device | str,
    max_pixels: int,
    max_aspect_ratio: float = math.inf,
) -> np.ndarray:
    """Encoded image -> uint8 crop (H, W, 3): JPEGs decoded and resized on ``device``, anything else exactly."""
    if not _on_device(data, cfg):
        return load_uint8(data, cfg, max_pixels, max_aspect_ratio)
    try:
        header = Image.open(io.BytesIO(data), formats=("JPEG",))  # the header only: size and colour mode
    except (OSError, SyntaxError, ValueError):
        return load_uint8(data, cfg, max_pixels, max_aspect_ratio)  # the exact path says what is wrong with it
    check_size(*header.size, max_pixels, max_aspect_ratio)
    width, height = resize_size(*header.size, cfg)
    crop_h, crop_w = cfg.crop_size
    if header.mode not in ("RGB", "L") or width * height > FULL_RESIZE_AREA * crop_h * crop_w:
        return load_uint8(data, cfg, max_pixels, max_aspect_ratio)
    try:
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        raise InvalidInput(f"not a decodable image ({e})") from e
    resized = F.interpolate(
        pixels[None].float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    resized = resized.round_().clamp_(0, 255).to(torch.uint8)[0]  # (3, height, width)
    top, left = crop_offsets(width, height, cfg)
    out = torch.zeros((3, crop_h, crop_w), dtype=torch.uint8, device=resized.device)  # outside the image: 0
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + crop_h, height), min(left + crop_w, width)
    out[:, y0 - top : y1 - top, x0 - left : x1 - left] = resized[:, y0:y1, x0:x1]
    return out.permute(1, 2, 0).cpu().numpy()


def _on_device(data: bytes | np.ndarray, cfg: PreprocessConfig) -> bool:
    """Whether ``data`` is a JPEG and ``cfg`` the shortest-side resize and centre crop this path computes."""
    return (
        isinstance(data, (bytes, bytearray))
        and bytes(data[:3]) == JPEG_START
        and cfg.do_resize
        and cfg.resize_to is None
        and cfg.do_center_crop
        and cfg.do_convert_rgb
        and cfg.resample == Image.Resampling.BICUBIC
    )
