"""Checkpoint -> ONNX: the two towers as separate graphs with a symbolic batch axis, verified by ONNX Runtime.

    pickscore export onnx --model REF --out DIR [--precision fp32|fp16|int8]

DIR holds ``image.onnx`` (pixel_values [B, 3, H, W] float32 -> image_embeds [B, D]), ``text.onnx`` (input_ids
[B, 77] int64 -> text_embeds [B, D]), ``pickscore_onnx.json`` (the model's kind, the logit_scale its scores use,
precision, what it was verified to), ``preprocessor_config.json`` and the tokenizer files, so DIR is itself a
model reference (``--model DIR``) for the CLI, the scorer and the server.

The towers compute what the model's kind says (``LoadedModel``): PickScore, any CLIP and HPS v2 give L2-normalised
embeddings, the LAION aesthetic predictor its score (D = 1) from the image tower and 1 from the text tower; a score
is exp(logit_scale) * <text, image> with the kind's effective logit_scale (0 for HPS v2 and the aesthetic
predictor). A joint kind (ImageReward), whose score is a forward pass over each (prompt, image) pair, is refused:
its towers do not meet in a dot product, which this export and the Triton ensemble built on it assume.

Graphs come from the torch.export-based exporter (``torch.onnx.export(dynamo=True)``); the batch axis is
checked to be symbolic in the written files. fp16 converts the fp32 graphs to half precision behind float32
inputs and outputs; int8 is ONNX Runtime's dynamic quantisation of the fp32 graphs (weights int8).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pickscore.backends.manifest import FORMAT, PRECISIONS, write_manifest
from pickscore.exporter.verify import TOLERANCE, verify_export
from pickscore.model.checkpoint import LoadedModel, atomic_directory, resolve
from pickscore.model.preprocess import PreprocessConfig
from pickscore.model.tokenizer import save_hf_files


class _Tower(torch.nn.Module):
    """One tower of ``model`` as a graph: float32 (or int64) in, float32 out, L2-normalised when ``unit``."""

    def __init__(self, model: torch.nn.Module, tower: str, unit: bool):
        super().__init__()
        self.model = model
        self.tower = tower
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encode = self.model.encode_image if self.tower == "image" else self.model.encode_text
        out = encode(x).float()
        return F.normalize(out, dim=-1) if self.unit else out


def export_onnx(
    ref: str,
    out: str | os.PathLike,
    precision: str = "fp32",
    verify: bool = True,
    min_agreement: float = 0.99,
    tolerance: float = TOLERANCE,
    opset: int = 18,
) -> dict[str, Any]:
    """Export, verify (unless ``verify`` is False) and write DIR atomically -> the manifest written.

    fp32 must match torch within ``tolerance``; fp16 and int8 must agree with fp32 on the order of at least
    ``min_agreement`` of the image pairs of best-of-8 sets, else ValueError and nothing is written.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    loaded = resolve(ref)
    if loaded.joint:
        raise ValueError(
            f"{ref} is a {loaded.kind} model: its score is a joint forward pass over each (prompt, image) pair, "
            "and an ONNX export (and the Triton ensemble built on it) holds two towers whose outputs meet in a dot "
            "product; serve it with the torch backend (pickscore serve --model REF)"
        )
    model = loaded.model.float().eval()
    with atomic_directory(Path(out)) as tmp:
        fp32_dir = tmp / "fp32" if precision != "fp32" else tmp
        fp32_dir.mkdir(exist_ok=True)
        _export(model, loaded, fp32_dir, opset)
        if precision != "fp32":
            _lower_precision(fp32_dir, tmp, precision)
        manifest = {
            "format": FORMAT,
            "version": 1,
            "precision": precision,
            "source": loaded.source,
            "kind": loaded.kind,
            "logit_scale": loaded.logit_scale,  # the kind's effective one: 0 (a factor of 1) for HPS, aesthetic
            "embed_dim": loaded.embed_dim,
            "context_length": loaded.context_length,
            "model_cfg": loaded.model_cfg,
        }
        write_preprocess(tmp, loaded.preprocess)
        save_hf_files(tmp)
        if verify:
            manifest["verification"] = verify_export(tmp, loaded, manifest, tolerance, min_agreement)
        if precision != "fp32":
            shutil.rmtree(fp32_dir)
        write_manifest(tmp, manifest)
    return manifest


def _export(model, loaded: LoadedModel, out: Path, opset: int) -> None:
    h, w = loaded.preprocess.output_size
    towers = {
        "image": (
            _Tower(model, "image", loaded.unit_features).eval(),
            torch.zeros(2, 3, h, w),
            "pixel_values",
            "image_embeds",
        ),
        "text": (
            _Tower(model, "text", loaded.unit_features).eval(),
            torch.zeros(2, loaded.context_length, dtype=torch.long),
            "input_ids",
            "text_embeds",
        ),
    }
    batch = torch.export.Dim("batch", min=1, max=4096)
    for name, (tower, example, input_name, output_name) in towers.items():
        path = out / f"{name}.onnx"
        _write_graph(tower, example, path, input_name, output_name, batch, opset)
        check_symbolic_batch(path)


def _write_graph(tower, example: torch.Tensor, path: Path, input_name: str, output_name: str, batch, opset: int):
    """One graph file from a tower, its batch axis symbolic."""
    torch.onnx.export(
        tower,
        (example,),
        str(path),
        dynamo=True,
        opset_version=opset,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_shapes=({0: batch},),
        external_data=False,
        verbose=False,
    )


def write_preprocess(directory: Path, preprocess: PreprocessConfig) -> None:
    """DIR/preprocessor_config.json, which the onnxruntime backend and the Triton preprocessing step read back;
    ValueError when reading it back would not give ``preprocess`` (scores would silently differ)."""
    written = preprocess.to_hf()
    if PreprocessConfig.from_hf(written) != preprocess:
        raise ValueError(
            f"preprocessor_config.json cannot carry this model's preprocessing: {preprocess} is read back as "
            f"{PreprocessConfig.from_hf(written)}; not written"
        )
    (directory / "preprocessor_config.json").write_text(json.dumps(written, indent=2) + "\n")


def fixed_batch_axes(path: Path) -> list[str]:
    """The graph inputs and outputs of ``path`` whose first axis is a constant, each as 'name (size)'."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [(value.name, value.type.tensor_type.shape.dim[0]) for value in [*graph.input, *graph.output]]
    return [f"{name!r} ({first.dim_value})" for name, first in dims if not first.dim_param]


def check_symbolic_batch(path: Path) -> None:
    """Raise ValueError unless the first axis of every graph input and output is symbolic."""
    if fixed := fixed_batch_axes(path):
        raise ValueError(f"{path.name}: the exporter fixed the batch axis of {', '.join(fixed)}")


def _lower_precision(fp32_dir: Path, out: Path, precision: str) -> None:
    """fp16: weights and compute in half precision behind float32 inputs/outputs; int8: dynamic quantisation."""
    import onnx

    for name in ("image", "text"):
        src, dst = fp32_dir / f"{name}.onnx", out / f"{name}.onnx"
        if precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        else:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
