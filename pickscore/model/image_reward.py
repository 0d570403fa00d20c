"""ImageReward (Xu et al. 2023, THUDM/ImageReward): BLIP's ViT and its image-grounded BERT text encoder, then an MLP.

The reward of a prompt and an image, as the authors' ``ImageReward.score`` computes it::

    image_embeds = blip.visual_encoder(pixels)                       # every ViT token, (B, T, W)
    text = blip.text_encoder(ids, attention_mask, encoder_hidden_states=image_embeds)   # cross-attends the tokens
    reward = (mlp(text.last_hidden_state[:, 0]) - MEAN) / STD

The text cannot be encoded apart from the image, so the towers a server caches are: ``encode_image`` -> the ViT's
tokens, flattened into one row per image; ``encode_text`` -> the token ids as floats; ``score_pairs`` runs the text
encoder and the head over both. The modules carry the published state dict's names (``blip.visual_encoder.*``: BLIP's
``vit.py``, timm's names; ``blip.text_encoder.*``: BLIP's ``med.py`` ``BertModel``; ``mlp.layers.*``) so
``ImageReward.pt`` loads as it is; its other BLIP keys (text decoder, projections, momentum copies, queues) are
not read. Eval only: no dropout. The compute dtype follows the weights.

``load_image_reward`` reads a directory of ``ImageReward.pt``, ``med_config.json`` (both from THUDM/ImageReward) and
``vocab.txt`` (bert-base-uncased's, which ImageReward's tokenizer uses but does not ship).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pickscore.errors import ModelLoadError
from pickscore.model import architecture
from pickscore.model.kinds import IMAGE_REWARD_FILE, MLPHead
from pickscore.model.wordpiece import CONTEXT_LENGTH, WordPiece

MEAN = 0.16717362830052426  # the authors' normalisation of the head's output
STD = 1.0333394966054072
CONFIG_FILE = "med_config.json"
VOCAB_FILE = "vocab.txt"
VISION, TEXT, HEAD = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."
HEAD_WIDTH = 64  # BLIP's ViTs (base 768/12, large 1024/16) have 64-wide heads
IGNORED = {TEXT + "embeddings.position_ids"}  # med.py's persistent arange buffer: positions are 0..L-1 here


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None):
    """Multi-head softmax(q k^T / sqrt(d) + mask) v: (B, L, heads*d), (B, S, heads*d) -> (B, L, heads*d)."""
    split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]  # (B, heads, ·, d)
    return F.scaled_dot_product_attention(*split, attn_mask=mask).transpose(1, 2).flatten(2)


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)


class _VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_attention(*self.qkv(x).chunk(3, dim=-1), self.heads))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = _VisionAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = _Mlp(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """BLIP's ``vit.VisionTransformer``: patches + class token + learned positions, pre-norm blocks, final norm;
    returns every token, (B, 1 + (image_size / patch_size)², width)."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_width: int):
        super().__init__()
        self.image_size, self.width = image_size, width
        self.tokens = (image_size // patch_size) ** 2 + 1
        self.patch_embed = _PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.empty(1, 1, width))
        self.pos_embed = nn.Parameter(torch.empty(1, self.tokens, width))
        self.blocks = nn.ModuleList([_Block(width, heads, mlp_width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {tuple(pixels.shape[-2:])}")
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)  # (B, grid², width)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@dataclass(frozen=True)
class TextConfig:
    """The BERT sizes of ``med_config.json``; a missing key takes BertConfig's default, as BLIP reads the file.
    ``encoder_width`` is the ViT's width (BLIP sets it from the ViT, whatever the file says)."""

    encoder_width: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_med_config(cls, config: dict[str, Any], encoder_width: int) -> TextConfig:
        """ValueError for a config this encoder does not compute as med.py would."""
        unsupported = {
            "hidden_act": (config.get("hidden_act", "gelu"), "gelu"),
            "position_embedding_type": (config.get("position_embedding_type", "absolute"), "absolute"),
            "add_cross_attention": (config.get("add_cross_attention", False), True),
        }
        wrong = [f"{k}={got!r} (expected {want!r})" for k, (got, want) in unsupported.items() if got != want]
        if wrong:
            raise ValueError(f"unsupported text encoder settings: {', '.join(wrong)}")
        names = set(cls.__dataclass_fields__) - {"encoder_width"}
        return cls(encoder_width=encoder_width, **{k: v for k, v in config.items() if k in names})


class _Embeddings(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        # Storage to load into, undrawn: normal_ on the meta device would import torch._dynamo (a second of start).
        words, positions = (torch.empty(n, c.hidden_size) for n in (c.vocab_size, c.max_position_embeddings))
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, _weight=words)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size, _weight=positions)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class _SelfAttention(nn.Module):
    """med.py's BertSelfAttention: the query from the text, keys and values from ``kv_width``-wide states."""

    def __init__(self, c: TextConfig, kv_width: int):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(kv_width, c.hidden_size)
        self.value = nn.Linear(kv_width, c.hidden_size)


class _Output(nn.Module):
    """dense, then LayerNorm(dense(x) + residual)."""

    def __init__(self, c: TextConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: TextConfig, kv_width: int):
        super().__init__()
        self.self = _SelfAttention(c, kv_width)
        self.output = _Output(c, c.hidden_size)

    def forward(self, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = self.self
        return self.output(_attention(s.query(x), s.key(states), s.value(states), s.heads, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class _Layer(nn.Module):
    """med.py's BertLayer in 'multimodal' mode: self-attention, cross-attention to the image, feed-forward."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.attention = _Attention(c, c.hidden_size)
        self.crossattention = _Attention(c, c.encoder_width)
        self.intermediate = _Intermediate(c)
        self.output = _Output(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.crossattention(self.attention(x, x, mask), image)  # every image token is attended
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Encoder(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(c) for _ in range(c.num_hidden_layers)])


class TextEncoder(nn.Module):
    """BLIP's med.py ``BertModel`` (no token types, no pooler) as ImageReward calls it: bidirectional self-attention
    over the prompt, cross-attention to the image tokens in every layer. Returns the last hidden states (B, L, H)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): which keys a token may attend to
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, mask, image)
        return x


class ImageReward(nn.Module):
    """``encode_image`` (B, 3, H, W) -> (B, T*W) ViT tokens; ``encode_text`` (B, L) int ids -> (B, L) float32 ids;
    ``score_pairs`` (text rows, image rows) -> (B,) float32 rewards. ``logit_scale`` is 0 (unused: the reward is
    not a dot product); ``pad_id`` is the tokenizer's padding id."""

    def __init__(self, visual: VisionTransformer, text: TextEncoder, head: MLPHead, pad_id: int = 0):
        super().__init__()
        self.blip = nn.ModuleDict({"visual_encoder": visual, "text_encoder": text})
        self.mlp = head
        self.pad_id = pad_id
        self.register_buffer("logit_scale", torch.zeros((), device="cpu"), persistent=False)

    @property
    def image_shape(self) -> tuple[int, int]:
        """(T, W): the tokens per image and their width; an image row holds T*W values."""
        visual = self.blip["visual_encoder"]
        return visual.tokens, visual.width

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.blip["visual_encoder"]
        return visual(pixels.to(visual.pos_embed.dtype)).flatten(1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """The ids as float32 (exact below 2^24): they must reach ``score_pairs`` as float32, not fp16/bf16."""
        if tokens.ndim != 2:
            raise ValueError(f"token ids must be (batch, length), got shape {tuple(tokens.shape)}")
        return tokens.float()

    def score_pairs(self, text: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The reward of row i of ``text`` (``encode_text``) with row i of ``images`` (``encode_image``)."""
        ids = text.round().long()
        # The tokenizer's attention mask: every position up to the last that is not padding (padding is on the
        # right; a "[PAD]" written inside a prompt is a real token).
        positions = torch.arange(ids.shape[1], device=ids.device)
        last = torch.where(ids != self.pad_id, positions, -1).amax(dim=1, keepdim=True)
        encoder = self.blip["text_encoder"]
        dtype = encoder.embeddings.LayerNorm.weight.dtype
        hidden = encoder(ids, positions <= last, images.to(dtype).unflatten(1, self.image_shape))
        head_dtype = self.mlp.layers[0].weight.dtype
        rewards = self.mlp(hidden[:, 0].to(head_dtype)).float().squeeze(-1)
        return (rewards - MEAN) / STD


def load_image_reward(directory: Path, source: str) -> tuple[ImageReward, WordPiece, dict[str, Any]]:
    """The model (CPU, fp32, eval), its tokenizer and its sizes from a directory of ``ImageReward.pt``,
    ``med_config.json`` and ``vocab.txt``; ModelLoadError naming the file that is missing or wrong.

    The dict: ``embed_dim`` (T*W, an image row's length), ``image_size``, ``context_length`` (35),
    ``image_tokens`` (T), ``image_width`` (W), ``text_width``."""
    directory = Path(directory)
    _check_files(directory, source)
    tokenizer = _read_vocab(directory / VOCAB_FILE, source)
    state = _read_state(directory / IMAGE_REWARD_FILE, source)
    visual = _build_vision(state, source)
    config = _read_text_config(directory / CONFIG_FILE, visual.width, source)
    if tokenizer.vocab_size != config.vocab_size:
        raise ModelLoadError(
            f"model {source}: {VOCAB_FILE} holds {tokenizer.vocab_size - 2} tokens (+[DEC], [ENC]), but "
            f"{CONFIG_FILE} says vocab_size {config.vocab_size}: {VOCAB_FILE} must be bert-base-uncased's"
        )
    weights = directory / IMAGE_REWARD_FILE
    try:
        head = MLPHead(state, prefix=HEAD)
        with torch.device("meta"):
            text = TextEncoder(config)
        model = ImageReward(visual, text, head, tokenizer.pad_id)
        used = {k: v for k, v in state.items() if k.startswith((VISION, TEXT, HEAD)) and k not in IGNORED}
        architecture.load_weights(model, used)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"model {source}: {weights} is not an ImageReward state dict: {e}") from e
    tokens, width = model.image_shape
    info = {"embed_dim": tokens * width, "image_size": visual.image_size, "context_length": CONTEXT_LENGTH}
    return model, tokenizer, info | {"image_tokens": tokens, "image_width": width, "text_width": config.hidden_size}


def _check_files(directory: Path, source: str) -> None:
    hints = {
        IMAGE_REWARD_FILE: f"ImageReward's weights (hf download THUDM/ImageReward {IMAGE_REWARD_FILE} "
        f"--local-dir {directory})",
        CONFIG_FILE: f"BLIP's text encoder config, published with ImageReward (hf download THUDM/ImageReward "
        f"{CONFIG_FILE} --local-dir {directory})",
        VOCAB_FILE: f"bert-base-uncased's vocab.txt, which ImageReward's tokenizer uses but does not ship "
        f"(hf download bert-base-uncased {VOCAB_FILE} --local-dir {directory})",
    }
    for name, hint in hints.items():
        if not (directory / name).is_file():
            raise ModelLoadError(f"model {source}: {directory / name} is missing: it is {hint}")


def _read_vocab(path: Path, source: str) -> WordPiece:
    try:
        return WordPiece.from_file(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"model {source}: {path}: {e}") from e


def _read_state(path: Path, source: str) -> dict[str, torch.Tensor]:
    """The state dict, memory-mapped: the keys scoring does not read are never paged in."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as e:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
        raise ModelLoadError(f"model {source}: cannot read {path} as a torch state dict: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"model {source}: {path} is not a state dict (name -> tensor)")
    return state


def _read_text_config(path: Path, encoder_width: int, source: str) -> TextConfig:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        return TextConfig.from_med_config(config, encoder_width)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"model {source}: {path}: {e}") from e


def _build_vision(state: dict[str, torch.Tensor], source: str) -> VisionTransformer:
    """The ViT (on the meta device) whose sizes the weights' shapes give."""
    needed = [VISION + k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ModelLoadError(
            f"model {source}: {IMAGE_REWARD_FILE} has no {', '.join(missing)}: not ImageReward's weights "
            f"(expected BLIP's image encoder under {VISION})"
        )
    width = state[VISION + "cls_token"].shape[-1]
    patch = state[VISION + "patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state[VISION + "pos_embed"].shape[1] - 1)
    depth = len({k[len(VISION + "blocks.") :].split(".")[0] for k in state if k.startswith(VISION + "blocks.")})
    if width % HEAD_WIDTH:
        raise ModelLoadError(f"model {source}: image encoder width {width} is not a multiple of {HEAD_WIDTH}")
    mlp_width = state[VISION + "blocks.0.mlp.fc1.weight"].shape[0]
    with torch.device("meta"):
        return VisionTransformer(grid * patch, patch, width, depth, width // HEAD_WIDTH, mlp_width)
