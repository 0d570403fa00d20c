"""The torch backend's text tower runs over the prompts' own length, not the whole context, with the embeddings
of the whole context."""

from __future__ import annotations

import numpy as np
import torch

from pickscore.backends.torch_backend import TorchBackend
from pickscore.model.checkpoint import resolve

PROMPTS = ["a red fox", "a lighthouse at dusk, oil painting, dramatic sky over a stormy sea", "x"]


def full_context(backend: TorchBackend, tokens: np.ndarray) -> np.ndarray:
    """encode_text over all 77 positions: what the embeddings must equal."""
    with torch.inference_mode():
        out = backend.model.encode_text(torch.from_numpy(tokens))
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def test_prompts_run_over_their_own_length_with_the_full_context_embeddings(tiny_hf_dir):
    backend = TorchBackend(resolve(tiny_hf_dir))
    lengths: list[int] = []
    backend.model.token_embedding.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    batches = [backend.tokenizer(PROMPTS), *(backend.tokenizer([p]) for p in PROMPTS)]  # together, then each alone
    expected = [full_context(backend, tokens) for tokens in batches]
    lengths.clear()

    for tokens, want in zip(batches, expected):
        np.testing.assert_allclose(backend.encode_text(tokens), want, atol=1e-6)
    used = [int((tokens != backend.tokenizer.pad_id).sum(axis=1).max()) for tokens in batches]
    assert lengths == used  # the longest prompt of each batch, never the whole context
    assert max(used) < backend.tokenizer.context_length


def test_a_prompt_filling_the_context_runs_whole(tiny_hf_dir):
    backend = TorchBackend(resolve(tiny_hf_dir))
    tokens = backend.tokenizer(["a very long prompt " * 40, "short"])
    assert (tokens[0] != backend.tokenizer.pad_id).all()  # truncated to the context, end-of-text kept
    np.testing.assert_allclose(backend.encode_text(tokens), full_context(backend, tokens), atol=1e-6)
