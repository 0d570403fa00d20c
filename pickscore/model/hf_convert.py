"""Hugging Face ``transformers`` CLIP checkpoints -> the open_clip architecture.

The published PickScore_v1 is a ``CLIPModel`` directory. Its config maps to an open_clip
model config, and every tensor maps to exactly one open_clip tensor: q/k/v projections
are concatenated into ``in_proj``, the two projections are transposed, the rest is renamed.
A tensor the mapping does not know is an error, never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

# Defaults of transformers' CLIPTextConfig / CLIPVisionConfig, for configs saved as diffs.
_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

# Tensors outside the transformer layers: HF name -> open_clip name.
_RENAMES = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
# Linear weights stored (out, in) by HF and used as `x @ proj` (in, out) by open_clip.
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
# Buffers that older checkpoints carry and that hold no learned state.
_IGNORED = {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}

_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")
_TOWER = {"text_model": "transformer", "vision_model": "visual.transformer"}
_LAYER_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def model_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """A ``CLIPConfig`` dict (config.json) -> an open_clip model config dict."""
    if hf_config.get("model_type", "clip") != "clip":
        raise ValueError(f"config.json has model_type {hf_config.get('model_type')!r}, expected 'clip'")
    text = {**_TEXT_DEFAULTS, **hf_config.get("text_config", {})}
    vision = {**_VISION_DEFAULTS, **hf_config.get("vision_config", {})}
    acts = {text["hidden_act"], vision["hidden_act"]}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise ValueError(f"unsupported activations {sorted(acts)}: both towers must use 'gelu' or both 'quick_gelu'")
    if text["layer_norm_eps"] != 1e-5 or vision["layer_norm_eps"] != 1e-5 or vision["num_channels"] != 3:
        raise ValueError("unsupported config: layer_norm_eps must be 1e-5 and num_channels 3")
    return {
        "embed_dim": int(hf_config.get("projection_dim", 512)),
        "quick_gelu": acts == {"quick_gelu"},
        "vision_cfg": {
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
            "width": vision["hidden_size"],
            "layers": vision["num_hidden_layers"],
            "head_width": vision["hidden_size"] // vision["num_attention_heads"],
            "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"],
        },
        "text_cfg": {
            "context_length": text["max_position_embeddings"],
            "vocab_size": text["vocab_size"],
            "width": text["hidden_size"],
            "heads": text["num_attention_heads"],
            "layers": text["num_hidden_layers"],
            "mlp_ratio": text["intermediate_size"] / text["hidden_size"],
        },
    }


def state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``CLIPModel`` tensors -> open_clip ``CLIP`` tensors. Raises KeyError on any unknown tensor."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer prefix, weight|bias) -> {q, k, v}
    unknown = []
    for key, tensor in hf_state.items():
        if key in _IGNORED:
            continue
        if key in _RENAMES:
            out[_RENAMES[key]] = tensor
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = tensor.t().contiguous()
        elif m := _LAYER.match(key):
            tower, index, rest = m.groups()
            prefix = f"{_TOWER[tower]}.resblocks.{index}"
            module, _, kind = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, kind), {})[module[-6]] = tensor
            elif module in _LAYER_RENAMES:
                out[f"{prefix}.{_LAYER_RENAMES[module]}.{kind}"] = tensor
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"unexpected tensors in the checkpoint: {', '.join(sorted(unknown)[:8])}")
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{prefix}: attention {kind} is missing {sorted({'q', 'k', 'v'} - set(parts))} projection")
        # nn.MultiheadAttention packs [q; k; v] along the output dimension: (3 * width, width).
        out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
