"""A Triton model repository from a model reference (or an existing ONNX export).

    pickscore export triton --model REF --out REPO [--precision fp32] [--tensorrt]

REPO/pickscore (ensemble) -> pickscore_preprocess (Python) -> pickscore_text, pickscore_image (ONNX)
-> pickscore_score (Python). The model names and tensors are those our server exposes over KServe v2.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from pickscore.backends.manifest import is_export, load_manifest
from pickscore.backends.triton_config import IMAGE, PREPROCESS, SCORE, TEXT, model_configs, tensor
from pickscore.exporter.onnx import export_onnx
from pickscore.model.checkpoint import atomic_directory
from pickscore.model.preprocess import PreprocessConfig


def export_triton(
    ref: str,
    out: str | Path,
    precision: str = "fp32",
    max_batch_size: int = 32,
    max_images_per_request: int = 256,
    max_queue_delay_us: int = 5000,
    tensorrt: bool = False,
    instances: int = 1,
) -> Path:
    out = Path(out)
    with atomic_directory(out) as repo:
        reuse = is_export(ref)
        onnx_dir = Path(ref) if reuse else repo / "_onnx"
        if not reuse:
            export_onnx(ref, onnx_dir, precision=precision)
        manifest = load_manifest(onnx_dir)
        pp = json.loads((onnx_dir / "preprocessor_config.json").read_text())
        size = PreprocessConfig.from_hf(pp).output_size
        configs = model_configs(
            manifest["embed_dim"],
            size,
            manifest["context_length"],
            max_batch_size,
            max_images_per_request,
            max_queue_delay_us,
        )
        configs.update(
            python_step_configs(
                manifest["embed_dim"], size, manifest["context_length"], max_images_per_request, manifest["logit_scale"]
            )
        )
        for name, config in configs.items():
            if name in (IMAGE, TEXT):
                config.instance_group[0].count = instances
                if tensorrt:
                    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
                        name="tensorrt"
                    )
                    accelerator.parameters.update(
                        {
                            "precision_mode": "FP16",
                            "trt_engine_cache_enable": "true",
                            "trt_engine_cache_path": f"/tmp/pickscore_trt/{name}",
                        }
                    )
            version = repo / name / "1"
            version.mkdir(parents=True)
            (repo / name / "config.pbtxt").write_text(text_format.MessageToString(config))
        shutil.copy(onnx_dir / "image.onnx", repo / IMAGE / "1" / "model.onnx")
        shutil.copy(onnx_dir / "text.onnx", repo / TEXT / "1" / "model.onnx")
        steps = resources.files("pickscore.exporter.triton_models")
        (repo / PREPROCESS / "1" / "model.py").write_text((steps / "preprocess.py").read_text())
        (repo / PREPROCESS / "1" / "pickscore_preprocess.json").write_text(
            json.dumps({"preprocessor_config": pp, "context_length": manifest["context_length"]}, indent=2)
        )
        (repo / SCORE / "1" / "model.py").write_text((steps / "score.py").read_text())
        if not reuse:
            shutil.rmtree(onnx_dir)
    return out


def python_step_configs(
    embed_dim: int, image_size: tuple[int, int], context_length: int, max_batch_size: int, logit_scale: float
) -> dict[str, mc.ModelConfig]:
    """The ensemble's two Python-backend steps (Triton repository only; our server runs them in the engine)."""
    h, w = image_size
    cpu = [mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)]
    preprocess = mc.ModelConfig(
        name=PREPROCESS,
        backend="python",
        max_batch_size=max_batch_size,
        instance_group=cpu,
        input=[
            tensor(mc.ModelInput, "PROMPT", mc.TYPE_STRING, [1]),
            tensor(mc.ModelInput, "IMAGE", mc.TYPE_STRING, [1]),
        ],
        output=[
            tensor(mc.ModelOutput, "input_ids", mc.TYPE_INT64, [context_length]),
            tensor(mc.ModelOutput, "pixel_values", mc.TYPE_FP32, [3, h, w]),
        ],
    )
    score = mc.ModelConfig(
        name=SCORE,
        backend="python",
        max_batch_size=max_batch_size,
        instance_group=cpu,
        input=[
            tensor(mc.ModelInput, "text_embeds", mc.TYPE_FP32, [embed_dim]),
            tensor(mc.ModelInput, "image_embeds", mc.TYPE_FP32, [embed_dim]),
        ],
        output=[tensor(mc.ModelOutput, "SCORE", mc.TYPE_FP32, [1])],
        parameters={"logit_scale": mc.ModelParameter(string_value=repr(logit_scale))},
    )
    return {PREPROCESS: preprocess, SCORE: score}
