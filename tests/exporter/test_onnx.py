"""ONNX export of the tiny model: ONNX Runtime against transformers, the CLI and the server on the export, Triton."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from pickscore.cli import main
from pickscore.client import Client
from pickscore.errors import ModelLoadError
from pickscore.exporter.onnx import export_onnx
from pickscore.exporter.tensorrt import build_engines, missing
from pickscore.exporter.triton import export_triton
from pickscore.model.preprocess import load_pixels
from pickscore.scorer import Scorer
from pickscore.server.app import ServerThread
from tests.conftest import varied_images
from tests.server.conftest import PROMPT, settings_for

IMAGES = [data for _, data, _ in varied_images()[:9]]


@pytest.fixture(scope="module")
def onnx_dir(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_onnx(str(tiny_hf_dir), out)
    return out


def test_sessions_reproduce_transformers_embeddings_at_batch_1_and_7(onnx_dir, tiny_hf_model, tiny_hf_dir):
    scorer = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32")
    pixels = np.stack([load_pixels(b, scorer.preprocess_config) for b in IMAGES[:7]])
    tokens = scorer.tokenizer([PROMPT, "a cat", "", "a b c d e f", "x" * 300, "two dogs", "ok"])
    image = ort.InferenceSession(str(onnx_dir / "image.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(onnx_dir / "text.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        with torch.no_grad():
            ref_img = getattr(
                r := tiny_hf_model.get_image_features(pixel_values=torch.from_numpy(pixels[:n])), "pooler_output", r
            )
            ref_txt = getattr(
                r := tiny_hf_model.get_text_features(input_ids=torch.from_numpy(tokens[:n])), "pooler_output", r
            )
        np.testing.assert_allclose(
            image.run(None, {"pixel_values": pixels[:n]})[0],
            torch.nn.functional.normalize(ref_img, dim=-1).numpy(),
            atol=1e-4,
        )
        np.testing.assert_allclose(
            text.run(None, {"input_ids": tokens[:n]})[0],
            torch.nn.functional.normalize(ref_txt, dim=-1).numpy(),
            atol=1e-4,
        )


def test_batch_axis_is_symbolic_and_manifest_complete(onnx_dir):
    for name in ("image", "text"):
        graph = onnx.load(str(onnx_dir / f"{name}.onnx")).graph
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param
        assert graph.output[0].type.tensor_type.shape.dim[0].dim_param
    manifest = json.loads((onnx_dir / "pickscore_onnx.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["verification"]["max_abs_diff"] < 1e-4
    assert {"preprocessor_config.json", "vocab.json", "merges.txt"} <= {p.name for p in onnx_dir.iterdir()}


def test_cli_scores_of_the_export_match_the_checkpoint(onnx_dir, tiny_hf_dir, tmp_path, capsys):
    files = []
    for i, data in enumerate(IMAGES):
        files.append(tmp_path / f"{i}.img")
        files[-1].write_bytes(data)
    docs = []
    for model in (tiny_hf_dir, onnx_dir):
        assert main(["score", "--model", str(model), "--prompt", PROMPT, "--json", *map(str, files)]) == 0
        docs.append(json.loads(capsys.readouterr().out))
    np.testing.assert_allclose(
        [r["score"] for r in docs[1]["results"]], [r["score"] for r in docs[0]["results"]], atol=1e-4
    )


def test_server_onnxruntime_backend_equals_torch_backend(onnx_dir, tiny_hf_dir):
    got = {}
    for model in (tiny_hf_dir, onnx_dir):
        with ServerThread(settings_for(model)) as server, Client(server.address) as client:
            got[client.model_info().backend] = client.score(PROMPT, IMAGES)
    assert set(got) == {"torch", "onnxruntime"}
    np.testing.assert_allclose(got["onnxruntime"], got["torch"], atol=1e-4)


def test_low_precision_refused_below_the_agreement_threshold(tiny_hf_dir, tmp_path):
    with pytest.raises(
        ValueError, match="int8 export agrees with fp32 on 0.9.* below --min-agreement 1.0; not written"
    ):
        export_onnx(str(tiny_hf_dir), tmp_path / "int8", precision="int8", min_agreement=1.0)
    assert not (tmp_path / "int8").exists()
    manifest = export_onnx(str(tiny_hf_dir), tmp_path / "fp16", precision="fp16", min_agreement=0.9)
    assert manifest["verification"]["rank_agreement"] >= 0.9
    scorer = Scorer.from_pretrained(tmp_path / "fp16")
    assert scorer.backend.description.endswith("fp16") and len(scorer.score(PROMPT, IMAGES[:3])) == 3


def test_triton_repository_configs_parse_and_match_the_graphs(onnx_dir, tmp_path):
    repo = export_triton(str(onnx_dir), tmp_path / "repo", tensorrt=True)
    names = {p.name for p in repo.iterdir()}
    assert names == {"pickscore", "pickscore_image", "pickscore_text", "pickscore_preprocess", "pickscore_score"}
    onnx_types = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.INT64: mc.TYPE_INT64}
    for name in ("pickscore_image", "pickscore_text"):
        config = read_config(repo / name / "config.pbtxt")
        graph = onnx.load(str(repo / name / "1" / "model.onnx")).graph
        for declared, value in [*zip(config.input, graph.input), *zip(config.output, graph.output)]:
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
            assert (declared.name, declared.data_type, list(declared.dims)) == (
                value.name,
                onnx_types[value.type.tensor_type.elem_type],
                dims,
            )
        assert config.dynamic_batching.max_queue_delay_microseconds == 5000
        assert config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    ensemble = read_config(repo / "pickscore" / "config.pbtxt")
    assert [t.name for t in ensemble.input] == ["PROMPT", "IMAGE"] and ensemble.output[0].name == "SCORE"
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [
        "pickscore_preprocess",
        "pickscore_text",
        "pickscore_image",
        "pickscore_score",
    ]
    for step in ("pickscore_preprocess", "pickscore_score"):
        assert read_config(repo / step / "config.pbtxt").backend == "python"
        compile((repo / step / "1" / "model.py").read_text(), step, "exec")


def test_tensorrt_says_what_is_missing(onnx_dir):
    if missing() is None:
        pytest.skip("this machine has a GPU and TensorRT")
    with pytest.raises(ModelLoadError, match="cannot build TensorRT engines here: no CUDA GPU"):
        build_engines(onnx_dir)


def read_config(path) -> mc.ModelConfig:
    """Parse a config.pbtxt with Triton's own model_config.proto."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())
