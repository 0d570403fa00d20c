from __future__ import annotations

import numpy as np
import pytest

from pickscore.model.tokenizer import EOS, Tokenizer, save_hf_files

TEXTS = [
    "",
    "a photo of a cat",
    "A RED Cube On A Blue Sphere, 4k, trending on artstation",
    "Ünïcödé café NAÏVE",
    "東京の夜景、ネオン",
    "emoji 🐱🚀 party!!!",
    "don't it's we're they'll I'd I'm you've",
    "&amp; html &lt;b&gt;",
    "tabs\tand\n\nnewlines \u00a0 nbsp \u2003 em-space",
    "x " * 100,
    "a<|endoftext|>b<|startoftext|>c",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "12345 3.14 1e-5",
    "İstanbul ß ﬁ Σίσυφος",
    "cafe\u0301 (combining accent, NFC-composed)",
    "   leading and trailing   ",
    "snake_case-and-kebab/slashes\\back",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    d = tmp_path_factory.mktemp("tok")
    save_hf_files(d)
    return CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))


def test_ids_equal_hugging_face_up_to_end_of_text(hf_tokenizer):
    tok = Tokenizer()
    ours = tok(TEXTS)
    theirs = hf_tokenizer(TEXTS, padding="max_length", truncation=True, max_length=77, return_tensors="np")["input_ids"]
    assert ours.shape == theirs.shape == (len(TEXTS), 77)
    for text, a, b in zip(TEXTS, ours, theirs):
        end = int(np.argmax(a == tok.eos_id))
        assert list(a[: end + 1]) == list(b[: end + 1]), text


def test_truncation_keeps_end_of_text_and_pads():
    tok = Tokenizer()
    long, short = tok(["word " * 200, "hi"])
    assert long[0] == tok.bos_id and long[-1] == tok.eos_id and (long != 0).all()
    assert list(short[:3]) == [tok.bos_id, tok.encoder["hi</w>"], tok.eos_id] and (short[3:] == 0).all()
    assert tok.vocab_size == 49408 and tok.encoder[EOS] == 49407


def test_context_length_is_configurable():
    assert Tokenizer(context_length=8)(["one two three four five six seven eight"]).shape == (1, 8)
    with pytest.raises(ValueError):
        Tokenizer(context_length=1)
