"""`--compile`: the towers through torch.compile (inductor on CPU here; CUDA graphs on a GPU), batches padded to
power-of-two buckets, results equal to eager ones."""

from __future__ import annotations

import numpy as np
import pytest

from pickscore.backends import load_backend
from pickscore.backends.torch_backend import TorchBackend, bucket
from pickscore.model.checkpoint import resolve
from pickscore.model.preprocess import load_uint8
from tests.conftest import varied_images


def test_buckets_are_the_next_power_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 31, 32, 33)] == [1, 2, 4, 4, 8, 32, 32, 64]


def test_compiled_towers_match_eager_through_padded_buckets(tiny_hf_dir):
    eager = TorchBackend(resolve(tiny_hf_dir))
    compiled = TorchBackend(resolve(tiny_hf_dir), compile=True)
    crops = np.stack([load_uint8(data, eager.preprocess) for _, data, _ in varied_images()[:4]])
    tokens = eager.tokenizer(["a red fox", "two blue squares", "a lighthouse at dusk", "x"])
    for n in (3, 4):  # 3 is padded to the bucket of 4: one compiled shape serves both
        np.testing.assert_allclose(compiled.encode_image(crops[:n]), eager.encode_image(crops[:n]), atol=1e-5)
        np.testing.assert_allclose(compiled.encode_text(tokens[:n]), eager.encode_text(tokens[:n]), atol=1e-5)
    assert compiled.encode_image(crops[:3]).shape == (3, eager.embed_dim)
    assert compiled.description.endswith("compiled")


def test_compile_is_refused_for_an_onnx_export(tmp_path):
    (tmp_path / "pickscore_onnx.json").write_text("{}")
    with pytest.raises(ValueError, match="--compile is for the torch backend"):
        load_backend(str(tmp_path), compile=True)
