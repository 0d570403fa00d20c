"""CLIP byte-level BPE tokenizer, reproducing Hugging Face's ``CLIPTokenizer``.

The vocabulary is OpenAI CLIP's (``bpe_simple_vocab_16e6.txt.gz``, MIT-licensed, bundled here as open_clip
bundles it), the same 49,408 tokens every CLIP model (PickScore_v1 included) was trained with.
Text handling follows the tokenizer PickScore was trained and evaluated with
(``CLIPTokenizerFast``): exact special-token strings are kept as special tokens,
other text is NFC-normalised, runs of white space become one space, and it is
lower-cased; then it is split with CLIP's pattern and byte-level BPE encoded.
Sequences are ``[BOS] tokens [EOS]`` truncated to the context length (the EOS is
always kept) and padded with ``pad_id``.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import unicodedata
from importlib import resources
from pathlib import Path

import numpy as np
import regex

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CONTEXT_LENGTH = 77

_SPECIAL = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
# Rust's `\s` (used by the `tokenizers` library) is Unicode White_Space; Python's differs slightly.
_WHITESPACE = regex.compile(r"\p{White_Space}+")
_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\p{White_Space}\p{L}\p{N}]+""")


def byte_encoder() -> dict[int, str]:
    """byte -> the printable character byte-level BPE writes it as (GPT-2's table, which CLIP's vocabulary uses).

    The printable Latin-1 bytes stand for themselves and come first; the others (controls, space, soft hyphen)
    follow in byte order, as the characters from U+0100 up. The vocabulary's first 256 ids are in this order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The bundled CLIP vocabulary: (token -> id, merges in priority order)."""
    vocab = resources.files("pickscore.model") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(vocab.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    byte_chars = list(byte_encoder().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def save_hf_files(directory: str | Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` in Hugging Face's CLIP tokenizer layout."""
    directory = Path(directory)
    encoder, merges = vocabulary()
    (directory / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (directory / "merges.txt").write_text(merges_text, encoding="utf-8")


class Tokenizer:
    """Prompts -> int64 token ids of shape (N, context_length)."""

    def __init__(self, context_length: int = CONTEXT_LENGTH, pad_id: int = 0):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        self.encoder, merges = vocabulary()
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = byte_encoder()
        self.context_length = context_length
        self.pad_id = pad_id
        self.bos_id = self.encoder[BOS]
        self.eos_id = self.encoder[EOS]
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    def __getstate__(self) -> dict:
        """Picklable (a server's front-end processes receive it): the per-word cache is left behind."""
        return {k: v for k, v in self.__dict__.items() if k != "_bpe"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            first, second = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
            if (first, second) not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without BOS/EOS and without truncation."""
        ids: list[int] = []
        for segment in _SPECIAL.split(text):
            if segment in (BOS, EOS):
                ids.append(self.encoder[segment])
                continue
            normalized = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", segment)).lower()
            for piece in _SPLIT.findall(normalized):
                word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                ids.extend(self.encoder[t] for t in self._bpe(word))
        return ids

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """Tokenize prompts into an int64 array (N, context_length)."""
        return pack(self, prompts, self.bos_id, self.eos_id)


def pack(tokenizer, prompts: str | list[str], first: int, last: int) -> np.ndarray:
    """Each prompt's ids between ``first`` and ``last`` (truncated so ``last`` is always kept), padded with the
    tokenizer's ``pad_id`` to its ``context_length`` -> (N, context_length) int64: every tokenizer's output form."""
    if isinstance(prompts, str):
        prompts = [prompts]
    out = np.full((len(prompts), tokenizer.context_length), tokenizer.pad_id, dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids = [first, *tokenizer.encode(prompt)[: tokenizer.context_length - 2], last]
        out[row, : len(ids)] = ids
    return out
