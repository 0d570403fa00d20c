"""The scorer's architecture: ``clip.CLIP`` (open_clip's CLIP, built here), described by an open_clip model config.

A model config is data (the JSON open_clip uses, e.g. ``open_clip/model_configs/ViT-H-14.json``):
``{"embed_dim": 1024, "quick_gelu": false, "vision_cfg": {...}, "text_cfg": {...}}``.
Only the standard ViT image tower with the CLIP text transformer is supported, which is what
PickScore_v1 and every checkpoint this project writes use (``clip.check_config`` names anything else).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pickscore.model.clip import CLIP, MODEL_KEYS, check_config


def build(model_cfg: Mapping[str, Any], device: str | torch.device = "cpu") -> CLIP:
    """Construct the model, randomly initialised as open_clip does; on ``device='meta'`` it holds no memory and
    draws nothing until ``load_weights``."""
    check_config(model_cfg)
    with torch.device(device):
        return CLIP(**{k: v for k, v in model_cfg.items() if k in MODEL_KEYS}, init=str(device) != "meta")


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Load every tensor strictly (missing or unexpected keys raise) and return the model (a CLIP, or any module:
    ImageReward's towers load the same way) on CPU, fp32.

    Works for models built on the meta device: parameters are assigned (the causal mask, not a weight, was made
    on the CPU).
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
    leftover = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left uninitialised after loading: {leftover}")
    return model.eval()


def _few(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
