"""TensorRT engines from an ONNX export, where a GPU and TensorRT are present.

    pickscore export tensorrt --model ONNX_DIR [--max-batch-size 32]

Builds (and caches in ONNX_DIR/trt_cache) the engines through ONNX Runtime's TensorRT execution provider,
with optimisation profiles from 1 to max_batch_size, then verifies them against the fp32 graphs' CPU run.
"""

from __future__ import annotations

from pathlib import Path

from pickscore.errors import ModelLoadError


def missing() -> str | None:
    """What this machine lacks for TensorRT, or None."""
    import onnxruntime as ort

    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return (
            "this onnxruntime has no TensorrtExecutionProvider (install onnxruntime-gpu and TensorRT; available: "
            f"{', '.join(ort.get_available_providers())})"
        )
    return None


def build_engines(onnx_dir: str | Path, max_batch_size: int = 32) -> dict:
    """Build and verify; ModelLoadError saying what is missing where TensorRT cannot run."""
    from pickscore.backends.manifest import is_export
    from pickscore.backends.onnx_backend import OnnxBackend
    from pickscore.exporter.verify import rank_agreement, verification_inputs

    if (why := missing()) is not None:
        raise ModelLoadError(f"cannot build TensorRT engines here: {why}")
    if not is_export(onnx_dir):
        raise ModelLoadError(f"{onnx_dir} is not an ONNX export; run `pickscore export onnx` first")
    trt = OnnxBackend(onnx_dir, max_batch_size=max_batch_size, providers=["TensorrtExecutionProvider"])
    cpu = OnnxBackend(onnx_dir, providers=["CPUExecutionProvider"])
    pixels, tokens = verification_inputs(cpu.preprocess, cpu.tokenizer, 64)  # against the graphs' own CPU run
    return {"providers": trt.description, "rank_agreement": rank_agreement(trt, cpu, pixels, tokens)}
