"""CLIP with a ViT image tower and CLIP's text transformer, as open_clip builds it, without importing open_clip.

Same modules, parameter names, initialisation (in the same order of random draws) and arithmetic as open_clip's
``CLIP`` for the configs PickScore_v1 and this project use, so checkpoints, exports and seeds carry over unchanged;
``tests/model/test_clip.py`` holds it to open_clip's own ``CLIP`` (equal state dicts from one seed, equal outputs,
gradient checkpointing included). Why not import it: ``import open_clip`` loads torchvision (and with it
torch._dynamo) and, where installed, transformers: 2 to 3 s of every in-process command's start on a 2-core CPU.

Config keys outside ``VISION_KEYS``/``TEXT_KEYS`` (layer scale, attentional pooling, timm or Hugging Face towers,
...) are refused unless they hold open_clip's default, so an architecture is never silently built differently.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# The keys each tower implements (eos_id is read only by 'eos' pooling: any value builds the same model), and the
# other open_clip keys a config may carry at their default values.
VISION_KEYS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"}
TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "eos_id"}
VISION_DEFAULTS = {
    "ls_init_value": None,
    "patch_dropout": 0.0,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "output_tokens": False,
    "act_kwargs": None,
    "norm_kwargs": None,
    "timm_model_name": None,
}
TEXT_DEFAULTS = {
    "ls_init_value": None,
    "embed_cls": False,
    "pad_id": 0,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "output_tokens": False,
    "act_kwargs": None,
    "norm_kwargs": None,
    "hf_model_name": None,
    "hf_tokenizer_name": None,
    "tokenizer_kwargs": None,
}
MODEL_KEYS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale"}


def check_config(model_cfg: Mapping[str, Any]) -> None:
    """ValueError naming every key this architecture does not build as open_clip would."""
    unsupported = [k for k in model_cfg if k not in MODEL_KEYS and model_cfg[k] not in (None, False)]
    for tower, keys, defaults in (("vision_cfg", VISION_KEYS, VISION_DEFAULTS), ("text_cfg", TEXT_KEYS, TEXT_DEFAULTS)):
        cfg = model_cfg.get(tower) or {}
        unsupported += [f"{tower}.{k}" for k, v in cfg.items() if k not in keys and defaults.get(k, object()) != v]
    vision = model_cfg.get("vision_cfg") or {}
    if isinstance(vision.get("layers"), (list, tuple)):
        unsupported.append("vision_cfg.layers (a ResNet)")
    if not isinstance(vision.get("image_size", 224), int) or not isinstance(vision.get("patch_size", 16), int):
        unsupported.append("vision_cfg.image_size/patch_size (not square)")
    if unsupported:
        raise ValueError(f"unsupported architecture (only ViT + CLIP text transformer): {', '.join(unsupported)}")


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose output has its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, act_layer: type[nn.Module]):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        layers = [("c_fc", nn.Linear(width, hidden)), ("gelu", act_layer()), ("c_proj", nn.Linear(hidden, width))]
        self.mlp = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, L, width); attn_mask: (L, L) additive, or None
        mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act_layer: type[nn.Module]):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act_layer) for _ in range(layers)]
        )

    def get_cast_dtype(self) -> torch.dtype:
        return self.resblocks[0].mlp.c_fc.weight.dtype

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing:  # recompute the block's activations in the backward pass
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return x


def _drawn(shape: tuple[int, ...], scale: float, init: bool) -> nn.Parameter:
    """scale * randn(shape), as open_clip draws it; without ``init``, storage to load weights into."""
    return nn.Parameter(scale * torch.randn(shape) if init else torch.empty(shape))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: Mapping[str, Any], output_dim: int, act_layer: type[nn.Module], init: bool = True):
        super().__init__()
        width, patch, size = cfg["width"], cfg.get("patch_size", 16), cfg.get("image_size", 224)
        self.grid = size // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width**-0.5  # open_clip draws these three with randn, in this order
        self.class_embedding = _drawn((width,), scale, init)
        self.positional_embedding = _drawn((self.grid * self.grid + 1, width), scale, init)
        self.ln_pre = LayerNorm(width)
        heads = width // cfg.get("head_width", 64)
        self.transformer = Transformer(width, cfg.get("layers", 12), heads, cfg.get("mlp_ratio", 4.0), act_layer)
        self.ln_post = LayerNorm(width)
        self.proj = _drawn((width, output_dim), scale, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, width, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid², width)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, grid² + 1, width)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)[:, 0] @ self.proj  # the class token: (B, output_dim)


class CLIP(nn.Module):
    """``encode_image`` (B, 3, H, W) -> (B, D); ``encode_text`` (B, L <= context) token ids -> (B, D); the forward
    pass (training's, through DDP) -> (normalised image features, normalised text features, exp(logit_scale)).

    ``init=False`` skips open_clip's random initialisation: a model about to be given its weights (built on the
    meta device, which would otherwise import torch._dynamo for the draws' arithmetic: a second of start-up).
    """

    def __init__(
        self,
        embed_dim: int,
        vision_cfg: Mapping[str, Any],
        text_cfg: Mapping[str, Any],
        quick_gelu: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        init: bool = True,
    ):
        super().__init__()
        act = QuickGELU if quick_gelu else nn.GELU
        self.visual = VisionTransformer(vision_cfg, embed_dim, act, init)
        # The text tower, built in open_clip's order of random draws (embedding, blocks), then registered in its
        # CLIP's order (blocks first), so that seeds and state dicts match open_clip's exactly.
        width, layers = text_cfg.get("width", 512), text_cfg.get("layers", 12)
        self.context_length = text_cfg.get("context_length", 77)
        vocab = text_cfg.get("vocab_size", 49408)
        token_embedding = nn.Embedding(vocab, width, _weight=None if init else torch.empty(vocab, width))
        self.transformer = Transformer(width, layers, text_cfg.get("heads", 8), text_cfg.get("mlp_ratio", 4.0), act)
        self.token_embedding = token_embedding
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, width))
        self.ln_final = LayerNorm(width)
        # (ctx, ctx) additive mask: -inf above the diagonal, so a token sees only those before it. Not a weight:
        # made on the CPU even in a meta-device build, and moved with the model.
        mask = torch.full((self.context_length,) * 2, float("-inf"), device="cpu").triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        if init:
            self._init_text(width, layers)
        self.logit_scale = nn.Parameter(torch.full([], init_logit_scale))

    def _init_text(self, width: int, layers: int) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = width**-0.5 * (2 * layers) ** -0.5, width**-0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(image, normalize=True), self.encode_text(text, normalize=True), self.logit_scale.exp()

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Over the first ``text.shape[1]`` positions of the context: causal attention pooled at the end-of-text
        token (the highest id) makes positions after it irrelevant, so a batch may be cut after its longest prompt."""
        n = text.shape[1]  # text: (B, n) int64, n <= context_length
        cast = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast) + self.positional_embedding[:n].to(cast)  # (B, n, width)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:n, :n]))
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection  # (B, D)
        return F.normalize(x, dim=-1) if normalize else x
