"""In-process scoring: ``Scorer.score(prompt, images)`` and ``Scorer.rank(prompt, images)``.

    scorer = Scorer.from_pretrained("path/to/PickScore_v1")
    ranking = scorer.rank("a cat in a hat", ["a.png", "b.jpg"])
    ranking.order, ranking.scores, ranking.probabilities

The prompt is encoded once per call; images are decoded on a thread pool (PIL releases
the GIL) and encoded in batches of ``batch_size``.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pickscore.errors import InvalidInput
from pickscore.model import scoring
from pickscore.model.checkpoint import LoadedModel, resolve
from pickscore.model.preprocess import DEFAULT_MAX_PIXELS, ImageInput, load_pixels

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """'auto' picks CUDA when present; dtype 'auto' is bf16 on CUDA and fp32 on CPU."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return dev, DTYPES[dtype]


def describe(index: int, item: ImageInput) -> str:
    """How errors name an item: ``image 3`` or ``image 3 (photos/cat.png)``."""
    return f"image {index} ({item})" if isinstance(item, (str, os.PathLike)) else f"image {index}"


@dataclass(frozen=True)
class Ranking:
    """Result of ``Scorer.rank``. ``scores``/``probabilities`` are in input order; ``order`` is best first."""

    order: list[int]
    scores: list[float]
    probabilities: list[float]


class Scorer:
    """A loaded PickScore-style model on one device.

    Takes ownership of ``loaded.model``: it is moved to ``device`` and cast to ``dtype`` in place.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        workers: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.loaded = loaded
        self.device = torch.device(device)
        self.dtype = dtype
        self._logit_scale = float(loaded.model.logit_scale.detach().float())  # fp32, before any cast
        self.model = loaded.model.to(self.device, dtype).eval()
        self.tokenizer = loaded.tokenizer()
        self.preprocess_config = loaded.preprocess
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="decode")

    @classmethod
    def from_pretrained(cls, ref: str | os.PathLike, device: str = "auto", dtype: str = "auto", **kwargs) -> "Scorer":
        """Resolve a model reference (see ``pickscore.model.checkpoint.resolve``) and load it."""
        dev, dt = resolve_device(device, dtype)
        return cls(resolve(ref), device=dev, dtype=dt, **kwargs)

    @property
    def logit_scale(self) -> float:
        """The learned temperature (scores are multiplied by its exp)."""
        return self._logit_scale

    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> L2-normalised float32 embeddings (N, D)."""
        tokens = torch.from_numpy(self.tokenizer(list(prompts))).to(self.device)  # (N, 77)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed pixels (N, 3, H, W) -> L2-normalised float32 embeddings (N, D), in batches."""
        out = []
        for start in range(0, len(pixels), self.batch_size):
            batch = torch.from_numpy(pixels[start : start + self.batch_size]).to(self.device, self.dtype)
            out.append(F.normalize(self.model.encode_image(batch).float(), dim=-1).cpu())  # sync point
        return torch.cat(out).numpy() if out else np.zeros((0, self.embed_dim), np.float32)

    @property
    def embed_dim(self) -> int:
        return int(self.loaded.model_cfg["embed_dim"])

    def load_image(self, index: int, item: ImageInput) -> np.ndarray:
        """One image -> pixels (3, H, W); InvalidInput names the item."""
        try:
            return load_pixels(item, self.preprocess_config, self.max_pixels)
        except InvalidInput as e:
            raise InvalidInput(f"{describe(index, item)}: {e}") from e

    def _load_or_error(self, index: int, item: ImageInput) -> np.ndarray | InvalidInput:
        try:
            return self.load_image(index, item)
        except InvalidInput as e:
            return e

    def score_all(
        self, prompt: str, images: Sequence[ImageInput], skip_invalid: bool = False, progress: bool = False
    ) -> tuple[np.ndarray, dict[int, InvalidInput]]:
        """Scores (N,) in input order and the errors by index (NaN scores there when ``skip_invalid``).

        Works through the images in chunks, so memory stays bounded however many there are;
        without ``skip_invalid`` the first bad image raises InvalidInput naming it.
        """
        if not images:
            raise InvalidInput("no images given")
        text = self.encode_text([prompt])[0]  # (D,), once per call
        out = np.full(len(images), np.nan, dtype=np.float32)
        errors: dict[int, InvalidInput] = {}
        chunk = max(4 * self.batch_size, 64)
        with tqdm(total=len(images), unit="img", disable=not progress or None, file=sys.stderr) as bar:
            for start in range(0, len(images), chunk):
                items = images[start : start + chunk]
                loaded = list(self.pool.map(self._load_or_error, range(start, start + len(items)), items))
                for offset, result in enumerate(loaded):
                    if isinstance(result, InvalidInput):
                        if not skip_invalid:
                            raise result
                        errors[start + offset] = result
                ok = [i for i, r in enumerate(loaded) if not isinstance(r, InvalidInput)]
                if ok:
                    pixels = np.stack([loaded[i] for i in ok])  # (n, 3, H, W)
                    out[[start + i for i in ok]] = scoring.scores(text, self.encode_pixels(pixels), self.logit_scale)
                bar.update(len(items))
        return out, errors

    def score(self, prompt: str, images: Sequence[ImageInput]) -> list[float]:
        """PickScore of each image for the prompt, in input order."""
        return self.score_all(prompt, images)[0].tolist()

    def rank(self, prompt: str, images: Sequence[ImageInput], top_k: int | None = None) -> Ranking:
        """Best first order (top_k long if given), scores and softmax probabilities over all candidates."""
        return rank_scores(self.score_all(prompt, images)[0], top_k)

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def rank_scores(scores: np.ndarray, top_k: int | None = None) -> Ranking:
    """A Ranking from scores in input order."""
    if top_k is not None and top_k < 1:
        raise InvalidInput(f"top_k must be at least 1, got {top_k}")
    return Ranking(
        order=scoring.order(scores, top_k).tolist(),
        scores=scores.tolist(),
        probabilities=scoring.softmax(scores).tolist(),
    )

