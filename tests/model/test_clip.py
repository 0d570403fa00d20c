"""``model.clip.CLIP`` is open_clip's CLIP: the same parameters from the same seed, the same outputs and gradients.

open_clip stays a test dependency as the reference; the package itself never imports it (nor torchvision or
transformers) to load and run a model.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from open_clip.model import CLIP as OpenClipCLIP

from pickscore.model import architecture
from pickscore.model.checkpoint import resolve
from pickscore.model.clip import CLIP, check_config
from pickscore.training.config import load_config

TINY = load_config("tiny", {}).architecture
DEMO = resolve("demo").model_cfg


def _pair(cfg: dict, seed: int = 0) -> tuple[CLIP, OpenClipCLIP]:
    torch.manual_seed(seed)
    ours = CLIP(**cfg)
    torch.manual_seed(seed)
    theirs = OpenClipCLIP(**cfg)
    return ours, theirs


@pytest.mark.parametrize("cfg", [TINY, DEMO, {**TINY, "quick_gelu": True}], ids=["tiny", "demo", "quick_gelu"])
def test_same_seed_same_parameters_and_outputs(cfg):
    ours, theirs = _pair(cfg)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(3, 3, size, size)
    text = torch.randint(1, 49406, (3, 77))
    text[:, 9:] = 0
    text[:, 8] = 49407  # end of text: argmax pooling reads here
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), theirs.encode_image(images), atol=1e-6)
        assert torch.allclose(ours.encode_text(text), theirs.encode_text(text), atol=1e-6)
        # Over the prompt's own length (what the backend runs), the whole context's embedding.
        assert torch.allclose(ours.encode_text(text[:, :9]), theirs.encode_text(text), atol=1e-5)
    gelu = [type(m.visual.transformer.resblocks[0].mlp.gelu).__name__ for m in (ours, theirs)]
    assert gelu[0] == gelu[1] == ("QuickGELU" if cfg["quick_gelu"] else "GELU")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_equal_open_clip_with_and_without_checkpointing(checkpointing):
    ours, theirs = _pair(TINY, seed=1)
    ours.set_grad_checkpointing(checkpointing)
    theirs.set_grad_checkpointing(checkpointing)
    images = torch.randn(2, 3, 32, 32)
    text = torch.randint(1, 49406, (2, 77))
    for model in (ours, theirs):  # the forward pass training runs (through DDP)
        image_features, text_features, scale = model.train()(images, text)
        (scale * (image_features * text_features).sum()).backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, theirs_grads[name].grad, atol=1e-5), name


def test_checkpoints_load_into_both(tmp_path):
    """A state dict from one loads strictly into the other: files written before and after are interchangeable."""
    ours, theirs = _pair(DEMO, seed=2)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()), strict=True)
    built = architecture.load_weights(architecture.build(DEMO, device="meta"), theirs.state_dict())
    assert torch.equal(built.attn_mask, theirs.attn_mask)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"vision_cfg": {**TINY["vision_cfg"], "ls_init_value": 1e-5}}, "vision_cfg.ls_init_value"),
        ({"vision_cfg": {**TINY["vision_cfg"], "timm_model_name": "vit_base"}}, "vision_cfg.timm_model_name"),
        ({"vision_cfg": {**TINY["vision_cfg"], "layers": [3, 4, 6, 3]}}, "a ResNet"),
        ({"text_cfg": {**TINY["text_cfg"], "hf_model_name": "roberta-base"}}, "text_cfg.hf_model_name"),
        ({"text_cfg": {**TINY["text_cfg"], "pool_type": "eos"}}, "text_cfg.pool_type"),
        ({"custom_text": True}, "custom_text"),
        ({"init_logit_bias": -10.0}, "init_logit_bias"),
    ],
)
def test_architectures_it_does_not_build_are_named(change, named):
    with pytest.raises(ValueError, match="unsupported architecture") as refused:
        check_config({**TINY, **change})
    assert named in str(refused.value)


def test_open_clip_defaults_are_accepted():
    check_config({**TINY, "custom_text": False, "vision_cfg": {**TINY["vision_cfg"], "pool_type": "tok"}})


def test_loading_and_running_a_model_imports_no_open_clip_torchvision_transformers_or_dynamo():
    code = (
        "import sys, numpy as np\n"
        "from pickscore.scorer import Scorer\n"
        "Scorer.from_pretrained('demo').score('two red circles', [np.zeros((64, 64, 3), np.uint8)])\n"
        "heavy = ('open_clip', 'torchvision', 'transformers', 'timm', 'torch._dynamo')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
