"""The CPU's matrix units and the path they suggest (resources.cpu_features, cpu_path), and the torch backend's
oneDNN-packed projections on a CPU in fp32 (torch_backend.pack_for_cpu): the unpacked model's embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pickscore.backends.torch_backend import PackedAttention, PackedLinear, TorchBackend, can_pack
from pickscore.model.checkpoint import resolve
from pickscore.resources import MATRIX_FLAGS, cpu_features, cpu_path

XEON = "Intel(R) Xeon(R) Platinum 8488C"
XEON_FLAGS = "fpu sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni fma"


def cpuinfo(tmp_path, model: str, flags: str, processors: int = 2):
    entry = f"processor\t: {{n}}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
    path = tmp_path / "cpuinfo"
    path.write_text("".join(entry.format(n=n) for n in range(processors)))
    return path


def test_cpu_features_reads_the_model_and_the_matrix_flags_only(tmp_path):
    features = cpu_features(cpuinfo(tmp_path, XEON, XEON_FLAGS))
    assert features.model == XEON
    assert features.flags == set(MATRIX_FLAGS)  # every flag it checks, none of the others (fpu, sse2, fma)


def test_an_unreadable_cpuinfo_is_an_unknown_cpu_without_flags(tmp_path):
    features = cpu_features(tmp_path / "missing")
    assert (features.model, features.flags) == ("unknown", frozenset())


@pytest.mark.parametrize(
    ("flags", "path"),
    [
        ({"avx2", "avx512f", "amx_tile", "amx_bf16", "amx_int8", "avx512_vnni"}, "torch-bf16"),  # Sapphire Rapids
        ({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, "torch-bf16"),  # Cooper Lake, Zen 4
        ({"avx2", "avx512f", "avx512_vnni"}, "onnx-int8"),  # Cascade Lake
        ({"avx2", "avx_vnni"}, "onnx-int8"),  # Alder Lake
        ({"avx2"}, "onnx-fp32"),  # Zen 2/3 (the AMD EPYC here)
        (set(), "onnx-fp32"),
    ],
)
def test_cpu_path_follows_the_matrix_units(flags, path):
    assert cpu_path(frozenset(flags)) == path


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
