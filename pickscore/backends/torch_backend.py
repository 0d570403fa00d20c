"""The PyTorch backend: the open_clip model, eager, on CPU or CUDA (fp32, fp16 or bf16)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pickscore.model.checkpoint import LoadedModel, resolve

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

    @classmethod
    def from_ref(cls, ref: str, device: str = "auto", dtype: str = "auto") -> TorchBackend:
        dev, dt = resolve_device(device, dtype)
        return cls(resolve(ref), device=dev, dtype=dt)

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(pixels).to(self.device, self.dtype)  # (B, 3, H, W)
        return F.normalize(self.model.encode_image(batch).float(), dim=-1).cpu().numpy()  # (B, D); sync point

    @torch.inference_mode()
    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(tokens).to(self.device)  # (B, 77)
        return F.normalize(self.model.encode_text(batch).float(), dim=-1).cpu().numpy()  # (B, D); sync point
