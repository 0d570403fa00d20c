"""BERT's uncased WordPiece tokenizer, as ImageReward tokenizes prompts (BLIP's ``init_tokenizer``).

ImageReward calls ``BertTokenizer.from_pretrained("bert-base-uncased")`` with ``[DEC]`` and ``[ENC]`` added as
special tokens (ids 30522 and 30523, after the 30,522 of ``vocab.txt``), then
``tokenizer(prompt, padding="max_length", truncation=True, max_length=35)``: ``[CLS] pieces [SEP]``, cut to 33
pieces, padded with ``[PAD]``. This reproduces Hugging Face's ``BertTokenizer`` (the ``tokenizers`` library's
BERT normaliser, pre-tokeniser and WordPiece model) for that call:

* special tokens written in the prompt (``[CLS]``, ``[MASK]``, ``[ENC]``, ..., exact case) are kept whole;
* the rest is cleaned (NUL, U+FFFD and control/format characters dropped, white space made a space), CJK
  ideographs get spaces around them, accents are stripped (NFD, then non-spacing marks dropped), each character
  is lower-cased on its own (no final-sigma rule), and the text is split on white space and around every
  punctuation character (ASCII symbols included);
* each word is split greedily into the longest vocabulary pieces (``##`` marks a continuation); a word over 100
  characters, or one that cannot be split, is ``[UNK]``.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pickscore.model.tokenizer import pack

CONTEXT_LENGTH = 35
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
ADDED = ("[DEC]", "[ENC]")  # BLIP's additions, given the ids after the vocabulary's
MAX_WORD_CHARS = 100
CONTINUATION = "##"

# The CJK ideograph blocks BERT puts spaces around (its _is_chinese_char).
_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
_ASCII_PUNCTUATION = frozenset(chr(c) for c in (*range(33, 48), *range(58, 65), *range(91, 97), *range(123, 127)))


def load_vocab(path: Path) -> dict[str, int]:
    """vocab.txt: one token a line, its id the line number (a repeated token keeps its last line, as in BERT)."""
    with open(path, encoding="utf-8", newline="") as f:
        return {line.rstrip("\n"): index for index, line in enumerate(f)}


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK)


def _is_punctuation(char: str) -> bool:
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def _normalize(text: str) -> str:
    """BERT's normaliser: clean, space out CJK ideographs, strip accents, lower-case character by character."""
    out = []
    for char in text:
        if char in "\t\n\r":
            out.append(" ")
        elif char in "\0\ufffd" or unicodedata.category(char).startswith("C"):
            continue  # control and format characters; \x0b, \x0c, \x85 too, though they are white space
        elif char.isspace():
            out.append(" ")
        elif _is_cjk(char):
            out.append(f" {char} ")
        else:
            out.append(char)
    decomposed = unicodedata.normalize("NFD", "".join(out))
    return "".join(c.lower() for c in decomposed if unicodedata.category(c) != "Mn")


def _words(text: str) -> Iterator[str]:
    """Split on white space, and around each punctuation character."""
    for chunk in text.split():
        start = 0
        for i, char in enumerate(chunk):
            if _is_punctuation(char):
                if i > start:
                    yield chunk[start:i]
                yield char
                start = i + 1
        if start < len(chunk):
            yield chunk[start:]


class WordPiece:
    """Prompts -> int64 token ids of shape (N, context_length): ``[CLS] pieces [SEP] [PAD]...``.

    ``encoder`` maps every token (the vocabulary and the added ``[DEC]``/``[ENC]``) to its id.
    """

    def __init__(self, vocab: dict[str, int], context_length: int = CONTEXT_LENGTH):
        missing = [t for t in (PAD, UNK, CLS, SEP) if t not in vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks {', '.join(missing)}: not a BERT vocab.txt")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        self.encoder = dict(vocab)
        for token in ADDED:
            self.encoder.setdefault(token, len(self.encoder))
        self.context_length = context_length
        self.pad_id, self.unk_id = self.encoder[PAD], self.encoder[UNK]
        self.cls_id, self.sep_id = self.encoder[CLS], self.encoder[SEP]
        specials = sorted({PAD, UNK, CLS, SEP, *ADDED, *([MASK] if MASK in vocab else [])}, key=len, reverse=True)
        self._specials = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        self._pieces = functools.lru_cache(maxsize=65536)(self._pieces_uncached)

    def __getstate__(self) -> dict:
        """Picklable (a server's front-end processes receive it): the per-word cache is left behind."""
        return {k: v for k, v in self.__dict__.items() if k != "_pieces"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pieces = functools.lru_cache(maxsize=65536)(self._pieces_uncached)

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = CONTEXT_LENGTH) -> WordPiece:
        """From a BERT ``vocab.txt`` (bert-base-uncased's for ImageReward)."""
        return cls(load_vocab(Path(path)), context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _pieces_uncached(self, word: str) -> tuple[int, ...]:
        if len(word) > MAX_WORD_CHARS:
            return (self.unk_id,)
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else CONTINUATION + word[start:end]
                if piece in self.encoder:
                    ids.append(self.encoder[piece])
                    start = end
                    break
            else:
                return (self.unk_id,)
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without [CLS]/[SEP] and without truncation."""
        ids: list[int] = []
        for i, segment in enumerate(self._specials.split(text)):
            if i % 2:  # a special token written in the text
                ids.append(self.encoder[segment])
                continue
            for word in _words(_normalize(segment)):
                ids.extend(self._pieces(word))
        return ids

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """Tokenize prompts into an int64 array (N, context_length): [CLS] pieces [SEP] [PAD]..."""
        return pack(self, prompts, self.cls_id, self.sep_id)
