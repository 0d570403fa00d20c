"""A tiny random-weight ImageReward in its published layout: ``ImageReward.pt`` (the ``ImageReward`` module's state
dict: ``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*`` and other BLIP_Pretrain keys scoring
ignores), ``med_config.json`` and a ``vocab.txt`` of real-looking BERT wordpieces.

The names and shapes are written out here from BLIP's ``vit.py`` and ``med.py`` and ImageReward's ``MLP``, not from
the package's modules; the tests load them strictly into timm's and transformers' models too.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# BLIP's ViT, shrunk: 224 px, patch 16 (197 tokens), 2 heads of 64.
VISION = {"image_size": 224, "patch_size": 16, "width": 128, "depth": 2, "mlp_ratio": 4}
# med_config.json, shrunk (the published one: hidden 768, 12 layers, 12 heads, 3072, vocab 30524, width 1024).
TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
MLP_SIZES = (1024, 128, 64, 16, 1)  # ImageReward's MLP(768), here over the 64-wide text features

_WORDS = """a an the of in on at with and or to by for from is are photo photograph picture painting drawing
portrait landscape cat cats dog dogs horse astronaut riding red blue green yellow black white orange purple big
small old young man woman girl boy city street night day sun moon sky sea ocean river mountain forest tree trees
flower flowers house castle car train ship robot dragon lighthouse dusk dawn oil watercolor sketch digital art
artstation trending detailed highly realistic render style cinematic lighting light dark beautiful cute happy sad
two three four chess playing hat table chair room window door fire water snow rain cloud clouds star stars space
planet cube sphere neon tokyo paris new york cafe creme naive unicode html amp lt gt emoji party don it we they
re ll ve t s d m full width text snake case kebab back slash tab new line cyberpunk fantasy anime 4k 8k hd by
greg rutkowski van gogh monet ghibli studio""".split()
_SUFFIXES = "s es ed ing er est ly y ness ful tion ic al ish".split()
_OTHER = list("αβγδεοσςπ") + list("猫犬山水東京夜景人日月") + list("のネオンカ") + ["é", "ü", "ß", "ñ", "ç"]


def vocabulary() -> list[str]:
    """bert-base-uncased's specials in its order, punctuation, digits, letters, words and ``##`` pieces."""
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(5)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase) + _OTHER
    tokens += _WORDS
    tokens += [f"##{c}" for c in string.ascii_lowercase + string.digits] + [f"##{s}" for s in _SUFFIXES]
    tokens += [f"##{c}" for c in _OTHER]
    return list(dict.fromkeys(tokens))  # each once, at its first place


def med_config(vocab_size: int) -> dict:
    """The published med_config.json's keys, with the tiny sizes."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": VISION["width"],
        "add_cross_attention": True,
        **TEXT,
    }


def _vision_shapes() -> dict[str, tuple[int, ...]]:
    w, p, hidden = VISION["width"], VISION["patch_size"], VISION["width"] * VISION["mlp_ratio"]
    tokens = (VISION["image_size"] // p) ** 2 + 1
    shapes = {"patch_embed.proj.weight": (w, 3, p, p), "patch_embed.proj.bias": (w,)}
    shapes |= {"cls_token": (1, 1, w), "pos_embed": (1, tokens, w), "norm.weight": (w,), "norm.bias": (w,)}
    for i in range(VISION["depth"]):
        b = f"blocks.{i}."
        shapes |= {b + n: (w,) for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}
        shapes |= {b + "attn.qkv.weight": (3 * w, w), b + "attn.qkv.bias": (3 * w,)}
        shapes |= {b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,)}
        shapes |= {b + "mlp.fc1.weight": (hidden, w), b + "mlp.fc1.bias": (hidden,)}
        shapes |= {b + "mlp.fc2.weight": (w, hidden), b + "mlp.fc2.bias": (w,)}
    return shapes


def _linear(name: str, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (out_features, in_features), f"{name}.bias": (out_features,)}


def _text_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    h, inner, e = TEXT["hidden_size"], TEXT["intermediate_size"], VISION["width"]
    shapes = {"embeddings.word_embeddings.weight": (vocab_size, h), "embeddings.position_embeddings.weight": (512, h)}
    shapes |= {"embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    for i in range(TEXT["num_hidden_layers"]):
        layer = f"encoder.layer.{i}."
        for part, kv_width in (("attention", h), ("crossattention", e)):
            shapes |= _linear(f"{layer}{part}.self.query", h, h)
            shapes |= _linear(f"{layer}{part}.self.key", h, kv_width) | _linear(
                f"{layer}{part}.self.value", h, kv_width
            )
            shapes |= _linear(f"{layer}{part}.output.dense", h, h)
            shapes |= {f"{layer}{part}.output.LayerNorm.weight": (h,), f"{layer}{part}.output.LayerNorm.bias": (h,)}
        shapes |= _linear(f"{layer}intermediate.dense", inner, h) | _linear(f"{layer}output.dense", h, inner)
        shapes |= {f"{layer}output.LayerNorm.weight": (h,), f"{layer}output.LayerNorm.bias": (h,)}
    return shapes


def _mlp_shapes() -> dict[str, tuple[int, ...]]:
    shapes, width = {}, TEXT["hidden_size"]
    for index, out_features in zip((0, 2, 4, 6, 7), MLP_SIZES):  # Dropouts at 1, 3 and 5
        shapes |= _linear(f"layers.{index}", out_features, width)
        width = out_features
    return shapes


def _draw(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Weights that make every input matter: unit-variance activations, LayerNorm gains near 1, visible biases."""
    noise = torch.randn(shape, generator=generator)
    if name.endswith("bias"):
        return 0.1 * noise
    if "norm" in name.lower() and len(shape) == 1:
        return 1 + 0.1 * noise
    if name.endswith(("cls_token", "pos_embed")) or "embeddings" in name:
        return 0.5 * noise
    fan_in = 1
    for size in shape[1:]:
        fan_in *= size
    return noise * fan_in**-0.5


def state_dict(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """ImageReward.pt's content: the scored keys, med.py's position_ids buffer and a few BLIP keys to ignore."""
    generator = torch.Generator().manual_seed(seed)
    groups = {"blip.visual_encoder.": _vision_shapes(), "blip.text_encoder.": _text_shapes(vocab_size)}
    groups["mlp."] = _mlp_shapes()
    groups["blip."] = {
        "vision_proj.weight": (256, VISION["width"]),
        "text_proj.weight": (256, TEXT["hidden_size"]),
        "itm_head.weight": (2, TEXT["hidden_size"]),
        "visual_encoder_m.cls_token": (1, 1, VISION["width"]),
        "text_decoder.cls.predictions.bias": (vocab_size,),
        "image_queue": (256, 8),
        "temp": (),
    }
    state = {
        prefix + name: _draw(name, shape, generator)
        for prefix, shapes in groups.items()
        for name, shape in shapes.items()
    }
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(512).expand(1, -1).clone()
    state["blip.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return state


def write_image_reward(directory: Path, seed: int = 0) -> Path:
    """Write ImageReward.pt, med_config.json and vocab.txt into ``directory`` (created); return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = vocabulary()
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    vocab_size = len(tokens) + 2  # BLIP adds [DEC] and [ENC]
    (directory / "med_config.json").write_text(json.dumps(med_config(vocab_size), indent=2))
    torch.save(state_dict(vocab_size, seed), directory / "ImageReward.pt")
    return directory
