"""ImageReward (``pickscore.model.image_reward``, ``pickscore.model.wordpiece``) against independent references:
timm's ``VisionTransformer`` configured as BLIP's ViT, transformers' ``BlipTextModel`` (BLIP's med.py text encoder,
ported: same modules, arithmetic and names) and ``BertTokenizer``, and transcriptions of ImageReward's ``MLP`` and
``ImageReward.score`` (named as such below), on a tiny random-weight model in the published layout.
"""

from __future__ import annotations

import functools
import io
import json
import string
import unicodedata

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pickscore.backends import load_backend
from pickscore.errors import ModelLoadError
from pickscore.model.checkpoint import resolve
from pickscore.model.image_reward import load_image_reward
from pickscore.model.wordpiece import WordPiece
from pickscore.scorer import Scorer
from tests.conftest import varied_images
from tests.model.image_reward_layout import TEXT, VISION, write_image_reward

PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse, oil painting, trending on ArtStation!!!",
    "Crème brûlée in a café — naïve façade (watercolor)",
    "東京の夜景、ネオン 猫",
    "a red cube on a blue sphere, " * 6,  # longer than 35 tokens: cut to [CLS] + 33 + [SEP]
    "a [PAD] written in the prompt, and [MASK] [ENC]",
    "",
]

# Strings for the tokenizer: cases, accents, punctuation, CJK, controls, special tokens, long words, white space.
TEXTS = PROMPTS + [
    "A RED Cube On A Blue Sphere, 4k, trending on artstation",
    "Ünïcödé café NAÏVE ß ﬁ İstanbul",
    "emoji 🐱🚀 party!!! ¿qué? «quotes» “curly” ‘single’ … – —",
    "don't it's we're they'll I'd I'm you've",
    "&amp; html &lt;b&gt; snake_case-and-kebab/slashes\\back ~`^$|",
    "tabs\tand\n\nnewlines \u00a0 nbsp \u2003 em-space\u3000ideographic\u2028line",
    "zero\u200bwidth soft\u00adhyphen bell\x07 nul\x00 replacement\ufffd",
    "x" * 101 + " " + "cat" * 33 + " " + "catcatcat",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ 12345 3.14 1e-5 ٣",
    "[CLS][SEP][UNK][DEC] a[MASK]b [mask] [Mask]",
    "cafe\u0301 (combining accent) αβγ ΑΒΓ",
    "   leading and trailing   ",
    "猫犬山水東京夜景人日月 mixed猫text",
]


# -- references -----------------------------------------------------------------------------------------------------


def reference_tokenizer(directory):
    """BLIP's ``init_tokenizer`` on transformers' BertTokenizer: bert-base-uncased's vocab.txt, [DEC] and [ENC] added.

    transformers 5 builds BertTokenizer from ``vocab=`` (a ``vocab_file=`` keyword is silently ignored there)."""
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert import load_vocab

    tokenizer = BertTokenizer(vocab=load_vocab(str(directory / "vocab.txt")), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def legacy_tokenizer(directory):
    """The same on transformers' Python BertTokenizer (BertTokenizerLegacy in 5.x, what ImageReward ran in 4.x)."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    tokenizer = BertTokenizerLegacy(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _state(directory):
    return torch.load(directory / "ImageReward.pt", map_location="cpu", weights_only=True)


def _prefixed(state, prefix):
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def reference_vit(directory):
    """timm's VisionTransformer as BLIP's ``create_vit``: qkv bias, class token, LayerNorm(eps=1e-6), no pre-norm,
    every token out of ``forward_features``."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        img_size=VISION["image_size"],
        patch_size=VISION["patch_size"],
        embed_dim=VISION["width"],
        depth=VISION["depth"],
        num_heads=VISION["width"] // 64,
        mlp_ratio=VISION["mlp_ratio"],
        qkv_bias=True,
        class_token=True,
        pre_norm=False,
        num_classes=0,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    )
    vit.load_state_dict(_prefixed(_state(directory), "blip.visual_encoder."), strict=True)
    return vit.eval()


def reference_text_encoder(directory):
    """transformers' BlipTextModel from med_config.json (BLIP's BertConfig + ``encoder_width`` = the ViT's width;
    ``is_decoder`` builds the cross-attention, as med.py's ``add_cross_attention``), no pooler."""
    from transformers import BlipTextConfig, BlipTextModel

    med = json.loads((directory / "med_config.json").read_text())
    config = BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=VISION["width"],
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med["hidden_act"],
        layer_norm_eps=med["layer_norm_eps"],
        pad_token_id=med["pad_token_id"],
        is_decoder=med["add_cross_attention"],
    )
    model = BlipTextModel(config, add_pooling_layer=False)
    weights = _prefixed(_state(directory), "blip.text_encoder.")
    del weights["embeddings.position_ids"]  # med.py's persistent buffer; BlipTextModel's is not persistent
    model.load_state_dict(weights, strict=True)
    return model.eval()


def encode_text_reference(model, ids, attention_mask, image_embeds):
    """As ImageReward.score calls med.py's BertModel: mode 'multimodal', bidirectional (is_decoder=False)."""
    image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
    output = model(
        ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        is_decoder=False,
        return_dict=True,
    )
    return output.last_hidden_state


class MLP(torch.nn.Module):
    """A transcription of ImageReward's ``MLP`` (ImageReward/ImageReward.py; its init is replaced by the weights)."""

    def __init__(self, input_size):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(self.input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, input):
        return self.layers(input)


class ReferenceImageReward:
    """A transcription of ImageReward's ``ImageReward.score`` on the references: tokenizer, ViT, text encoder, MLP,
    ``(rewards - mean) / std``."""

    mean = 0.16717362830052426
    std = 1.0333394966054072

    def __init__(self, directory):
        self.tokenizer = reference_tokenizer(directory)
        self.visual_encoder = reference_vit(directory)
        self.text_encoder = reference_text_encoder(directory)
        self.mlp = MLP(TEXT["hidden_size"])
        self.mlp.load_state_dict(_prefixed(_state(directory), "mlp."))
        self.mlp.eval()

    @torch.no_grad()
    def score_pixels(self, prompt: str, image: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) of one prompt with preprocessed images (B, 3, 224, 224)."""
        text_input = self.tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        image_embeds = self.visual_encoder.forward_features(image)
        ids = text_input.input_ids.expand(len(image), -1)
        mask = text_input.attention_mask.expand(len(image), -1)
        txt_features = encode_text_reference(self.text_encoder, ids, mask, image_embeds)[:, 0, :].float()
        rewards = self.mlp(txt_features)
        rewards = (rewards - self.mean) / self.std
        return rewards[:, 0]


def image_reward_reference_scores(directory, prompt: str, pictures: list) -> np.ndarray:
    """ImageReward's ``score`` end to end, one image per call as there: its ``_transform(224)`` (torchvision's
    bicubic resize, centre crop, RGB, CLIP's mean and std) and the transcription above."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    preprocess = Compose(
        [
            Resize(224, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(224),
            lambda image: image.convert("RGB"),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    reference = ReferenceImageReward(directory)
    return np.array([float(reference.score_pixels(prompt, preprocess(p).unsqueeze(0))[0]) for p in pictures])


# -- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return write_image_reward(tmp_path_factory.mktemp("imagereward") / "ImageReward", seed=11)


@pytest.fixture(scope="module")
def loaded(layout):
    return load_image_reward(layout, str(layout))


@pytest.fixture(scope="module")
def reference(layout):
    return ReferenceImageReward(layout)


def _pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# -- the model ------------------------------------------------------------------------------------------------------


def test_loader_reports_sizes_and_the_backend_attributes(loaded):
    model, tokenizer, info = loaded
    tokens = (224 // 16) ** 2 + 1
    assert info == {
        "embed_dim": tokens * VISION["width"],
        "image_size": 224,
        "context_length": 35,
        "image_tokens": tokens,
        "image_width": VISION["width"],
        "text_width": TEXT["hidden_size"],
    }
    assert float(model.logit_scale) == 0.0 and not model.training
    assert tokenizer.context_length == 35 and tokenizer.pad_id == tokenizer.encoder["[PAD]"] == 0
    assert all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())


def test_image_tokens_equal_timm(loaded, reference):
    model = loaded[0]
    pixels = _pixels(3, 0)
    with torch.no_grad():
        ours = model.encode_image(pixels)
        theirs = reference.visual_encoder.forward_features(pixels)
    assert ours.shape == (3, 197 * VISION["width"])
    torch.testing.assert_close(ours.view(theirs.shape), theirs, atol=1e-5, rtol=1e-5)


def test_text_encoder_equals_blip_text_model(loaded, reference):
    model, tokenizer, _ = loaded
    text_input = reference.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    image = torch.randn(len(PROMPTS), 197, VISION["width"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.blip["text_encoder"](text_input.input_ids, text_input.attention_mask, image)
        theirs = encode_text_reference(reference.text_encoder, text_input.input_ids, text_input.attention_mask, image)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_reference_text_encoder_ignores_padding(reference):
    """The reference's own check: a padded position changes nothing (so its mask is applied, not added as 0/1)."""
    text_input = reference.tokenizer(
        ["a cat"], padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    image = torch.randn(1, 197, VISION["width"])
    other = text_input.input_ids.clone()
    other[0, -1] = 50
    with torch.no_grad():
        a = encode_text_reference(reference.text_encoder, text_input.input_ids, text_input.attention_mask, image)
        b = encode_text_reference(reference.text_encoder, other, text_input.attention_mask, image)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=0, rtol=0)


@pytest.mark.parametrize("seed", [2, 3])
def test_rewards_equal_the_reference(loaded, reference, seed):
    model, tokenizer, _ = loaded
    pixels = _pixels(len(PROMPTS), seed)
    with torch.no_grad():
        ours = model.score_pairs(model.encode_text(torch.from_numpy(tokenizer(PROMPTS))), model.encode_image(pixels))
    theirs = torch.stack([reference.score_pixels(p, x[None])[0] for p, x in zip(PROMPTS, pixels)])
    assert ours.dtype == torch.float32 and ours.shape == (len(PROMPTS),)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert float(theirs.std()) > 0.1  # the rewards differ: the comparison is not of constants


def test_one_prompt_against_many_images_and_the_image_matters(loaded, reference):
    model, tokenizer, _ = loaded
    pixels = _pixels(4, 4)
    tokens = torch.from_numpy(tokenizer([PROMPTS[1]] * 4))
    with torch.no_grad():
        ours = model.score_pairs(model.encode_text(tokens), model.encode_image(pixels))
    theirs = reference.score_pixels(PROMPTS[1], pixels)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert float(theirs.std()) > 0.05


def test_padding_may_be_cut_and_the_weights_dtype_is_the_compute_dtype(loaded):
    """The text may come cut after its longest prompt (the CLS output ignores padding); float64 weights compute in
    float64 and still answer float32."""
    model, tokenizer, _ = loaded
    tokens = torch.from_numpy(tokenizer(PROMPTS[:3]))
    images = model.encode_image(_pixels(3, 5))
    with torch.no_grad():
        full = model.score_pairs(model.encode_text(tokens), images)
        longest = int((tokens != tokenizer.pad_id).sum(dim=1).max())
        assert longest < 35
        cut = model.score_pairs(model.encode_text(tokens[:, :longest]), images)
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=0)
    import copy

    wide = copy.deepcopy(model).double()
    with torch.no_grad():
        double = wide.score_pairs(wide.encode_text(tokens), wide.encode_image(_pixels(3, 5)))
    assert double.dtype == torch.float32
    torch.testing.assert_close(double, full, atol=1e-4, rtol=0)


def test_scorer_on_image_bytes_equals_image_reward_score(layout):
    """Through the package's resolver, backend, preprocessing and tokenizer, against ImageReward.score on the same
    pictures (one per call, as there)."""
    inputs = [(data, rgb if rgb is not None else Image.open(io.BytesIO(data))) for _, data, rgb in varied_images(3)]
    assert resolve(layout).kind == "image_reward"
    scorer = Scorer(load_backend(str(layout)))
    for prompt in PROMPTS[1:4]:
        ours = np.array(scorer.score(prompt, [data for data, _ in inputs]))
        theirs = image_reward_reference_scores(layout, prompt, [picture for _, picture in inputs])
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


# -- the tokenizer --------------------------------------------------------------------------------------------------


def _hf_ids(tokenizer, texts):
    out = tokenizer(texts, padding="max_length", truncation=True, max_length=35)
    return np.array(out["input_ids"]), np.array(out["attention_mask"])


def _assert_same(ours: WordPiece, tokenizer, texts):
    ids = ours(texts)
    hf_ids, hf_mask = _hf_ids(tokenizer, texts)
    for i, text in enumerate(texts):
        assert ids[i].tolist() == hf_ids[i].tolist(), repr(text)
    # The attention mask the model derives from the ids: every position up to the last that is not padding.
    positions = np.arange(35)
    last = np.where(ids != ours.pad_id, positions, -1).max(axis=1, keepdims=True)
    np.testing.assert_array_equal((positions <= last).astype(int), hf_mask)


@pytest.fixture(scope="module")
def tokenizers(layout):
    return WordPiece.from_file(layout / "vocab.txt"), reference_tokenizer(layout), legacy_tokenizer(layout)


def test_tokenizer_equals_bert_tokenizer(tokenizers):
    ours, rust, python = tokenizers
    assert ours.encoder["[DEC]"] == rust.convert_tokens_to_ids("[DEC]") == len(ours.encoder) - 2
    assert ours.encoder["[ENC]"] == rust.convert_tokens_to_ids("[ENC]") == len(ours.encoder) - 1
    _assert_same(ours, rust, TEXTS)
    _assert_same(ours, python, TEXTS)
    assert ours(PROMPTS[4])[0, -1] == ours.sep_id  # truncated, [SEP] kept


def test_where_transformers_tokenizers_differ_ours_is_imagereward_s(tokenizers):
    """ImageReward ran transformers 4's Python BertTokenizer. Where the two of transformers 5 disagree, ours takes
    the 4.x behaviour: (1) each character is lower-cased alone (4.x lower-cased character by character before
    splitting, as the Rust normaliser does; 5.x's Python one lower-cases words, so a final capital sigma becomes ς);
    (2) a special token is recognised in the text as written (4.x and Rust), not after control characters are
    removed from it (5.x Python); (3) unassigned code points are removed as control characters, as Python's
    tokenizer (4.x and 5.x) does by ``unicodedata.category`` 'Cn' (the Rust tables keep them, as unknown words)."""
    ours, rust, python = tokenizers
    _assert_same(ours, rust, ["ΟΔΟΣ ΣΑΣ", "[MA\x00SK] x"])
    assert _hf_ids(python, ["ΟΔΟΣ"])[0].tolist() != _hf_ids(rust, ["ΟΔΟΣ"])[0].tolist()
    unassigned = "cat\u0378 dog \U000e0fff"
    _assert_same(ours, python, [unassigned])
    assert ours([unassigned]).tolist() == ours(["cat dog"]).tolist()


# The characters every Unicode version since BERT's assigns alike: Latin, Greek, Cyrillic, general punctuation,
# CJK symbols, kana, ideographs, full-width forms, emoji (the Rust tables are older than Python's unicodedata).
_OLD_BLOCKS = [(0x0, 0x52F), (0x2000, 0x206F), (0x3000, 0x30FF), (0x4E00, 0x4FFF), (0xFF00, 0xFFEF), (0x1F300, 0x1F5FF)]
_OLD = "".join(
    chr(c)
    for low, high in _OLD_BLOCKS
    for c in range(low, high + 1)
    if unicodedata.category(chr(c)) not in ("Cn", "Cs")
)
_VOCAB_HEAVY = st.sampled_from(["cat", "dog", "Photo", "##s", "[MASK]", "[ENC]", "  ", "\t", "ing", "é", "猫"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(alphabet=_OLD, max_size=12), _VOCAB_HEAVY), max_size=8).map("".join))
def test_random_text_equals_bert_tokenizer(tokenizers, text):
    ours, rust, python = tokenizers
    _assert_same(ours, rust, [text])
    if "Σ" not in text:
        _assert_same(ours, python, [text])


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"], exclude_characters="Σ"), max_size=40))
def test_any_unicode_equals_python_bert_tokenizer(tokenizers, text):
    ours, _, python = tokenizers
    _assert_same(ours, python, [text])


# -- loading errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("vocab.txt", r"vocab\.txt is missing: it is bert-base-uncased's vocab\.txt.*hf download bert-base-uncased"),
        ("med_config.json", r"med_config\.json is missing.*hf download THUDM/ImageReward med_config\.json"),
        ("ImageReward.pt", r"ImageReward\.pt is missing.*hf download THUDM/ImageReward ImageReward\.pt"),
    ],
)
def test_a_missing_file_is_named_with_where_to_get_it(layout, tmp_path, name, says):
    for file in ("vocab.txt", "med_config.json", "ImageReward.pt"):
        if file != name:
            (tmp_path / file).symlink_to(layout / file)
    with pytest.raises(ModelLoadError, match=says):
        load_image_reward(tmp_path, "mine")


def _copy(layout, directory, state=None, config=None, vocab=None):
    directory.mkdir()
    torch.save(state if state is not None else _state(layout), directory / "ImageReward.pt")
    med = config if config is not None else json.loads((layout / "med_config.json").read_text())
    (directory / "med_config.json").write_text(json.dumps(med))
    (directory / "vocab.txt").write_text(vocab if vocab is not None else (layout / "vocab.txt").read_text())
    return directory


def test_wrong_contents_are_named(layout, tmp_path):
    state = _state(layout)
    no_vision = {k: v for k, v in state.items() if not k.startswith("blip.visual_encoder.")}
    with pytest.raises(
        ModelLoadError, match=r"ImageReward\.pt has no blip\.visual_encoder\.cls_token.*not ImageReward"
    ):
        load_image_reward(_copy(layout, tmp_path / "a", state=no_vision), "a")
    no_layer = {k: v for k, v in state.items() if ".layer.1.crossattention.self.key." not in k}
    with pytest.raises(ModelLoadError, match=r"ImageReward\.pt is not an ImageReward state dict.*missing.*layer\.1"):
        load_image_reward(_copy(layout, tmp_path / "b", state=no_layer), "b")
    relu = {**json.loads((layout / "med_config.json").read_text()), "hidden_act": "relu"}
    with pytest.raises(ModelLoadError, match=r"med_config\.json: unsupported .*hidden_act='relu'"):
        load_image_reward(_copy(layout, tmp_path / "c", config=relu), "c")
    cased = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_letters]) + "\n"
    with pytest.raises(ModelLoadError, match=r"vocab\.txt holds 57 tokens.*must be bert-base-uncased's"):
        load_image_reward(_copy(layout, tmp_path / "d", vocab=cased), "d")
    (tmp_path / "e").mkdir()
    for name in ("med_config.json", "vocab.txt"):
        (tmp_path / "e" / name).symlink_to(layout / name)
    (tmp_path / "e" / "ImageReward.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"cannot read .*ImageReward\.pt as a torch state dict"):
        load_image_reward(tmp_path / "e", "e")
