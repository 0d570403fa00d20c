"""Tiny random-weight models in the layouts HPS v2 and the LAION aesthetic predictor publish, built with open_clip (the
reference both score with), for the parity tests and the servers that host several kinds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Shrunk ViT-H-14 / ViT-L-14 shapes: CLIP's vocabulary and context, 224 px, a patch grid, 64-wide heads.
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def open_clip_model(name: str, cfg: dict, seed: int, directory: Path):
    """(model, its eval transform, its tokenizer) from open_clip for ``cfg``, registered under ``name``."""
    import open_clip

    config = directory / f"{name}.json"
    config.write_text(json.dumps(cfg))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model, _, transform = open_clip.create_model_and_transforms(name, pretrained=None, output_dict=True)
    return model.eval(), transform, open_clip.get_tokenizer(name)


def write_hps(directory: Path, seed: int = 0, file: str = "HPS_v2_compressed.pt") -> Path:
    """HPS v2's layout: ``{"state_dict": open_clip state dict}``, with the tiny architecture's open_clip_config.json
    beside it (the real file is ViT-H-14, which the loader assumes without one)."""
    directory.mkdir(parents=True, exist_ok=True)
    model, _, _ = open_clip_model(f"hps-tiny-{seed}", TINY_OPEN_CLIP, seed, directory)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # HPS scores ignore it: a scale that mattered would show
    torch.save({"state_dict": model.state_dict()}, directory / file)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    return directory


def aesthetic_head(in_features: int, seed: int) -> torch.nn.Sequential:
    """The predictor's MLP as improved-aesthetic-predictor's simple_inference.py defines it (a transcription)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()


def write_aesthetic(directory: Path, seed: int = 0) -> Path:
    """The aesthetic predictor's .pth (the MLP's state dict, keys ``layers.N``) with an OpenAI-style CLIP (QuickGELU)
    in open_clip layout in ``directory/clip``."""
    clip_dir = directory / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY_OPEN_CLIP, "quick_gelu": True}
    model, _, _ = open_clip_model(f"aesthetic-clip-{seed}", cfg, seed, directory)
    torch.save(model.state_dict(), clip_dir / "open_clip_pytorch_model.bin")
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    head = aesthetic_head(cfg["embed_dim"], seed + 1)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, directory / "sac+logos+ava1-l14-linearMSE.pth")
    return directory
