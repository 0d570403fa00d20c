"""The scorer's architecture: open_clip's ``CLIP``, described by an open_clip model config.

A model config is data (the JSON open_clip uses, e.g. ``open_clip/model_configs/ViT-H-14.json``):
``{"embed_dim": 1024, "quick_gelu": false, "vision_cfg": {...}, "text_cfg": {...}}``.
Only the standard ViT image tower with the CLIP text transformer is supported, which is what
PickScore_v1 and every checkpoint this project writes use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from open_clip.model import CLIP


def check_supported(model_cfg: Mapping[str, Any]) -> None:
    """Refuse configs whose towers are not the plain ViT + CLIP text transformer."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    unsupported = [k for k in ("timm_model_name",) if vision.get(k)] + [k for k in ("hf_model_name",) if text.get(k)]
    if model_cfg.get("custom_text") or unsupported:
        raise ValueError(
            f"unsupported architecture (only ViT + CLIP text transformer): {sorted(unsupported) or 'custom_text'}"
        )


def build(model_cfg: Mapping[str, Any], device: str | torch.device = "cpu") -> CLIP:
    """Construct the model; on ``device='meta'`` it holds no memory until ``load_weights``."""
    check_supported(model_cfg)
    cfg = {k: v for k, v in model_cfg.items() if k not in ("custom_text",)}
    with torch.device(device):
        return CLIP(**cfg)


def load_weights(model: CLIP, state_dict: Mapping[str, torch.Tensor]) -> CLIP:
    """Load every tensor strictly (missing or unexpected keys raise) and return the model on CPU, fp32.

    Works for models built on the meta device: parameters are assigned, and the one
    non-persistent buffer (the text tower's causal mask) is rebuilt.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise KeyError(f"weights do not match the architecture: missing {_few(missing)}, unexpected {_few(unexpected)}")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"weight {key}: shape {tuple(tensor.shape)} does not match the architecture's "
                f"{tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True, assign=True)
    ctx = model.positional_embedding.shape[0]
    # (ctx, ctx) additive mask: -inf above the diagonal, so a token sees only those before it.
    model.attn_mask = torch.full((ctx, ctx), float("-inf")).triu_(1)
    leftover = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left uninitialised after loading: {leftover}")
    return model.eval()


def _few(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
