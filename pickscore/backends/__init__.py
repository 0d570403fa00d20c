"""Inference backends behind one small interface; nothing above this layer knows which one runs.

    backend = load_backend("demo", kind="torch", device="auto", dtype="auto")
    backend.encode_image(crops)    # (B, H, W, 3) uint8 crops, or (B, 3, H, W) float32 pixels -> (B, D) float32
    backend.encode_text(tokens)    # (B, L) int64 -> (B, D') float32
    backend.scores(text, images)   # paired rows (or one text row for all images) -> (N,) float32

What the towers return and how two rows make a score is the model's kind (``kind``; README, "Supported
scorers"): PickScore and any CLIP, HPS v2 -- L2-normalised embeddings, exp(logit_scale) times their dot product;
the LAION aesthetic predictor -- its score from the image tower, a constant 1 from the text tower; ImageReward --
``joint``: the image tower's tokens and the prompt's ids meet in a forward pass of their own (``scores`` runs it,
so callers put it on a compute thread, as the server's pair batcher does).

Each backend also carries what the model needs around it: ``preprocess`` (a PreprocessConfig),
``tokenizer``, ``logit_scale`` (fp32), ``embed_dim``, ``source`` and a human ``description``; and what tells two
loads apart: ``precision`` and ``weights_digest`` (SHA-256 of the weights as loaded, computed once), which
``model_identity`` composes with a name and the kind into the one string a fleet compares (docs/DESIGN.md,
"Model identity").
Backends are called from one thread per tower (the batcher's executor), never concurrently per tower.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Protocol

import numpy as np

from pickscore.backends.manifest import is_export

if TYPE_CHECKING:  # preprocessing loads Pillow, the tokenizer regex: parsers and clients need neither
    from pickscore.model.preprocess import PreprocessConfig
    from pickscore.model.tokenizer import Tokenizer

KINDS = ("auto", "torch", "onnxruntime")
DTYPES = ("auto", "fp32", "fp16", "bf16")  # the torch backend's compute precision; auto: bf16 on CUDA, fp32 on CPU
DEFAULT_NAME = "pickscore"  # the name one model is known by: a single ``serve --model REF``'s, and in process


class Backend(Protocol):
    name: str  # "torch" or "onnxruntime"
    kind: str  # what the model is: "clip" (PickScore and any CLIP), "hps", "aesthetic", "image_reward"
    joint: bool  # scores(text, images) is a forward pass (ImageReward), not a dot product of the towers' outputs
    source: str  # where the model came from
    description: str  # device and precision, e.g. "cpu fp32"
    precision: str  # the compute precision as the user names it: "fp32", "bf16", "fp16", "int8"
    weights_digest: str  # lowercase hex SHA-256 of the weights as loaded, computed once at load
    accelerated: bool  # a GPU computes (the host only launches kernels); False: the forward pass uses the CPU cores
    pipeline_depth: int  # batches of one tower it runs at once: 2 where a copy overlaps the other's compute, else 1
    preprocess: PreprocessConfig
    tokenizer: Tokenizer
    logit_scale: float
    embed_dim: int
    weights_bytes: int  # bytes the model's weights take where they are loaded (reported per model version)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray: ...

    def encode_text(self, tokens: np.ndarray) -> np.ndarray: ...

    def scores(self, text: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Row i of ``text`` with row i of ``images`` (one text row: with every image) -> (N,) float32 scores."""
        ...

    def warm(self, max_batch_size: int, text_max_batch_size: int) -> None:
        """Do whatever the first batches of each size would do slowly (compilation), before serving."""


def batches_at_once(backend: Backend) -> int:
    """Forward passes of one tower to run at once: the backend's ``pipeline_depth`` where an accelerator computes,
    one on a CPU (each pass already uses every core)."""
    return backend.pipeline_depth if backend.accelerated else 1


def model_identity(name: str, backend: Backend) -> str:
    """What a served (or in-process) model is, as one string that changes when its weights or precision do:
    ``NAME:KIND:PRECISION:DIGEST16``, e.g. ``pickscore:clip:fp32:3f2a9c0d1e2b4a5c``. The one place it is composed."""
    return f"{name}:{backend.kind}:{backend.precision}:{backend.weights_digest[:16]}"


def load_backend(
    ref: str,
    kind: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int = 32,
    threads: int = 0,
    compile: bool = False,
) -> Backend:
    """Resolve a model reference and load it on ``kind`` ("auto": onnxruntime for an ONNX export, else torch).

    ``threads``: intra-op threads of a forward pass; 0 sizes them from ``usable_cores()`` (every usable core on
    a CPU, one when a GPU computes), so a container's CPU quota is respected rather than the host's core count.
    """
    if kind not in KINDS:
        raise ValueError(f"backend must be one of {', '.join(KINDS)}; got {kind!r}")
    if is_export(ref):
        if kind == "torch":
            raise ValueError(f"{ref} is an ONNX export; load it with --backend onnxruntime (or auto)")
        if compile:
            raise ValueError(
                f"{ref} is an ONNX export: --compile is for the torch backend (ONNX Runtime optimises "
                "its graphs itself)"
            )
        from pickscore.backends.onnx_backend import OnnxBackend

        return OnnxBackend(ref, max_batch_size=max_batch_size, threads=threads)
    if kind == "onnxruntime":
        raise ValueError(
            f"the onnxruntime backend runs an ONNX export (pickscore export onnx --model {ref} --out DIR); "
            f"{ref!r} is not one"
        )
    from pickscore.backends.torch_backend import TorchBackend

    return TorchBackend.from_ref(ref, device=device, dtype=dtype, threads=threads, compile=compile)


def backend_options(args: argparse.Namespace) -> dict[str, str]:
    """The keyword arguments (backend, device, dtype) the flags of ``add_backend_flags`` set."""
    return {"backend": args.backend, "device": args.device, "dtype": args.dtype}


def add_backend_flags(parser: argparse.ArgumentParser, dtype_default: str = "auto") -> None:
    """--backend, --device and --dtype, for the commands that load a model in-process."""
    parser.add_argument(
        "--backend",
        default="auto",
        choices=KINDS,
        help="auto (default): onnxruntime for an ONNX export, torch otherwise",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ... (default auto)",
    )
    parser.add_argument(
        "--dtype",
        default=dtype_default,
        choices=DTYPES,
        help=f"torch compute precision; auto is bf16 on CUDA and fp32 on CPU (default {dtype_default}; bf16 is "
        "faster on CPUs with AMX-BF16 or AVX512-BF16: README, 'Which path on which CPU'; "
        "an ONNX export runs at the precision it was exported in)",
    )
