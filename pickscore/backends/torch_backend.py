"""The PyTorch backend: any kind's model (``model.clip``, ``model.kinds``) on CPU or CUDA (fp32, fp16 or bf16), eager
or compiled.

Images arrive as uint8 crops (B, H, W, 3), a quarter of the bytes of float32 pixels: they are copied to the
device (from pinned memory, asynchronously, on CUDA) and rescaled and normalised there (``DeviceNormalizer``),
bit for bit the CPU path's values. Float32 pixels (B, 3, H, W), already preprocessed (KServe's
``pickscore_image``), are taken as they are.

Prompts run over their own length, not the context's: token ids (B, 77) are cut after the batch's last
non-padding column (a ten-token prompt costs a seventh of the full context). The text transformer is causal
and pools at the end-of-text token, so the positions cut never reach the pooled features: the embedding is
the full-length one to float rounding. Compiled towers keep the full length (one shape per batch bucket).

On a CPU in fp32, a model the backend loads itself (``from_ref``) runs its transformer blocks' projections on
oneDNN with weights packed once at load (``pack_for_cpu``) instead of torch's default GEMM (MKL): the same
fp32 arithmetic in another summation order (embeddings within 1e-5 of the unpacked model's), 1.14-1.27× the
image tower's speed on a 2-core AMD EPYC, where MKL's fp32 GEMMs run well below the cores' peak.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pickscore.backends.digest import sha256_of
from pickscore.backends.dual import DualEncoder
from pickscore.model.checkpoint import LoadedModel, resolve
from pickscore.model.clip import ResidualAttentionBlock
from pickscore.model.preprocess import PreprocessConfig, exact_divisor, normalize_constants, normalize_table
from pickscore.resources import compute_threads

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """'auto' picks CUDA when present; dtype 'auto' is bf16 on CUDA and fp32 on CPU. ValueError, saying what to
    pass instead, for a device that is not a torch device or that this machine does not have."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = _named_device(device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(TORCH_DTYPES)}; got {dtype!r}")
    return dev, TORCH_DTYPES[dtype]


def _named_device(device: str) -> torch.device:
    """A device given by name, checked to exist here (torch would fail at the first tensor moved, deep inside)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no GPU or NVIDIA driver found"
        raise ValueError(
            f"device {device!r}: CUDA is not available on this machine ({why}); set --device (or "
            "PICKSCORE_DEVICE) to cpu, or to auto: CUDA when present, else CPU"
        )
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return dev


def bucket(n: int) -> int:
    """The batch size a batch of ``n`` is padded to when compiled: the next power of two, so a server compiles
    (and on CUDA captures as graphs) at most log2(max batch) shapes per tower instead of one per size."""
    return 1 << max(0, n - 1).bit_length()


class DeviceNormalizer:
    """uint8 crops (B, H, W, 3) on ``device`` -> float32 pixels (B, 3, H, W) there, bit for bit the values of
    ``preprocess.normalize``: x / divisor - mean, over std, in float32 where ``exact_divisor`` proved that exact
    (CLIP's configs), else one table lookup per channel."""

    def __init__(self, cfg: PreprocessConfig, device: torch.device | str = "cpu"):
        self.divisor = exact_divisor(cfg)
        if self.divisor is not None:  # a tensor on the device: CUDA turns a division by a Python number into a
            # multiplication by its reciprocal, which differs from the CPU's division in the last bit
            self.divisor = torch.tensor(self.divisor, dtype=torch.float32, device=device).view(1, 1, 1, 1)
        mean, std = normalize_constants(cfg)
        self.mean = torch.from_numpy(mean).view(1, 3, 1, 1).to(device)
        self.std = torch.from_numpy(std).view(1, 3, 1, 1).to(device)
        self.table = torch.from_numpy(normalize_table(cfg).copy()).to(device)  # (3, 256)

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        if self.divisor is None:
            return torch.stack([self.table[c][crops[..., c].long()] for c in range(3)], dim=1)
        b, h, w, _ = crops.shape
        x = torch.empty((b, 3, h, w), dtype=torch.float32, device=crops.device)
        x.copy_(crops.permute(0, 3, 1, 2))  # uint8 -> float32 into channels-first memory, exact
        return x.div_(self.divisor).sub_(self.mean).div_(self.std)


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` for inference on a CPU, its weight packed once into oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class PackedAttention(torch.nn.Module):
    """The inference forward of a ``batch_first`` ``nn.MultiheadAttention`` (self-attention, additive float
    mask or none, no attention weights) with its two projections packed (``PackedLinear``)."""

    def __init__(self, attn: torch.nn.MultiheadAttention):
        super().__init__()
        self.heads = attn.num_heads
        self.in_proj = PackedLinear(attn.in_proj_weight, attn.in_proj_bias)
        self.out_proj = PackedLinear(attn.out_proj.weight, attn.out_proj.bias)

    def forward(self, q, k, v, need_weights=False, attn_mask=None):
        b, n, d = q.shape
        qkv = self.in_proj(q).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d)), None


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``pack_for_cpu`` applies: fp32 on a CPU, with torch built with oneDNN."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._reorder_linear_weight) and bool(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


def pack_for_cpu(model: torch.nn.Module) -> int:
    """Replace, in place, every residual block's attention and MLP projections with oneDNN-packed ones (for
    inference only: the packed weights are not parameters) -> the blocks packed."""
    blocks = [m for m in model.modules() if isinstance(m, ResidualAttentionBlock)]
    for block in blocks:
        if isinstance(block.attn, torch.nn.MultiheadAttention) and block.attn.batch_first:
            block.attn = PackedAttention(block.attn)
        for name in ("c_fc", "c_proj"):
            linear = getattr(block.mlp, name)
            setattr(block.mlp, name, PackedLinear(linear.weight, linear.bias))
    return len(blocks)


def state_chunks(state: dict[str, torch.Tensor]) -> Iterator[bytes | memoryview]:
    """A state dict as bytes to hash, tensor by tensor in sorted name order: each one's name, dtype and shape, then
    its raw bytes (from the host: a GPU tensor is copied over alone, so at most one tensor is ever duplicated)."""
    for name in sorted(state):
        tensor = state[name].detach()
        yield f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0".encode()
        host = tensor.cpu().contiguous().reshape(-1)
        yield memoryview(host.view(torch.uint8).numpy())


class TorchBackend(DualEncoder):
    """Takes ownership of ``loaded.model``: it is moved to ``device`` and cast to ``dtype`` in place.

    ``compile``: the towers go through ``torch.compile`` (inductor; on CUDA with CUDA graphs, mode
    "reduce-overhead"), batches padded to ``bucket`` sizes. The first batch of each size compiles (seconds;
    ``warm`` does it up front); the results equal eager ones to float rounding.
    """

    name = "torch"

    def __init__(
        self,
        loaded: LoadedModel,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
    ):
        self.loaded = loaded
        self.device = torch.device(device)
        self.dtype = dtype
        self.logit_scale = loaded.logit_scale  # fp32, before any cast
        self.model = loaded.model.to(self.device, dtype).eval()
        self.tokenizer = loaded.tokenizer()
        self.preprocess = loaded.preprocess
        self.source = loaded.source
        self.embed_dim = loaded.embed_dim
        self.kind = loaded.kind
        self.joint = loaded.joint
        self._unit = loaded.unit_features
        self.precision = DTYPE_NAMES[dtype]
        self.description = f"{self.device} {self.precision}"
        self.weights_bytes = sum(t.nbytes for t in (*self.model.parameters(), *self.model.buffers()))
        self.weights_digest = sha256_of(state_chunks(self.model.state_dict()))  # as cast, before any CPU packing
        self.accelerated = self.device.type != "cpu"
        # On CUDA two batches of a tower run at once, each calling thread on its own stream, so one batch's
        # host-to-device copy overlaps the other's compute. Compiled towers (CUDA graphs) keep to one.
        self.pipeline_depth = 2 if self.device.type == "cuda" and not compile else 1
        self._streams = threading.local()
        self._normalize = DeviceNormalizer(self.preprocess, self.device)
        self._pin = self.device.type == "cuda"
        self.compiled = compile
        # Causal attention pooled at the end-of-text token: positions past the last real token change nothing,
        # so prompts run over their own length (``CLIP.encode_text`` takes any length up to the context).
        # Compiled towers keep the whole context: one shape per batch bucket, not one per prompt length too.
        self._image_tower = self.model.encode_image
        self._text_tower = self.model.encode_text
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs per bucket shape
            self._image_tower = torch.compile(self.model.encode_image, mode=mode, dynamic=False)
            self._text_tower = torch.compile(self.model.encode_text, mode=mode, dynamic=False)
            self.description += " compiled"

    @classmethod
    def from_ref(
        cls, ref: str, device: str = "auto", dtype: str = "auto", threads: int = 0, compile: bool = False
    ) -> TorchBackend:
        """Load a model reference; ``threads`` (0: every usable core on CPU, 1 on CUDA) sets torch's intra-op
        threads for the process: torch has one pool, whoever sets it last wins."""
        dev, dt = resolve_device(device, dtype)
        torch.set_num_threads(compute_threads(threads, accelerated=dev.type == "cuda"))
        backend = cls(resolve(ref), device=dev, dtype=dt, compile=compile)
        if not compile and can_pack(dev, dt):  # a model of its own: nobody else trains or exports it
            with torch.no_grad():
                pack_for_cpu(backend.model)
        return backend

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 crops (B, H, W, 3) or preprocessed float32 pixels (B, 3, H, W) -> (B, D) float32."""
        with self._stream():
            x = self._to_device(pixels)
            if x.dtype == torch.uint8:
                x = self._normalize(x)
            return self._run(self._image_tower, x.to(self.dtype))

    def _stream(self) -> contextlib.AbstractContextManager:
        """The calling thread's own CUDA stream (made on its first batch); nothing to switch on a CPU."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if not hasattr(self._streams, "stream"):
            self._streams.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._streams.stream)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self._pin:  # page-locked memory lets the copy run asynchronously, overlapping the host's next work
            host = host.pin_memory()
        return host.to(self.device, non_blocking=self._pin)

    @torch.inference_mode()
    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids (B, 77) int64 -> (B, D) float32."""
        # Compiled towers keep the whole context (see __init__); a joint kind's text rows are its ids, which meet
        # the image in ``scores``, whole.
        if not self.compiled and not self.joint:
            used = np.flatnonzero((tokens != self.tokenizer.pad_id).any(axis=0))
            tokens = tokens[:, : int(used[-1]) + 1 if len(used) else 1]
        with self._stream():
            return self._run(self._text_tower, self._to_device(tokens))

    def warm(self, max_batch_size: int, text_max_batch_size: int) -> None:
        """Compile every bucket up to the batcher's largest batches now, not on the first requests."""
        if not self.compiled:
            return
        h, w = self.preprocess.output_size
        for n in sorted({bucket(k) for k in range(1, max_batch_size + 1)}):
            self.encode_image(np.zeros((n, h, w, 3), np.uint8))
        for n in sorted({bucket(k) for k in range(1, text_max_batch_size + 1)}):
            self.encode_text(np.zeros((n, self.tokenizer.context_length), np.int64))

    @torch.inference_mode()
    def scores(self, text: np.ndarray, images: np.ndarray) -> np.ndarray:
        """A dot product (``DualEncoder``), or for a joint kind the model's forward pass over the pairs."""
        if not self.joint:
            return super().scores(text, images)
        with self._stream():  # the prompt's row, expanded on the device (a view, as numpy's broadcast is read-only)
            text_rows = self._to_device(text).expand(len(images), -1)
            out = self.model.score_pairs(text_rows, self._to_device(images).to(self.dtype))
        return out.float().cpu().numpy()

    def _run(self, tower, batch: torch.Tensor) -> np.ndarray:
        n = len(batch)
        if self.compiled and bucket(n) != n:  # pad to the compiled shape; the padding rows are dropped below
            batch = torch.cat([batch, batch.new_zeros((bucket(n) - n, *batch.shape[1:]))])
        out = tower(batch)[:n].float()
        return (F.normalize(out, dim=-1) if self._unit else out).cpu().numpy()  # (B, D); sync point
