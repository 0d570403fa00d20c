"""The engine of one model version: validation, caches and the batchers behind every transport (image and text; a
joint kind's pair tower); the resources every model of a server shares (``Shared``: the decode pools, one per
preprocessing, the CPU's forward-pass thread and the tokenizer thread); and ``score_together``, one request scored
by several models with one decode per image.

    shared = Shared(settings)
    engine = Engine(backend, settings, metrics.for_model("pickscore"), shared)
    await engine.start()                                    # warm-up included when settings.warmup
    scores = await engine.score(["a cat"], [ImageItem(jpeg_bytes, "a")], deadline=None)   # (N,) float32
    ranking = await engine.rank("a cat", items, top_k=3, deadline=None)
    a, b = await score_together([engine_a, engine_b], ["a cat"], items, deadline=None)

The api (server/api.py) turns requests into these calls; it never touches the batchers or the backend itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from pickscore.backends import Backend, batches_at_once
from pickscore.errors import DeadlineExceeded, InvalidInput
from pickscore.model import scoring
from pickscore.model.scoring import Ranking
from pickscore.resources import lower_priority
from pickscore.server.batcher import Batcher
from pickscore.server.caches import EmbeddingCache
from pickscore.server.decode import DecodePool
from pickscore.server.metrics import ModelMetrics
from pickscore.server.settings import Settings

# Prompts up to this many characters in all are tokenised on the event loop (tens of microseconds for a prompt of
# a sentence); longer ones on the tokenizer thread.
INLINE_TOKENIZE_CHARS = 1000


@dataclass(frozen=True, eq=False)
class ImageItem:
    """One image of a request: encoded ``data`` or decoded ``pixels`` (H, W, C) uint8, and the caller's id."""

    data: bytes = b""
    id: str = ""
    pixels: np.ndarray | None = None

    def describe(self, index: int) -> str:
        return f"image {index} (id {self.id!r})" if self.id else f"image {index}"

    @property
    def content(self) -> bytes | np.ndarray:
        return self.data if self.pixels is None else self.pixels

    def digest(self) -> str:
        """Content hash: the image cache's key (pixels hash with their shape)."""
        if self.pixels is None:
            return hashlib.sha256(self.data).hexdigest()
        return hashlib.sha256(repr(self.pixels.shape).encode() + self.pixels.tobytes()).hexdigest()


class Shared:
    """What the engines of one server share. On a CPU each forward pass already uses every core
    (--compute-threads): every tower of every model takes turns on one thread rather than oversubscribe the cores.
    One decode pool per preprocessing (and device, with --decode-on-device), so models that crop alike decode an
    image once; one tokenizer thread (prompts are short and cached)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="towers", initializer=lower_priority, initargs=(10,))
        self.tokenizer = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.decoders: dict[tuple, DecodePool] = {}

    async def decoder(self, backend: Backend) -> DecodePool:
        """The started decode pool for ``backend``'s preprocessing."""
        s = self.settings
        device = str(backend.device) if s.decode_on_device else None
        key = (backend.preprocess, device)
        if key not in self.decoders:
            pool = DecodePool(
                backend.preprocess, s.max_pixels, s.max_aspect_ratio, s.workers, s.decode_processes, device
            )
            self.decoders[key] = pool
            await pool.start()
        return self.decoders[key]

    def close(self, hung: bool) -> None:
        """``hung``: a forward pass never returned; its thread is abandoned, not waited for."""
        self.compute.shutdown(wait=not hung)
        self.tokenizer.shutdown(wait=False, cancel_futures=True)
        for pool in self.decoders.values():
            pool.close()


class ScoreStats:
    """Running mean and variance of every score a model version gave, in float64: Rewards'
    ``normalize=running``."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0

    def add(self, scores: np.ndarray) -> None:
        """Merge a request's scores (Chan et al.'s pairwise update: the batch's own mean and squares, then one step)."""
        x = scores.astype(np.float64)
        if not len(x):
            return
        n, mean = len(x), float(x.mean())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self._m2 += float(((x - mean) ** 2).sum()) + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation (0 before two scores)."""
        return float(np.sqrt(self._m2 / self.count)) if self.count > 1 else 0.0


class Engine:
    """One model version's batchers and caches over ``shared``'s threads and decode pools. ``on_hung(reason)`` is
    called once when a tower's watchdog fires (the server then reports NOT_SERVING)."""

    def __init__(
        self,
        backend: Backend,
        settings: Settings,
        metrics: ModelMetrics,
        shared: Shared,
        on_hung: Callable[[str], None] | None = None,
    ):
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.shared = shared
        s = settings
        if s.decode_on_device and backend.name != "torch":
            raise ValueError(f"--decode-on-device needs the torch backend; this model runs on {backend.name}")
        # On a GPU each tower has its own threads launching kernels, as many as the backend runs batches at once
        # (2: one batch's copy overlaps the other's compute); on a CPU the one shared thread.
        limits = dict(
            max_wait_s=s.queue_wait_limit(),  # None: auto, from each tower's batch size and depth
            timeout_s=s.batch_timeout_s,
            on_hung=on_hung,
            max_gather_s=s.max_gather_ms / 1000,
            executor=None if backend.accelerated else shared.compute,
            depth=batches_at_once(backend),
        )
        delay = s.max_queue_delay_ms / 1000
        self.image_batcher = Batcher(
            "image", backend.encode_image, s.max_batch_size, delay, s.max_queue_size, metrics, **limits
        )
        self.text_batcher = Batcher(
            "text", backend.encode_text, s.text_max_batch_size, delay, s.max_queue_size, metrics, **limits
        )
        # A joint kind (ImageReward) scores each (prompt, image) pair in a forward pass of its own: a third tower,
        # batched like the others, over rows that join the text tower's and the image tower's outputs.
        self.pair_batcher = (
            Batcher("pair", self._pair_scores, s.max_batch_size, delay, s.max_queue_size, metrics, **limits)
            if backend.joint
            else None
        )
        self.text_cache = EmbeddingCache("text", settings.text_cache_bytes, metrics)
        self.image_cache = EmbeddingCache("image", settings.image_cache_bytes, metrics)
        self.decoder: DecodePool | None = None  # shared's pool for this preprocessing, from start()
        self.stats = ScoreStats()

    async def start(self) -> None:
        self.decoder = await self.shared.decoder(self.backend)
        for batcher in self.batchers:
            await batcher.start()
        if self.settings.warmup:
            await self.warmup()

    async def warmup(self) -> None:
        """Every batch size a backend compiles, then one batch through each tower through the batchers (first
        calls allocate and pick kernels), bypassing the caches."""
        s = self.settings
        await asyncio.get_running_loop().run_in_executor(
            None, self.backend.warm, s.max_batch_size, s.text_max_batch_size
        )
        size = self.backend.preprocess.output_size
        pixels = np.zeros((*size, 3), np.uint8)
        tokens = self.backend.tokenizer(["warm-up"])
        with self.image_batcher.admit(1), self.text_batcher.admit(1):
            image, text = await asyncio.gather(
                self.image_batcher.submit(pixels[None]), self.text_batcher.submit(tokens)
            )
        if self.pair_batcher is not None:
            with self.pair_batcher.admit(1):
                await self.pair_batcher.submit(np.concatenate([text, image], axis=1))

    @property
    def batchers(self) -> list[Batcher]:
        return [b for b in (self.image_batcher, self.text_batcher, self.pair_batcher) if b is not None]

    @property
    def hung(self) -> bool:
        return any(b.hung for b in self.batchers)

    async def stop(self) -> None:
        """Fail what is queued (Unavailable) and stop the towers; the shared pools stay (``Shared.close``)."""
        for batcher in self.batchers:
            await batcher.stop()

    async def release(self) -> None:
        """Stop, then drop the backend (a stopped batcher drops its own): its weights are freed at once rather than
        at the next cycle collection."""
        await self.stop()
        self.backend = None

    async def score(
        self, prompts: Sequence[str], images: Sequence[ImageItem], deadline: float | None, priority: int = 0
    ) -> np.ndarray:
        """One prompt for all images, or one prompt per image -> scores (N,) float32 in image order."""
        return (await score_together([self], prompts, images, deadline, priority))[0]

    async def rank(
        self, prompt: str, images: Sequence[ImageItem], top_k: int | None, deadline: float | None
    ) -> Ranking:
        """Best first, with softmax probabilities over all candidates."""
        scoring.check_top_k(top_k)  # before any compute
        return scoring.rank_scores(await self.score([prompt], images, deadline), top_k)

    async def embed_pixels(self, pixels: np.ndarray, deadline: float | None, priority: int = 0) -> np.ndarray:
        """Preprocessed pixels (N, 3, H, W) -> image embeddings (N, D), through the image batcher."""
        with self.image_batcher.admit(len(pixels), deadline, priority):
            return await _within(deadline, self.image_batcher.submit(pixels, deadline, priority))

    async def embed_tokens(self, tokens: np.ndarray, deadline: float | None, priority: int = 0) -> np.ndarray:
        """Token ids (N, 77) -> text embeddings (N, D), through the text batcher."""
        with self.text_batcher.admit(len(tokens), deadline, priority):
            return await _within(deadline, self.text_batcher.submit(tokens, deadline, priority))

    def validate(self, prompts: Sequence[str], images: Sequence[ImageItem]) -> None:
        s = self.settings
        if not images:
            raise InvalidInput("no images given")
        if len(images) > s.max_images_per_request:
            raise InvalidInput(
                f"{len(images)} images in one request; at most {s.max_images_per_request} "
                "(split the job, e.g. with the client's score_many)"
            )
        if len(prompts) not in (1, len(images)):
            raise InvalidInput(
                f"{len(prompts)} prompts for {len(images)} images; give one prompt for all images or one per image"
            )
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise InvalidInput("prompt is empty" if len(prompts) == 1 else f"prompt {i} is empty")
        for i, item in enumerate(images):
            if item.pixels is not None:
                if item.data:
                    raise InvalidInput(f"{item.describe(i)}: set either data or pixels, not both")
                continue  # their size is checked against max_pixels where they become an image
            if not item.data:
                raise InvalidInput(f"{item.describe(i)}: empty image data")
            if len(item.data) > s.max_image_bytes:
                raise InvalidInput(
                    f"{item.describe(i)}: {len(item.data)} bytes; at most {s.max_image_bytes} (--max-image-bytes)"
                )

    async def _embed_prompts(self, prompts: list[str], deadline: float | None, priority: int) -> np.ndarray:
        """Distinct prompts -> their text rows (n, D'): cached ones from the cache, the rest tokenised and sent to
        the text tower together."""

        async def compute(positions: list[int]) -> np.ndarray:
            with self.text_batcher.admit(len(positions), deadline, priority):
                with self.text_batcher.preparing(len(positions)):
                    tokens = await self._tokenize([prompts[i] for i in positions])
                return await self.text_batcher.submit(tokens, deadline, priority)

        return await self.text_cache.get_many(prompts, compute)

    async def _score(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageItem],
        crops: _Crops,
        deadline: float | None,
        priority: int,
    ) -> np.ndarray:
        """Scores (N,) float32, the images cropped through ``crops``: the towers' rows, then the model's rule."""
        unique = list(dict.fromkeys(prompts))
        texts, embeds = await _all(
            self._embed_prompts(unique, deadline, priority), self._embed_images(crops, deadline, priority)
        )
        position = {p: i for i, p in enumerate(unique)}
        text = texts[[position[p] for p in prompts]]  # (1 or N, D')
        if self.pair_batcher is None:
            out = self.backend.scores(text, embeds)
        else:
            rows = np.concatenate([np.broadcast_to(text, (len(embeds), text.shape[1])), embeds], axis=1)
            out = np.asarray(await self.pair_batcher.submit(rows, deadline, priority), np.float32)
        self.metrics.images_scored.labels().inc(len(images))
        self.stats.add(out)
        return out

    def _pair_scores(self, rows: np.ndarray) -> np.ndarray:
        """The pair tower: rows of [text row, image row] -> (B,) scores."""
        width = self.backend.tokenizer.context_length
        return self.backend.scores(rows[:, :width], rows[:, width:])

    async def _embed_images(self, crops: _Crops, deadline: float | None, priority: int) -> np.ndarray:
        """The request's images (``crops.images``) -> their image rows (N, D): cached ones from the cache (by
        content), the rest decoded and sent to the image tower together."""

        async def compute(positions: list[int]) -> np.ndarray:
            with self.image_batcher.preparing(len(positions)):
                pixels = await crops.get(self.decoder, positions)
            return await self._embed_crops(pixels, deadline, priority)

        if not self.image_cache.capacity:
            return await compute(list(range(len(crops.images))))
        return await self.image_cache.get_many([item.digest() for item in crops.images], compute)

    async def _embed_crops(self, pixels: list[np.ndarray], deadline: float | None, priority: int) -> np.ndarray:
        """Crops -> image rows, one block per crop size (a preprocessing without a centre crop keeps each image's
        own shape)."""
        shapes = {p.shape for p in pixels}
        if len(shapes) == 1:
            return await self.image_batcher.submit(pixels, deadline, priority)
        groups = [[i for i, p in enumerate(pixels) if p.shape == shape] for shape in shapes]
        blocks = await _all(*(self.image_batcher.submit([pixels[i] for i in g], deadline, priority) for g in groups))
        out = np.empty((len(pixels), *blocks[0].shape[1:]), blocks[0].dtype)
        for g, block in zip(groups, blocks):
            out[g] = block
        return out

    async def _tokenize(self, prompts: list[str]) -> np.ndarray:
        """Token ids (n, context length): on the event loop for short prompts (a thread's round trip costs more
        than tokenising them), on the tokenizer thread for long ones (a megabyte takes the tokenizer a second)."""
        start = time.perf_counter()
        try:
            if sum(map(len, prompts)) <= INLINE_TOKENIZE_CHARS:
                return self.backend.tokenizer(prompts)
            return await asyncio.get_running_loop().run_in_executor(
                self.shared.tokenizer, self.backend.tokenizer, prompts
            )
        finally:
            self.metrics.preprocess.labels("tokenize").observe(time.perf_counter() - start)


async def score_together(
    engines: Sequence[Engine],
    prompts: Sequence[str],
    images: Sequence[ImageItem],
    deadline: float | None,
    priority: int = 0,
) -> list[np.ndarray]:
    """Each engine's scores (N,) float32 of one request: admitted by every engine's image tower or by none,
    each image decoded once per preprocessing, the first failure (a bad image, a refusal) failing it for all."""
    engines[0].validate(prompts, images)
    crops = _Crops(images, engines[0].metrics)
    with ExitStack() as admitted:
        for engine in engines:  # refused here costs nothing
            for batcher in (engine.image_batcher, engine.pair_batcher):
                if batcher is not None:
                    admitted.enter_context(batcher.admit(len(images), deadline, priority))
        return await _within(
            deadline, _all(*(engine._score(prompts, images, crops, deadline, priority) for engine in engines))
        )


class _Crops:
    """One request's crops: an image is decoded once per decode pool however many models ask for it, and the images
    a model asks for together go to the pool in one call."""

    def __init__(self, images: Sequence[ImageItem], metrics: ModelMetrics):
        self.images = images
        self.metrics = metrics
        self._asked: dict[tuple[int, int], tuple[asyncio.Future, int]] = {}  # (pool, image) -> (its call, place)

    async def get(self, decoder: DecodePool, indices: list[int]) -> list[np.ndarray]:
        """The crops (H, W, 3) uint8 of the request's images ``indices``; InvalidInput naming the first bad one."""
        new = [i for i in indices if (id(decoder), i) not in self._asked]
        if new:
            call = asyncio.ensure_future(self._decode(decoder, new))
            for place, i in enumerate(new):
                self._asked[(id(decoder), i)] = (call, place)
        answers = {call: await call for call in {self._asked[(id(decoder), i)][0] for i in indices}}
        out = []
        for i in indices:
            call, place = self._asked[(id(decoder), i)]
            crop = answers[call][place]
            if isinstance(crop, InvalidInput):
                raise InvalidInput(f"{self.images[i].describe(i)}: {crop}") from crop
            out.append(crop)
        return out

    async def _decode(self, decoder: DecodePool, indices: list[int]) -> list[np.ndarray | InvalidInput]:
        start = time.perf_counter()
        try:
            return await decoder.crops([self.images[i].content for i in indices])  # each (H, W, 3) uint8, or why not
        finally:
            self.metrics.preprocess.labels("decode").observe(time.perf_counter() - start)
            self.metrics.decoded.inc(len(indices))


async def _within(deadline: float | None, work: Awaitable):
    """``work``, or DeadlineExceeded (and ``work`` cancelled, its items out of the queues) once ``deadline`` (loop
    time) passes: the server keeps deadlines it was given as parameters or headers, not only the client."""
    if deadline is None:
        return await work
    started = asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(work, max(0.0, deadline - started))
    except asyncio.TimeoutError:
        waited = asyncio.get_running_loop().time() - started
        raise DeadlineExceeded(f"deadline passed after {waited:.3f} s, before the towers answered") from None


def _all(*aws: Awaitable) -> asyncio.Future:
    """Like gather, but the first failure cancels the rest (so a bad image stops its request's other work), and so
    does cancelling the result. Each awaitable is a task from the call on: a request cancelled before its work ran
    (a deadline already passed) cancels them, where coroutines held by a coroutine never started were dropped
    unawaited (a RuntimeWarning on the server's stderr for each)."""
    tasks = [asyncio.ensure_future(a) for a in aws]

    def done(future: asyncio.Future) -> None:  # retrieves every failure, so asyncio does not log the superseded ones
        if future.cancelled() or future.exception() is not None:
            for task in tasks:
                task.cancel()

    for task in tasks:
        task.add_done_callback(done)
    gathered = asyncio.gather(*tasks)
    gathered.add_done_callback(done)  # its failure too: a caller that left (wait_for cancelled) no longer awaits it
    return gathered
