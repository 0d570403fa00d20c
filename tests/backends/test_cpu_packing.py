"""The torch backend's oneDNN-packed projections on a CPU in fp32 (torch_backend.pack_for_cpu): the unpacked
model's embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pickscore.backends.torch_backend import PackedAttention, PackedLinear, TorchBackend, can_pack
from pickscore.model.checkpoint import resolve

needs_onednn = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32), reason="torch built without oneDNN")


@needs_onednn
def test_fp32_on_a_cpu_packs_every_block_and_keeps_the_embeddings(tiny_hf_dir):
    packed = TorchBackend.from_ref(str(tiny_hf_dir), device="cpu", dtype="fp32")
    plain = TorchBackend(resolve(str(tiny_hf_dir)), device="cpu")  # training's and the export check's way
    blocks = [b for b in packed.model.modules() if hasattr(b, "mlp")]
    assert blocks and all(isinstance(b.attn, PackedAttention) for b in blocks)
    assert all(isinstance(b.mlp.c_fc, PackedLinear) and isinstance(b.mlp.c_proj, PackedLinear) for b in blocks)
    assert not any(isinstance(m, (PackedLinear, PackedAttention)) for m in plain.model.modules())

    h, w = packed.preprocess.output_size
    crops = np.random.default_rng(0).integers(0, 256, (5, h, w, 3), dtype=np.uint8)
    tokens = packed.tokenizer(["a red fox", "a lighthouse at dusk, oil painting, dramatic sky", "x"])  # causal mask
    for n in (1, 5):
        np.testing.assert_allclose(packed.encode_image(crops[:n]), plain.encode_image(crops[:n]), atol=1e-5)
    np.testing.assert_allclose(packed.encode_text(tokens), plain.encode_text(tokens), atol=1e-5)
    assert packed.description == plain.description == "cpu fp32"


def test_other_precisions_and_compiled_towers_are_not_packed(tiny_hf_dir):
    assert not can_pack(torch.device("cpu"), torch.bfloat16)
    assert not can_pack(torch.device("cuda"), torch.float32)
    bf16 = TorchBackend.from_ref(str(tiny_hf_dir), device="cpu", dtype="bf16")
    assert not any(isinstance(m, (PackedLinear, PackedAttention)) for m in bf16.model.modules())
