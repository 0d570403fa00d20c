"""A model's identity (backends.model_identity): NAME:KIND:PRECISION:DIGEST16, the digest a SHA-256 of the weights as
loaded, computed once at load. Equal for two loads of the same weights, changed by one changed weight or another
precision; for ONNX, by any byte of the graph or external-data files and by nothing else in the export."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from pickscore import Scorer
from pickscore.backends import DEFAULT_NAME, model_identity
from pickscore.backends.onnx_backend import _weights
from pickscore.backends.torch_backend import TorchBackend
from pickscore.model.checkpoint import resolve
from tests.conftest import make_hf_clip, save_hf_clip

IDENTITY = re.compile(r"pickscore:clip:(fp32|bf16):[0-9a-f]{16}")


def perturbed_hf_dir(directory: Path) -> Path:
    """``tiny_hf_dir``'s model (the same seed) saved with one weight of one tensor moved by 1e-3."""
    model = make_hf_clip()
    with torch.no_grad():
        model.text_projection.weight[0, 0] += 1e-3
    return save_hf_clip(model, directory)


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory) -> Path:
    return perturbed_hf_dir(tmp_path_factory.mktemp("perturbed"))


def test_two_loads_of_the_same_weights_have_one_identity(tiny_hf_dir, tmp_path):
    first = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32")
    copy = save_hf_clip(make_hf_clip(), tmp_path / "copy")  # the same weights written again, elsewhere
    second = Scorer.from_pretrained(copy, device="cpu", dtype="fp32")
    assert IDENTITY.fullmatch(first.identity), first.identity
    assert first.identity == second.identity == model_identity(DEFAULT_NAME, first.backend)
    assert re.fullmatch(r"[0-9a-f]{64}", first.backend.weights_digest)
    assert first.identity.endswith(first.backend.weights_digest[:16])
    assert first.backend.precision == "fp32"


def test_the_digest_is_of_the_weights_as_loaded_not_as_packed(tiny_hf_dir):
    # from_ref packs the projections for oneDNN after loading (another state dict); a plain load does not
    packed = TorchBackend.from_ref(str(tiny_hf_dir), device="cpu", dtype="fp32")
    plain = TorchBackend(resolve(str(tiny_hf_dir)), device="cpu")
    assert packed.weights_digest == plain.weights_digest


def test_one_changed_weight_changes_the_identity(tiny_hf_dir, perturbed):
    ours = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32")
    theirs = Scorer.from_pretrained(perturbed, device="cpu", dtype="fp32")
    assert ours.backend.weights_bytes == theirs.backend.weights_bytes  # same shapes: only the digest tells
    assert ours.identity != theirs.identity
    assert ours.identity.rsplit(":", 1)[0] == theirs.identity.rsplit(":", 1)[0] == "pickscore:clip:fp32"


def test_the_precision_is_part_of_the_identity(tiny_hf_dir):
    fp32 = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32")
    bf16 = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="bf16")
    assert bf16.backend.precision == "bf16" and bf16.identity.startswith("pickscore:clip:bf16:")
    assert fp32.backend.weights_digest != bf16.backend.weights_digest  # other bytes as loaded
    assert model_identity("other", bf16.backend).startswith("other:clip:bf16:")


def test_an_onnx_exports_digest_is_its_graph_and_external_data_files_in_name_order(tmp_path):
    (tmp_path / "text.onnx").write_bytes(b"text graph")
    (tmp_path / "image.onnx").write_bytes(b"image graph")
    (tmp_path / "image.onnx.data").write_bytes(bytes(range(256)) * 4)
    size, digest = _weights(tmp_path)
    contents = b"image graph" + bytes(range(256)) * 4 + b"text graph"  # image.onnx, image.onnx.data, text.onnx
    assert (size, digest) == (len(contents), hashlib.sha256(contents).hexdigest())
    (tmp_path / "pickscore_onnx.json").write_text("{}")  # the manifest, tokenizer files: not weights
    (tmp_path / "trt_cache").mkdir()
    assert _weights(tmp_path) == (size, digest)
    (tmp_path / "image.onnx.data").write_bytes(bytes(range(256)) * 3 + bytes([1]) + bytes(range(1, 256)))
    assert _weights(tmp_path)[1] != digest  # one byte of external data
