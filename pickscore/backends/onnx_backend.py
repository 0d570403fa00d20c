"""The ONNX Runtime backend: serves a directory written by ``pickscore export onnx``.

Providers: TensorRT and CUDA when this onnxruntime build has them (TensorRT with an engine cache in
DIR/trt_cache and optimisation-profile shapes from the batch settings), CPU otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pickscore.backends.digest import sha256_of
from pickscore.backends.dual import DualEncoder
from pickscore.backends.manifest import load_manifest
from pickscore.model.preprocess import PreprocessConfig, normalize
from pickscore.model.tokenizer import Tokenizer
from pickscore.resources import compute_threads


class OnnxBackend(DualEncoder):
    name = "onnxruntime"
    pipeline_depth = 1  # one run at a time per session

    def __init__(
        self,
        directory: str | os.PathLike,
        manifest: dict[str, Any] | None = None,
        max_batch_size: int = 32,
        providers: list[str] | None = None,
        threads: int = 0,
    ):
        import onnxruntime as ort

        directory = Path(directory)
        manifest = manifest or load_manifest(directory)
        # Named by the reference it was loaded by, as a checkpoint directory is, not by the checkpoint it was
        # exported from (the manifest's "source"): an fp32 and an int8 export of one model must be told apart.
        self.source = str(directory)
        self.precision = manifest.get("precision", "fp32")
        self.logit_scale, self.kind = float(manifest["logit_scale"]), manifest.get("kind", "clip")
        self.embed_dim = int(manifest["embed_dim"])
        self.tokenizer = Tokenizer(context_length=int(manifest["context_length"]))
        self.preprocess = PreprocessConfig.from_hf(json.loads((directory / "preprocessor_config.json").read_text()))
        available = ort.get_available_providers()
        chosen = providers or [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        chosen = [*chosen, "CPUExecutionProvider"] if "CPUExecutionProvider" not in chosen else chosen
        h, w = self.preprocess.output_size
        shapes = {"image": ("pixel_values", f"3x{h}x{w}"), "text": ("input_ids", str(self.tokenizer.context_length))}
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = compute_threads(threads, accelerated=chosen[0] != "CPUExecutionProvider")
        # Idle compute threads sleep instead of spinning: the decode workers need those cores between passes
        # (measured on 2 cores, ViT-B-32 fp32 served: c=1 p50 514 -> 459 ms; benchmarks/RESULTS.md).
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.precision == "fp16" and chosen == ["CPUExecutionProvider"]:
            # onnxruntime 1.31's extended CPU fusions crash on fp16 CLIP graphs; the basic level runs them.
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self._sessions = {}
        for tower, (input_name, rest) in shapes.items():
            options = []
            for provider in chosen:
                if provider == "TensorrtExecutionProvider":
                    options.append(
                        (
                            provider,
                            {
                                "trt_engine_cache_enable": True,
                                "trt_engine_cache_path": str(directory / "trt_cache"),
                                "trt_fp16_enable": self.precision != "fp32",
                                "trt_profile_min_shapes": f"{input_name}:1x{rest}",
                                "trt_profile_opt_shapes": f"{input_name}:{max_batch_size}x{rest}",
                                "trt_profile_max_shapes": f"{input_name}:{max_batch_size}x{rest}",
                            },
                        )
                    )
                else:
                    options.append(provider)
            self._sessions[tower] = ort.InferenceSession(
                str(directory / f"{tower}.onnx"), session_options, providers=options
            )
        active = self._sessions["image"].get_providers()[0].removesuffix("ExecutionProvider")
        self.weights_bytes, self.weights_digest = _weights(directory)
        self.description = f"{active} {self.precision}"  # e.g. "CPU int8": the precision is reported with it
        self.accelerated = active != "CPU"

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 crops (B, H, W, 3) or preprocessed float32 pixels (B, 3, H, W) -> (B, D) float32."""
        if pixels.dtype == np.uint8:
            pixels = normalize(pixels, self.preprocess)
        return self._sessions["image"].run(None, {"pixel_values": np.ascontiguousarray(pixels, np.float32)})[0]

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        return self._sessions["text"].run(None, {"input_ids": np.ascontiguousarray(tokens, np.int64)})[0]

    def warm(self, max_batch_size: int, text_max_batch_size: int) -> None:
        """Nothing to do ahead: ONNX Runtime needs no per-shape compilation (the server still runs one batch)."""


def _weights(directory: Path) -> tuple[int, str]:
    """The graphs' files, external weights included (what the sessions hold): their bytes, and the SHA-256 of their
    contents one file after another in name order."""
    files = sorted((f for f in directory.iterdir() if f.suffix in (".onnx", ".data")), key=lambda f: f.name)
    return sum(f.stat().st_size for f in files), sha256_of(chunk for f in files for chunk in _read_chunks(f))


def _read_chunks(path: Path, size: int = 1 << 24) -> Iterator[bytes]:
    """A file's bytes, 16 MiB at a time."""
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk
