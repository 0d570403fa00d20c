"""Decoding and cropping images off the event loop: in worker processes, or in threads.

    pool = DecodePool(preprocess, max_pixels=..., max_aspect_ratio=50, workers=2, processes=True)
    crop = await pool.crop(jpeg_bytes)     # (H, W, 3) uint8; InvalidInput for a bad image
    pool.close()

Processes run beside the server's own, so decoding scales past one interpreter's lock: each worker decodes
and crops whole images (Pillow, numpy) and hands back only the 3 x 224 x 224 crop. They are started with
``spawn`` (the server holds gRPC and torch threads, which ``fork`` would copy in an undefined state) and load
nothing but the preprocessing, never the model.

A worker that dies (killed, out of memory) fails only the images it and its pool-mates had in hand, with
Internal; the pool is replaced at once and the server goes on. Threads are the choice where processes
cannot help: one core, or a caller that cannot spawn.

With ``device`` set (``--decode-on-device``), the threads decode JPEGs and resize them on the model's device
(``model.device_decode``: approximate samples); every other image takes the exact path.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

import numpy as np

from pickscore.errors import Internal
from pickscore.model.preprocess import PreprocessConfig, load_uint8

log = logging.getLogger("pickscore.server")

_worker_crop = None  # in a worker process: the pool's crop function, bound to the server's preprocessing and limits


def _init_worker(crop: partial) -> None:
    global _worker_crop
    _worker_crop = crop


def _crop_in_worker(data: bytes | np.ndarray) -> np.ndarray:
    return _worker_crop(data)


class DecodePool:
    def __init__(
        self,
        preprocess: PreprocessConfig,
        max_pixels: int,
        max_aspect_ratio: float,
        workers: int,
        processes: bool,
        device: str | None = None,
    ):
        self.workers = workers
        self.processes = processes
        self.replaced = 0  # process pools replaced after a worker died
        crop = load_uint8
        if device is not None:
            from pickscore.model.device_decode import crop_on_device

            crop = partial(crop_on_device, device=device)
        self._crop = partial(crop, cfg=preprocess, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
        self._executor = self._start()

    def _start(self) -> Executor:
        if not self.processes:
            return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="decode")
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self._crop,),  # sent once per worker, not with every image
        )

    async def crop(self, data: bytes | np.ndarray) -> np.ndarray:
        """Encoded image, or decoded pixels (H, W, C) -> uint8 crop (H, W, 3). InvalidInput says what is wrong."""
        loop = asyncio.get_running_loop()
        if not self.processes:
            return await loop.run_in_executor(self._executor, self._crop, data)
        executor = self._executor
        try:
            return await loop.run_in_executor(executor, _crop_in_worker, data)
        except BrokenProcessPool as e:
            self._replace(executor)
            raise Internal("a decode worker process died while preprocessing this image; retry") from e

    def warm(self) -> None:
        """Start every worker now (spawning takes a moment), so the first requests do not wait for it."""
        if self.processes:
            for future in [self._executor.submit(int, 0) for _ in range(self.workers)]:
                future.result()

    def _replace(self, broken: Executor) -> None:
        if self._executor is not broken:  # another request already replaced it
            return
        log.error("a decode worker process died; replacing the pool", extra={"workers": self.workers})
        self.replaced += 1
        self._executor = self._start()
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
