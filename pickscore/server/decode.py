"""Decoding and cropping images off the event loop: in worker processes, or in threads.

    pool = DecodePool(preprocess, max_pixels=..., max_aspect_ratio=50, workers=2, processes=True)
    await pool.start()                     # workers started and answering (processes)
    crops = await pool.crops(images)       # each (H, W, 3) uint8, or the InvalidInput that says what is wrong
    pool.close()

Processes run beside the server's own, so decoding scales past one interpreter's lock: each worker decodes
and crops whole images (Pillow, numpy) with its own lock. They are started with ``spawn`` (the server holds
gRPC and torch threads, which ``fork`` would copy in an undefined state) and load nothing but the
preprocessing, never the model. The server's side of the pool is the event loop itself, no thread of its own,
and the event loop is what limits a server feeding a GPU from one process: so the unit of work is a job, a run
of up to ``CHUNK`` consecutive images of one request, not an image. A request's images become as many jobs as
there are idle workers (one request at low load spreads over them: latency), but no more than ``CHUNK`` images
a job (under load a request's images travel in one frame and come back in one reply: throughput). Where the
event loop paid one frame write, one reply parse and one future per image, it pays them per job.

A job goes to the worker with the fewest in hand (at most ``DEPTH``, so one waits while one decodes), as one
frame on that worker's socket -- headers, the encoded bytes or pixels of its images copied once into the job's
region of a shared-memory input slab where they fit (``INPUT_BYTES``), else following the headers on the socket;
nothing pickled or joined -- and the worker writes each crop into the job's region of a shared-memory output
slab (memfds both map, ``CHUNK`` contiguous slots a job) and answers with one short reply: per image, done in its
slot, or what went wrong. The server copies the region out at once (one copy, 150 kB a crop) and hands back
rows of that copy: no result is unpickled, no executor thread wakes. A crop that does not fit its slot (a
preprocessing without a centre crop) comes back in the reply instead.

A worker that dies (killed, out of memory) fails only the jobs it had in hand, with Internal; it is replaced at
once and the server goes on. Threads are the choice where processes cannot help: one core, or a caller that
cannot spawn; a job there is one executor call that crops its images in turn.

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
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import reduction

import numpy as np

from pickscore.errors import Internal, InvalidInput, Unavailable
from pickscore.model.preprocess import PreprocessConfig, load_uint8
from pickscore.resources import lower_priority

log = logging.getLogger("pickscore.server")

WORKER_NICE = 5  # nice levels below the server's event loop: a saturated host decodes on what the loop leaves
CHUNK = 8  # the most images in one job: a request's images travel together in up to this many a frame
DEPTH = 2  # jobs a worker holds at once: the one it decodes and the next, already in its socket
# A job's images up to this many bytes in all go in shared memory (8 JPEGs, or 8 images of raw 512 x 512 pixels, as
# generation backends send them); larger ones on the socket. Each worker has DEPTH such regions.
INPUT_BYTES = 8 << 20
START_TIMEOUT_S = 120.0  # a worker that has not answered by then (importing numpy and Pillow) fails the start

_JOB = struct.Struct("<IIIB")  # job id, first slot of its region, image count, bytes in shared memory; then headers
_IMAGE = struct.Struct("<BIIIQ")  # kind, height, width, channels (pixels), byte length; the bytes follow the headers
ENCODED, PIXELS = range(2)
_REPLY = struct.Struct("<I")  # job id; then each image's result
_RESULT = struct.Struct("<BQ")  # status, length of what follows: the crop's shape and bytes (inline), or the text
_SHAPE = struct.Struct("<III")
OK_SLOT, OK_INLINE, INVALID, FAILED = range(4)
READY = b"ready"


def _frame(n: int) -> bytes:
    """The length prefix ``multiprocessing.connection.Connection`` reads (what the worker's ``recv_bytes`` takes)."""
    return struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!i", -1) + struct.pack("!Q", n)


def _shared_memory(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A memfd of ``size`` bytes (handed to the workers as a _SharedFd) and this process's map of it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


class _SharedFd:
    """A file descriptor handed to a spawned worker: duplicated into it while the process is being spawned."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _detach, (reduction.DupFd(self.fd),)


def _detach(dup) -> int:
    return dup.detach()


def _worker_main(
    conn, slab_fd: int | None, slab_shape: tuple[int, ...] | None, inputs_fd: int | None, crop: Callable
) -> None:
    """A worker process: jobs in (headers, then each image's encoded bytes or pixels, or those in the job's region
    of the shared inputs), one reply out per job."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides, then ends us
    lower_priority(WORKER_NICE)
    slots = None
    if slab_fd is not None:
        slab = mmap.mmap(slab_fd, int(np.prod(slab_shape)))
        os.close(slab_fd)
        slots = np.ndarray(slab_shape, np.uint8, buffer=slab)
    inputs = None
    if inputs_fd is not None:
        inputs = memoryview(mmap.mmap(inputs_fd, os.fstat(inputs_fd).st_size))
        os.close(inputs_fd)
    conn.send_bytes(READY)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the server closed its end or died: nothing left to do
            return
        job, first, count, shared = _JOB.unpack_from(message)
        view = memoryview(message)
        end = _JOB.size + count * _IMAGE.size
        source, offset = (inputs, first // CHUNK * INPUT_BYTES) if shared else (view, end)
        reply = [_REPLY.pack(job)]
        for i, header in enumerate(_IMAGE.iter_unpack(view[_JOB.size : end])):
            n = header[-1]
            reply.append(_crop_into(crop, header, source[offset : offset + n], slots, first + i))
            offset += n
        conn.send_bytes(b"".join(reply))


def _crop_into(crop: Callable, header: tuple, payload: memoryview, slots: np.ndarray | None, slot: int) -> bytes:
    """One image of a job -> its result in the reply: its crop written into ``slot`` of the slab, or inline
    where it does not fit, or what is wrong with it."""
    kind, height, width, channels, _ = header
    try:
        if kind == PIXELS:
            shape = (height, width, channels) if channels else (height, width)
            out = crop(np.frombuffer(payload, np.uint8).reshape(shape))
        else:
            out = crop(payload)
        if slots is not None and out.shape == slots.shape[1:]:
            slots[slot] = out
            return _RESULT.pack(OK_SLOT, 0)
        data = out.tobytes()
        return _RESULT.pack(OK_INLINE, _SHAPE.size + len(data)) + _SHAPE.pack(*out.shape) + data
    except InvalidInput as e:
        text = str(e).encode()
        return _RESULT.pack(INVALID, len(text)) + text
    except Exception as e:  # a bug or a resource failure: this image fails, the worker goes on
        text = f"{type(e).__name__}: {e}".encode()
        return _RESULT.pack(FAILED, len(text)) + text


@dataclass(eq=False)
class _Job:
    id: int
    images: Sequence[bytes | np.ndarray]
    future: asyncio.Future  # each image's crop or InvalidInput, in order


@dataclass(eq=False)
class _Worker:
    index: int  # its job regions start at slots (index * DEPTH + r) * CHUNK, r < DEPTH
    process: multiprocessing.process.BaseProcess
    regions: list[int]  # first slots of its free job regions
    transport: asyncio.Transport | None = None
    jobs: dict[int, tuple[_Job, int]] = field(default_factory=dict)  # in hand: job id -> (job, first slot)


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
        self.jobs = 0  # jobs sent to a worker process or to the threads so far
        crop = load_uint8
        if device is not None:
            from pickscore.model.device_decode import crop_on_device

            crop = partial(crop_on_device, device=device)
        self._crop = partial(crop, cfg=preprocess, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
        self._executor = None if processes else ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._running = 0  # jobs given to the threads and not finished: counted down on a decode thread
        self._running_lock = threading.Lock()
        self._live: list[_Worker] = []
        self._pending: deque[_Job] = deque()  # jobs waiting for a worker with room
        self._ids = itertools.count()
        self._closing = False
        self._slab_fd: int | None = None
        self._slots: np.ndarray | None = None
        self._inputs_fd: int | None = None
        # each job region's images, where they fit: no socket to copy through; numpy copies into it without
        # holding the interpreter lock (a slice assignment to the mmap holds it: a request of raw pixels is 6 MB)
        self._inputs: np.ndarray | None = None
        if processes:
            try:
                shape = (workers * DEPTH * CHUNK, *preprocess.output_size, 3)
            except ValueError:  # no fixed output size: crops come back on the sockets
                shape = None
            if hasattr(os, "memfd_create"):
                if shape is not None:
                    self._slab_fd, slab = _shared_memory("pickscore-decode", int(np.prod(shape)))
                    self._slots = np.ndarray(shape, np.uint8, buffer=slab)
                self._inputs_fd, inputs = _shared_memory("pickscore-decode-inputs", workers * DEPTH * INPUT_BYTES)
                self._inputs = np.frombuffer(inputs, np.uint8)

    async def start(self) -> None:
        """Start every worker and wait until each answers (spawning takes a moment), so the first requests do
        not wait for it."""
        if self.processes:
            await asyncio.gather(*(self._start_worker(i) for i in range(self.workers)))

    async def crops(self, contents: Sequence[bytes | np.ndarray]) -> list[np.ndarray | InvalidInput]:
        """Encoded images, or decoded pixels (H, W, C) -> in order, each one's uint8 crop (H, W, 3) or the
        InvalidInput that says what is wrong with it. Internal when a worker dies holding some of them or fails
        unexpectedly on one; Unavailable once the pool is closed.

        The images go as consecutive jobs of at most ``CHUNK``: one per idle worker, so that a request spreads
        over the workers at low load, and as few as ``CHUNK`` allows when none is idle, so that under load a
        request costs the event loop a frame and a reply per ``CHUNK`` images."""
        if self._closing:
            raise Unavailable("the decode pool is closed: the server is stopping")
        n = len(contents)
        if not n:
            return []
        idle = sum(not w.jobs for w in self._live) if self.processes else self.workers - self._running
        count = min(n, max(idle, -(-n // CHUNK)))
        size, longer = divmod(n, count)
        loop = asyncio.get_running_loop()
        futures = []
        start = 0
        try:
            for i in range(count):
                end = start + size + (i < longer)
                futures.append(self._submit(contents[start:end], loop))
                start = end
            parts = await asyncio.gather(*futures) if count > 1 else [await futures[0]]
        except BaseException:  # cancelled (the caller left), or a job failed: the call's other jobs are not needed
            for future in futures:
                future.cancel()  # a pending job is skipped, one in hand ignored
            raise
        return [crop for part in parts for crop in part]

    def processes_alive(self) -> list[multiprocessing.process.BaseProcess]:
        """The worker processes decoding now."""
        return [w.process for w in self._live]

    @property
    def in_hand(self) -> int:
        """Images the worker processes hold now (sent, not yet answered)."""
        return sum(len(job.images) for w in self._live for job, _ in w.jobs.values())

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
        for fd in (self._slab_fd, self._inputs_fd):
            if fd is not None:
                os.close(fd)
        self._slab_fd = self._inputs_fd = None

    def _submit(self, images: Sequence[bytes | np.ndarray], loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """One job: to the worker process with the fewest in hand, or the pending queue when each holds
        ``DEPTH``; or to the threads."""
        if self.processes:
            job = _Job(next(self._ids), images, loop.create_future())
            worker = min(self._live, key=lambda w: len(w.jobs), default=None)
            if worker is not None and len(worker.jobs) < DEPTH:
                self._send(worker, job)
            else:
                self._pending.append(job)
            return job.future
        with self._running_lock:
            self._running += 1
        self.jobs += 1
        future = self._executor.submit(self._crop_each, images)
        future.add_done_callback(self._finished)
        return asyncio.wrap_future(future, loop=loop)

    def _crop_each(self, images: Sequence[bytes | np.ndarray]) -> list[np.ndarray | InvalidInput]:
        """A job on a decode thread: its images in turn."""
        out: list[np.ndarray | InvalidInput] = []
        for data in images:
            try:
                out.append(self._crop(data))
            except InvalidInput as e:
                out.append(e)
        return out

    def _finished(self, _: Future) -> None:
        """A thread's job ended (or was cancelled before it began): one more thread idle."""
        with self._running_lock:
            self._running -= 1

    # The server's side of the worker processes: all on the event loop.

    async def _start_worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe(duplex=True)  # a socket pair
        slab = None if self._slots is None else _SharedFd(self._slab_fd)
        inputs = None if self._inputs is None else _SharedFd(self._inputs_fd)
        process = context.Process(
            target=_worker_main,
            args=(theirs, slab, None if self._slots is None else self._slots.shape, inputs, self._crop),
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
        worker = _Worker(index, process, [(index * DEPTH + r) * CHUNK for r in range(DEPTH)])
        if self._closing:
            sock.close()
            process.terminate()
            return
        worker.transport, _ = await loop.create_unix_connection(lambda: _Replies(self, worker), sock=sock)
        self._live.append(worker)
        while self._pending and len(worker.jobs) < DEPTH:
            self._dispatch(worker)

    def _send(self, worker: _Worker, job: _Job) -> None:
        """One frame: the job's header and its images' headers in one write. The images' bytes go in the job's
        region of the shared inputs where they fit (``INPUT_BYTES``: a best-of-8 of JPEGs), so the event loop
        copies them once rather than through a socket, sends after sends; otherwise they follow on the socket, as
        they are (the transport copies only what the socket does not take at once)."""
        headers = []
        payloads = []
        for data in job.images:
            if isinstance(data, np.ndarray):
                pixels = np.ascontiguousarray(data)
                payload = memoryview(pixels).cast("B")
                channels = pixels.shape[2] if pixels.ndim == 3 else 0
                headers.append(_IMAGE.pack(PIXELS, *pixels.shape[:2], channels, payload.nbytes))
            else:
                payload = memoryview(data)
                headers.append(_IMAGE.pack(ENCODED, 0, 0, 0, payload.nbytes))
            payloads.append(payload)
        first = worker.regions.pop()
        worker.jobs[job.id] = (job, first)
        self.jobs += 1
        size = sum(p.nbytes for p in payloads)
        shared = self._inputs is not None and size <= INPUT_BYTES
        header = _JOB.pack(job.id, first, len(job.images), shared) + b"".join(headers)
        if shared:  # one copy into the job's region of the shared inputs, read there by the worker
            at = first // CHUNK * INPUT_BYTES
            for payload in payloads:
                self._inputs[at : at + payload.nbytes] = np.frombuffer(payload, np.uint8)
                at += payload.nbytes
            worker.transport.write(_frame(len(header)) + header)
            return
        worker.transport.write(_frame(len(header) + size) + header)
        for payload in payloads:
            worker.transport.write(payload)  # buffered by the transport when the socket is full: never blocks

    def _dispatch(self, worker: _Worker) -> None:
        """The next pending job whose caller is still waiting, to ``worker``."""
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                self._send(worker, job)
                return

    def _reply(self, worker: _Worker, message: bytes) -> None:
        (job_id,) = _REPLY.unpack_from(message)
        job, first = worker.jobs.pop(job_id)
        if not job.future.done():
            result = self._results(job, first, message)
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        worker.regions.append(first)  # only now: its crops have been copied out of it
        self._dispatch(worker)

    def _results(self, job: _Job, first: int, message: bytes) -> list[np.ndarray | InvalidInput] | Internal:
        """A job's reply -> its images' crops (rows of one copy of its region of the slab, or inline) and
        InvalidInputs; or Internal, for the whole job, when an image failed unexpectedly."""
        results: list[np.ndarray | InvalidInput] = []
        region = None
        view = memoryview(message)
        offset = _REPLY.size
        for i in range(len(job.images)):
            status, n = _RESULT.unpack_from(message, offset)
            offset += _RESULT.size
            body = view[offset : offset + n]
            offset += n
            if status == OK_SLOT:
                if region is None:
                    region = self._slots[first : first + len(job.images)].copy()
                results.append(region[i])
            elif status == OK_INLINE:
                shape = _SHAPE.unpack_from(body)
                results.append(np.frombuffer(body[_SHAPE.size :], np.uint8).reshape(shape).copy())
            elif status == INVALID:
                results.append(InvalidInput(str(body, "utf-8")))
            else:
                return Internal(f"decoding failed: {str(body, 'utf-8')}")
        return results

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
            if not self._live:  # nothing left to decode the waiting jobs
                error = Internal("no decode worker is running; retry")
                while self._pending:
                    job = self._pending.popleft()
                    if not job.future.done():
                        job.future.set_exception(error)
