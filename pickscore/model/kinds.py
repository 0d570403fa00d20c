"""The scorers the PickScore paper compares against, beside PickScore/CLIP: which files make each, and their modules.

    kind_of(path)       # "hps", "aesthetic", "image_reward", or None (a CLIP checkpoint, or nothing we know)

hps           HPS v2 / v2.1 (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``): an open_clip ViT-H-14 state dict
              under ``state_dict`` (another architecture when an ``open_clip_config.json`` lies beside it). Its score
              is the cosine of the normalised features, as HPSv2's ``score.py`` computes it (no logit scale);
              images go through open_clip's transform (torchvision's resize and crop).
aesthetic     the LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``): an MLP over the
              L2-normalised image embedding of OpenAI's CLIP ViT-L/14, which lies beside it (``DIR/clip/`` or DIR
              itself, in Hugging Face or open_clip layout). Prompt-independent: the text tower answers 1 for any
              prompt, so a Score request's score is the image's aesthetic score whatever the prompt.
image_reward  ImageReward (``ImageReward.pt`` + ``med_config.json`` + bert-base-uncased's ``vocab.txt``):
              ``pickscore.model.image_reward``.

The loading itself (reading files, errors naming them) is ``pickscore.model.checkpoint``'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pickscore.model.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig

HPS_FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")
AESTHETIC_SUFFIX = "linearMSE.pth"
IMAGE_REWARD_FILE = "ImageReward.pt"
# open_clip's ViT-H-14 (model_configs/ViT-H-14.json): what HPS v2 and v2.1 fine-tuned.
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
EXPECTED = (
    "a CLIP model directory (config.json: Hugging Face; open_clip_config.json: open_clip), "
    f"HPS v2 ({' or '.join(HPS_FILES)}), the LAION aesthetic predictor (*{AESTHETIC_SUFFIX} beside a CLIP ViT-L/14), "
    f"or ImageReward ({IMAGE_REWARD_FILE} + med_config.json + vocab.txt)"
)


def kind_of(path: Path) -> str | None:
    """The kind a directory or file holds, by its published file names; None for anything else."""
    names = [path.name] if path.is_file() else [p.name for p in path.iterdir() if p.is_file()]
    if IMAGE_REWARD_FILE in names:
        return "image_reward"
    if any(n in HPS_FILES for n in names):
        return "hps"
    if any(n.endswith(AESTHETIC_SUFFIX) for n in names):
        return "aesthetic"
    return None


def torchvision_preprocess(size: int) -> PreprocessConfig:
    """open_clip's, OpenAI CLIP's and ImageReward's eval transform: torchvision's resize and centre crop to
    ``size``, CLIP's mean and std."""
    return PreprocessConfig.torchvision(size=size, mean=CLIP_MEAN, std=CLIP_STD)


class MLPHead(nn.Module):
    """The five-layer head the aesthetic predictor and ImageReward share (Linear, Dropout, ..., Linear(16, 1)), with
    their state dicts' names (``layers.0`` ... ``layers.7``); sizes from the weights. Dropout does nothing here."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str = "layers."):
        super().__init__()
        own = {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
        linear = sorted(int(k.split(".")[0]) for k in own if k.endswith(".bias"))
        if not linear:
            raise KeyError(f"no {prefix}N.weight/bias in the head's weights")
        self.layers = nn.Sequential()
        for index in range(linear[-1] + 1):
            if index in linear:
                out_features, in_features = own[f"{index}.weight"].shape
                self.layers.append(nn.Linear(in_features, out_features, device="meta"))
            else:
                self.layers.append(nn.Identity())
        self.layers.load_state_dict(own, strict=True, assign=True)

    @property
    def in_features(self) -> int:
        return int(self.layers[0].in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticPredictor(nn.Module):
    """The LAION aesthetic predictor: head(normalise(CLIP image embedding)) from the image tower, 1 from the text
    tower (prompt-independent), so <text, image> is the aesthetic score."""

    def __init__(self, clip: nn.Module, head: MLPHead):
        super().__init__()
        self.clip = clip
        self.head = head
        self.register_buffer("logit_scale", torch.zeros(()))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        # The reference normalises in numpy (a zero norm divides by 1): F.normalize's eps does the same for zero.
        features = F.normalize(self.clip.encode_image(pixels).float(), dim=-1)
        return self.head(features.to(self.head.layers[0].weight.dtype)).float()  # (B, 1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(tokens[:, :1], dtype=torch.float32)  # from the tensor: its batch axis stays symbolic
