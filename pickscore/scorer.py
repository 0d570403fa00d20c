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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from pickscore.backends import DEFAULT_NAME, Backend, load_backend, model_identity
from pickscore.errors import InvalidInput, describe_item
from pickscore.model import scoring
from pickscore.model.preprocess import DEFAULT_MAX_PIXELS, ImageInput, load_uint8
from pickscore.model.scoring import Ranking
from pickscore.resources import usable_cores


class Scorer:
    """A loaded PickScore-style model behind a backend (torch or onnxruntime)."""

    def __init__(
        self,
        backend: Backend,
        batch_size: int = 16,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        workers: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.preprocess_config = backend.preprocess
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.decode_pool = ThreadPoolExecutor(max_workers=workers or usable_cores(), thread_name_prefix="decode")

    @classmethod
    def from_pretrained(
        cls, ref: str | os.PathLike, device: str = "auto", dtype: str = "auto", backend: str = "auto", **kwargs
    ) -> Scorer:
        """Resolve a model reference (see ``pickscore.model.checkpoint.resolve``) and load it."""
        return cls(load_backend(str(ref), backend, device, dtype), **kwargs)

    @property
    def logit_scale(self) -> float:
        """The learned temperature of a dual-encoder kind (scores are multiplied by its exp)."""
        return self.backend.logit_scale

    @property
    def embed_dim(self) -> int:
        return self.backend.embed_dim

    @property
    def identity(self) -> str:
        """What this model is (``model_identity``), as a server given the same weights at the same precision under
        ``--model REF`` reports it: ``pickscore:KIND:PRECISION:DIGEST16``."""
        return model_identity(DEFAULT_NAME, self.backend)

    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> the text tower's rows (N, D'): L2-normalised embeddings for CLIP-style kinds."""
        return self.backend.encode_text(self.tokenizer(list(prompts)))

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 crops (N, H, W, 3) or float32 pixels (N, 3, H, W) -> L2-normalised embeddings (N, D), in batches."""
        out = [
            self.backend.encode_image(pixels[start : start + self.batch_size])
            for start in range(0, len(pixels), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def load_image(self, index: int, item: ImageInput) -> np.ndarray:
        """One image -> its uint8 crop (H, W, 3); InvalidInput names the item."""
        try:
            return load_uint8(item, self.preprocess_config, self.max_pixels)
        except InvalidInput as e:
            raise InvalidInput(f"{describe_item(index, item)}: {e}") from e

    def load_all(self, items: Sequence[ImageInput], start: int = 0) -> list[np.ndarray | InvalidInput]:
        """Images decoded and cropped on every core -> each one's uint8 crop, or the InvalidInput naming it (as
        image ``start`` + its position)."""
        return list(self.decode_pool.map(self._load_or_error, range(start, start + len(items)), items))

    def encode_prompts(self, prompts: Sequence[str], chunk: int = 64) -> np.ndarray:
        """One embedding per prompt (N, D), each distinct prompt encoded once, ``chunk`` at a time."""
        distinct = list(dict.fromkeys(prompts))
        if not distinct:
            return np.zeros((0, self.embed_dim), np.float32)
        text = np.concatenate([self.encode_text(distinct[s : s + chunk]) for s in range(0, len(distinct), chunk)])
        position = {p: k for k, p in enumerate(distinct)}
        return text[[position[p] for p in prompts]]

    def paired_scores(self, text_embeds: np.ndarray, image_embeds: np.ndarray) -> np.ndarray:
        """Row i's prompt against row i's image -> (N,) scores, by the model's own rule (``Backend.scores``)."""
        return self.backend.scores(text_embeds, image_embeds)

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
                loaded = self.load_all(items, start)
                for offset, result in enumerate(loaded):
                    if isinstance(result, InvalidInput):
                        if not skip_invalid:
                            raise result
                        errors[start + offset] = result
                ok = [i for i, r in enumerate(loaded) if not isinstance(r, InvalidInput)]
                if ok:
                    pixels = np.stack([loaded[i] for i in ok])  # (n, H, W, 3) uint8
                    out[[start + i for i in ok]] = self.backend.scores(text[None], self.encode_pixels(pixels))
                bar.update(len(items))
        return out, errors

    def score(self, prompt: str, images: Sequence[ImageInput]) -> list[float]:
        """PickScore of each image for the prompt, in input order."""
        return self.score_all(prompt, images)[0].tolist()

    def rank(self, prompt: str, images: Sequence[ImageInput], top_k: int | None = None) -> Ranking:
        """Best first order (top_k long if given), scores and softmax probabilities over all candidates."""
        scoring.check_top_k(top_k)
        return scoring.rank_scores(self.score_all(prompt, images)[0], top_k)

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False)
