"""The PyTorch backend: the open_clip model on CPU or CUDA (fp32, fp16 or bf16), eager or compiled.

Images arrive as uint8 crops (B, H, W, 3), a quarter of the bytes of float32 pixels: they are copied to the
device (from pinned memory, asynchronously, on CUDA) and rescaled and normalised there through the
preprocessing's lookup table, so the values equal the CPU path's bit for bit. Float32 pixels (B, 3, H, W),
already preprocessed (KServe's ``pickscore_image``), are taken as they are.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pickscore.model.checkpoint import LoadedModel, resolve
from pickscore.model.preprocess import normalize_table
from pickscore.resources import usable_cores

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """'auto' picks CUDA when present; dtype 'auto' is bf16 on CUDA and fp32 on CPU."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(TORCH_DTYPES)}; got {dtype!r}")
    return dev, TORCH_DTYPES[dtype]


class TorchBackend:
    """Takes ownership of ``loaded.model``: it is moved to ``device`` and cast to ``dtype`` in place."""

    name = "torch"

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.loaded = loaded
        self.device = torch.device(device)
        self.dtype = dtype
        self.logit_scale = float(loaded.model.logit_scale.detach().float())  # fp32, before any cast
        self.model = loaded.model.to(self.device, dtype).eval()
        self.tokenizer = loaded.tokenizer()
        self.preprocess = loaded.preprocess
        self.source = loaded.source
        self.embed_dim = int(loaded.model_cfg["embed_dim"])
        self.description = f"{self.device} {DTYPE_NAMES[dtype]}"
        # (3, 256) float32: row c holds what rescale + normalise make of each value in channel c.
        self._table = torch.from_numpy(normalize_table(self.preprocess)).to(self.device)
        self._pin = self.device.type == "cuda"

    @classmethod
    def from_ref(cls, ref: str, device: str = "auto", dtype: str = "auto", threads: int = 0) -> TorchBackend:
        """Load a model reference; ``threads`` (0: every usable core on CPU, 1 on CUDA) sets torch's intra-op
        threads for the process: torch has one pool, whoever sets it last wins."""
        dev, dt = resolve_device(device, dtype)
        torch.set_num_threads(threads or (1 if dev.type == "cuda" else usable_cores()))
        return cls(resolve(ref), device=dev, dtype=dt)

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 crops (B, H, W, 3) or preprocessed float32 pixels (B, 3, H, W) -> (B, D) float32."""
        x = self._to_device(pixels)
        if x.dtype == torch.uint8:  # (B, H, W, 3) -> (B, 3, H, W) float32, one lookup per channel
            x = torch.stack([self._table[c][x[..., c].long()] for c in range(3)], dim=1)
        batch = x.to(self.dtype)
        return F.normalize(self.model.encode_image(batch).float(), dim=-1).cpu().numpy()  # (B, D); sync point

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self._pin:  # page-locked memory lets the copy run asynchronously, overlapping the host's next work
            host = host.pin_memory()
        return host.to(self.device, non_blocking=self._pin)

    @torch.inference_mode()
    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(tokens).to(self.device)  # (B, 77)
        return F.normalize(self.model.encode_text(batch).float(), dim=-1).cpu().numpy()  # (B, D); sync point
