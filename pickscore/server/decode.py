"""Decoding and cropping images off the event loop: in worker processes, or in threads.

    pool = DecodePool(preprocess, max_pixels=..., max_aspect_ratio=50, workers=2, processes=True)
    await pool.start()                     # workers started and answering (processes)
    crop = await pool.crop(jpeg_bytes)     # (H, W, 3) uint8; InvalidInput for a bad image
    pool.close()

Processes run beside the server's own, so decoding scales past one interpreter's lock: each worker decodes
and crops whole images (Pillow, numpy) with its own lock. They are started with ``spawn`` (the server holds
gRPC and torch threads, which ``fork`` would copy in an undefined state) and load nothing but the
preprocessing, never the model. The server's side of the pool is the event loop itself, no thread of its own:
an image goes to the worker with the fewest in hand (at most ``DEPTH``, so one waits while one decodes), as one
frame on that worker's socket -- a header and the encoded bytes or pixels, nothing pickled -- and the worker
writes its crop into a slot of a shared-memory slab (a memfd both map) and answers with a few bytes naming the
job. Per image the interpreter lock of the server's process is held for one write, one short read and one copy of
the crop out of its slot (150 kB): no result is unpickled, no executor thread wakes. A crop that does not fit
the slot (a preprocessing without a centre crop) comes back on the socket instead.

A worker that dies (killed, out of memory) fails only the images it had in hand, with Internal; it is replaced
at once and the server goes on. Threads are the choice where processes cannot help: one core, or a caller
that cannot spawn.

With ``device`` set (``--decode-on-device``), the threads decode JPEGs and resize them on the model's device
(``model.device_decode``: approximate samples); every other image takes the exact path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
import multiprocessing
import os
import signal
import socket
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import reduction

import numpy as np

from pickscore.errors import Internal, InvalidInput, Unavailable
from pickscore.model.preprocess import PreprocessConfig, load_uint8

log = logging.getLogger("pickscore.server")

DEPTH = 2  # images a worker holds at once: the one it decodes and the next, already in its socket
START_TIMEOUT_S = 120.0  # a worker that has not answered by then (importing numpy and Pillow) fails the start

_JOB = struct.Struct("<IiBIII")  # job id, slot (-1: none), kind (0 encoded, 1 pixels), height, width, channels
_REPLY = struct.Struct("<IB")  # job id, status; then the crop's shape and bytes (inline) or the error's text
_SHAPE = struct.Struct("<III")
OK_SLOT, OK_INLINE, INVALID, FAILED = range(4)
READY = b"ready"


def _frame(n: int) -> bytes:
    """The length prefix ``multiprocessing.connection.Connection`` reads (what the worker's ``recv_bytes`` takes)."""
    return struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!i", -1) + struct.pack("!Q", n)


class _SharedFd:
    """A file descriptor handed to a spawned worker: duplicated into it while the process is being spawned."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _detach, (reduction.DupFd(self.fd),)


def _detach(dup) -> int:
    return dup.detach()


def _worker_main(conn, slab_fd: int | None, slab_shape: tuple[int, ...] | None, crop: Callable) -> None:
    """A worker process: frames in (header + encoded bytes or pixels), crops out (into the slab, or inline)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides, then ends us
    slots = None
    if slab_fd is not None:
        slab = mmap.mmap(slab_fd, int(np.prod(slab_shape)))
        os.close(slab_fd)
        slots = np.ndarray(slab_shape, np.uint8, buffer=slab)
    conn.send_bytes(READY)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the server closed its end or died: nothing left to do
            return
        job, slot, kind, height, width, channels = _JOB.unpack_from(message)
        payload = memoryview(message)[_JOB.size :]
        try:
            if kind:
                shape = (height, width, channels) if channels else (height, width)
                out = crop(np.frombuffer(payload, np.uint8).reshape(shape))
            else:
                out = crop(payload)
            if slots is not None and slot >= 0 and out.shape == slots.shape[1:]:
                slots[slot] = out
                conn.send_bytes(_REPLY.pack(job, OK_SLOT))
            else:
                conn.send_bytes(_REPLY.pack(job, OK_INLINE) + _SHAPE.pack(*out.shape) + out.tobytes())
        except InvalidInput as e:
            conn.send_bytes(_REPLY.pack(job, INVALID) + str(e).encode())
        except Exception as e:  # a bug or a resource failure: this image fails, the worker goes on
            conn.send_bytes(_REPLY.pack(job, FAILED) + f"{type(e).__name__}: {e}".encode())


@dataclass(eq=False)
class _Job:
    id: int
    data: bytes | np.ndarray
    future: asyncio.Future


@dataclass(eq=False)
class _Worker:
    index: int  # its slots are index * DEPTH ... index * DEPTH + DEPTH - 1
    process: multiprocessing.process.BaseProcess
    slots: list[int]  # free slots of the slab that are this worker's
    transport: asyncio.Transport | None = None
    jobs: dict[int, tuple[_Job, int]] = field(default_factory=dict)  # in hand: job id -> (job, slot)


class _Replies(asyncio.Protocol):
    """One worker's answers, as ``Connection.send_bytes`` frames them (length prefix, then the message)."""

    def __init__(self, pool: DecodePool, worker: _Worker):
        self.pool = pool
        self.worker = worker
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (n,) = struct.unpack_from("!i", self.buffer)
            start = 4
            if n == -1:
                if len(self.buffer) < 12:
                    return
                (n,) = struct.unpack_from("!Q", self.buffer, 4)
                start = 12
            if len(self.buffer) < start + n:
                return
            message = bytes(self.buffer[start : start + n])
            del self.buffer[: start + n]
            self.pool._reply(self.worker, message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._lost(self.worker)


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
        self.replaced = 0  # worker processes replaced after one died
        crop = load_uint8
        if device is not None:
            from pickscore.model.device_decode import crop_on_device

            crop = partial(crop_on_device, device=device)
        self._crop = partial(crop, cfg=preprocess, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
        self._executor = None if processes else ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._live: list[_Worker] = []
        self._pending: deque[_Job] = deque()  # images waiting for a worker with room
        self._ids = itertools.count()
        self._closing = False
        self._slab_fd: int | None = None
        self._slots: np.ndarray | None = None
        if processes:
            try:
                shape = (workers * DEPTH, *preprocess.output_size, 3)
            except ValueError:  # no fixed output size: crops come back on the sockets
                shape = None
            if shape is not None and hasattr(os, "memfd_create"):
                self._slab_fd = os.memfd_create("pickscore-decode", os.MFD_CLOEXEC)
                os.ftruncate(self._slab_fd, int(np.prod(shape)))
                self._slots = np.ndarray(shape, np.uint8, buffer=mmap.mmap(self._slab_fd, int(np.prod(shape))))

    async def start(self) -> None:
        """Start every worker and wait until each answers (spawning takes a moment), so the first requests do
        not wait for it."""
        if self.processes:
            await asyncio.gather(*(self._start_worker(i) for i in range(self.workers)))

    async def crop(self, data: bytes | np.ndarray) -> np.ndarray:
        """Encoded image, or decoded pixels (H, W, C) -> uint8 crop (H, W, 3). InvalidInput says what is wrong;
        Unavailable once the pool is closed."""
        if self._closing:
            raise Unavailable("the decode pool is closed: the server is stopping")
        loop = asyncio.get_running_loop()
        if not self.processes:
            return await loop.run_in_executor(self._executor, self._crop, data)
        job = _Job(next(self._ids), data, loop.create_future())
        worker = min(self._live, key=lambda w: len(w.jobs), default=None)
        if worker is not None and len(worker.jobs) < DEPTH:
            self._send(worker, job)
        else:
            self._pending.append(job)
        return await job.future  # cancelled (the caller left): a pending job is skipped, one in hand ignored

    def processes_alive(self) -> list[multiprocessing.process.BaseProcess]:
        """The worker processes decoding now."""
        return [w.process for w in self._live]

    @property
    def in_hand(self) -> int:
        """Images the worker processes hold now (sent, not yet answered)."""
        return sum(len(w.jobs) for w in self._live)

    def close(self) -> None:
        self._closing = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for worker in self._live:
            for job, _ in worker.jobs.values():
                job.future.cancel()
            if worker.transport is not None:
                worker.transport.close()
            worker.process.terminate()
        for job in self._pending:
            job.future.cancel()
        self._live, self._pending = [], deque()
        if self._slab_fd is not None:
            os.close(self._slab_fd)
            self._slab_fd = None

    # The server's side of the worker processes: all on the event loop.

    async def _start_worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe(duplex=True)  # a socket pair
        slab = None if self._slots is None else _SharedFd(self._slab_fd)
        process = context.Process(
            target=_worker_main,
            args=(theirs, slab, None if self._slots is None else self._slots.shape, self._crop),
            name=f"pickscore-decode-{index}",
            daemon=True,
        )
        await loop.run_in_executor(None, process.start)
        theirs.close()  # only the worker holds its end now: its death is end-of-file here

        def ready() -> bool:
            return ours.poll(START_TIMEOUT_S) and ours.recv_bytes() == READY

        try:
            if not await loop.run_in_executor(None, ready):
                raise Internal(f"decode worker {index} did not start in {START_TIMEOUT_S:g} s")
        except (EOFError, OSError) as e:
            raise Internal(f"decode worker {index} exited while starting (exit code {process.exitcode})") from e
        except BaseException:
            process.terminate()
            raise
        sock = socket.socket(fileno=os.dup(ours.fileno()))
        ours.close()
        worker = _Worker(index, process, list(range(index * DEPTH, index * DEPTH + DEPTH)))
        if self._closing:
            sock.close()
            process.terminate()
            return
        worker.transport, _ = await loop.create_unix_connection(lambda: _Replies(self, worker), sock=sock)
        self._live.append(worker)
        while self._pending and len(worker.jobs) < DEPTH:
            self._dispatch(worker)

    def _send(self, worker: _Worker, job: _Job) -> None:
        slot = worker.slots.pop()
        worker.jobs[job.id] = (job, slot)
        data = job.data
        if isinstance(data, np.ndarray):
            pixels = np.ascontiguousarray(data)
            height, width = pixels.shape[:2]
            header = _JOB.pack(job.id, slot, 1, height, width, pixels.shape[2] if pixels.ndim == 3 else 0)
            payload = memoryview(pixels).cast("B")
        else:
            header, payload = _JOB.pack(job.id, slot, 0, 0, 0, 0), memoryview(data)
        worker.transport.write(_frame(len(header) + payload.nbytes) + header)
        worker.transport.write(payload)  # buffered by the transport when the socket is full: never blocks

    def _dispatch(self, worker: _Worker) -> None:
        """The next pending image whose caller is still waiting, to ``worker``."""
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                self._send(worker, job)
                return

    def _reply(self, worker: _Worker, message: bytes) -> None:
        job_id, status = _REPLY.unpack_from(message)
        job, slot = worker.jobs.pop(job_id)
        body = memoryview(message)[_REPLY.size :]
        if status == OK_SLOT:
            result: np.ndarray | Exception = self._slots[slot].copy()
        elif status == OK_INLINE:
            shape = _SHAPE.unpack_from(body)
            result = np.frombuffer(body[_SHAPE.size :], np.uint8).reshape(shape).copy()
        elif status == INVALID:
            result = InvalidInput(str(body, "utf-8"))
        else:
            result = Internal(f"decoding failed: {str(body, 'utf-8')}")
        worker.slots.append(slot)  # only now: the crop has been copied out of it
        if not job.future.done():
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        self._dispatch(worker)

    def _lost(self, worker: _Worker) -> None:
        """A worker's socket closed: unless the pool is closing, it died. Fail what it held, start another."""
        if self._closing or worker not in self._live:
            return
        self._live.remove(worker)
        error = Internal("a decode worker process died while preprocessing this image; retry")
        for job, _ in worker.jobs.values():
            if not job.future.done():
                job.future.set_exception(error)
        worker.jobs.clear()
        worker.process.join(0)  # reap it if it is gone already
        self.replaced += 1
        log.error(
            "a decode worker process died; replacing it",
            extra={"exit_code": worker.process.exitcode, "workers": self.workers},
        )
        task = asyncio.ensure_future(self._replace(worker.index))  # its slots: nothing writes them any more
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _replace(self, index: int) -> None:
        try:
            await self._start_worker(index)
        except Exception:
            log.exception("a decode worker could not be replaced")
            if not self._live:  # nothing left to decode the waiting images
                error = Internal("no decode worker is running; retry")
                while self._pending:
                    job = self._pending.popleft()
                    if not job.future.done():
                        job.future.set_exception(error)
