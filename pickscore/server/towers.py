"""The towers of a server with front-end processes (``serve --front-ends N``): one process owns the device and the
models' weights, and runs every forward pass; the front ends, each a whole server (transports, validation,
decoding, caches, admission, batchers), call it over a Unix socket.

    host = TowerHost(settings)                        # in the process that owns the device
    host.start()                                      # host.path: the socket the front ends connect to
    client = TowerClient(host.path)                   # in a front end
    backend = client.load("demo", settings)           # a Backend whose towers run in the host
    backend.encode_image(crops)                       # (B, H, W, 3) uint8 -> (B, D), computed by the host

Why: one process's interpreter lock bounds how many requests its event loop can take in (docs/DESIGN.md, "The
host that feeds the GPU"); the front ends divide that work, and the device still has one owner, which merges the
batches that arrive together from several front ends into one forward pass (up to the batch sizes the front ends
batch to) and runs as many at once as the backend does (``pipeline_depth``).

The wire: a 4-byte length, a pickled header (the operation, its arguments, each array's dtype and shape), then
each array's bytes as they are in memory (sent and received by the kernel, without the interpreter lock). The
socket lives in a directory only this user can enter, made by the host for its own children: the pickles come
from this server's own processes.
"""

from __future__ import annotations

import collections
import gc
import logging
import pickle
import queue
import shutil
import socket
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pickscore.backends import Backend, batches_at_once, load_backend
from pickscore.backends.dual import DualEncoder
from pickscore.server.settings import Settings

log = logging.getLogger("pickscore.server")
_LENGTH = struct.Struct("<I")
# What a front end learns about a model it loads: the Backend protocol's attributes (preprocessing, tokenizer
# and the attributes that say what it is and how it runs).
_ATTRIBUTES = (
    "name",
    "kind",
    "joint",
    "source",
    "description",
    "precision",
    "weights_digest",
    "accelerated",
    "pipeline_depth",
    "preprocess",
    "tokenizer",
    "logit_scale",
    "embed_dim",
    "weights_bytes",
)


def send(sock: socket.socket, header: Any, arrays: Sequence[np.ndarray] = ()) -> None:
    arrays = [np.ascontiguousarray(a) for a in arrays]
    meta = pickle.dumps((header, [(a.dtype.str, a.shape) for a in arrays]), protocol=5)
    sock.sendall(_LENGTH.pack(len(meta)) + meta)
    for a in arrays:
        if a.nbytes:
            sock.sendall(memoryview(a.reshape(-1)).cast("B"))


def receive(sock: socket.socket) -> tuple[Any, list[np.ndarray]]:
    """One frame: (header, arrays); ConnectionError when the other side has gone."""
    (length,) = _LENGTH.unpack(_read(sock, bytearray(_LENGTH.size)))
    header, metas = pickle.loads(_read(sock, bytearray(length)))
    arrays = []
    for dtype, shape in metas:
        a = np.empty(shape, np.dtype(dtype))
        if a.nbytes:
            _read(sock, memoryview(a.reshape(-1)).cast("B"))
        arrays.append(a)
    return header, arrays


def _read(sock: socket.socket, buffer) -> bytearray | memoryview:
    view = memoryview(buffer)
    while view.nbytes:
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("the other process closed the connection")
        view = view[n:]
    return buffer


@dataclass(eq=False)
class _Job:
    arrays: list[np.ndarray]
    merge: tuple | None  # jobs with equal keys may share a forward pass; None: it runs alone
    done: threading.Event = field(default_factory=threading.Event)
    out: np.ndarray | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return len(self.arrays[-1])


class _Tower:
    """One tower of one loaded model in the host: the jobs of every front end, ``depth`` forward passes at once
    (each on a thread of its own, as a server's batcher runs them), jobs that are waiting together merged up to
    ``max_rows``."""

    def __init__(self, fn: Callable[..., np.ndarray], max_rows: int, depth: int, name: str):
        self.fn = fn
        self.max_rows = max_rows
        self._jobs: collections.deque[_Job] = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"towers-{name}-{i}", daemon=True) for i in range(depth)
        ]
        for t in self._threads:
            t.start()

    def __call__(self, arrays: list[np.ndarray], merge: tuple | None) -> np.ndarray:
        job = _Job(arrays, merge)
        with self._ready:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            self._jobs.append(job)
            self._ready.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.out

    def close(self, wait_s: float = 30.0) -> None:
        """No more jobs; those still queued fail. Waits (at most ``wait_s``: a hung pass is left behind) for the
        tower's threads to end: one still finishing its torch work while the process exits aborts it ("terminate
        called without an active exception")."""
        with self._ready:
            self._closed = True
            for job in self._jobs:
                job.error = RuntimeError("the model was unloaded")
                job.done.set()
            self._jobs.clear()
            self._ready.notify_all()
        give_up = time.monotonic() + wait_s
        for thread in self._threads:
            thread.join(max(0.0, give_up - time.monotonic()))

    def _take(self) -> list[_Job] | None:
        with self._ready:
            while not self._jobs and not self._closed:
                self._ready.wait()
            if not self._jobs:
                return None
            taken = [self._jobs.popleft()]
            rows = taken[0].rows
            while (
                self._jobs
                and taken[0].merge is not None
                and self._jobs[0].merge == taken[0].merge
                and rows + self._jobs[0].rows <= self.max_rows
            ):
                taken.append(self._jobs.popleft())
                rows += taken[-1].rows
            return taken

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            try:
                if len(taken) == 1:
                    arrays = taken[0].arrays
                else:
                    arrays = [np.concatenate(parts) for parts in zip(*(j.arrays for j in taken))]
                out = self.fn(*arrays)
                lo = 0
                for job in taken:
                    job.out, lo = out[lo : lo + job.rows], lo + job.rows
            except BaseException as e:  # the front ends' batches fail (Internal there); the tower goes on
                for job in taken:
                    job.error = RuntimeError(f"{type(e).__name__}: {e}")
            finally:
                for job in taken:
                    job.done.set()


@dataclass(eq=False)
class _Loaded:
    backend: Backend
    towers: dict[str, _Tower]
    users: int = 0
    warmed: bool = False

    def close(self) -> None:
        for tower in self.towers.values():
            tower.close()


class TowerHost:
    """The device's owner: loads models for the front ends (each weights once, however many front ends ask) and
    runs their towers. ``path``: its Unix socket, in a directory of its own removed by ``close``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._dir = Path(tempfile.mkdtemp(prefix="pickscore-towers-"))  # mode 0700: this user only
        self.path = str(self._dir / "towers.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(64)
        self._loaded: dict[tuple, _Loaded] = {}  # by what was loaded (reference and options)
        self._lock = threading.Lock()  # _loaded; loads run one at a time (peak memory: one model's loading)
        self.front_ends: dict[int, dict] = {}  # index -> what its hello said (pid, metrics_port)
        self.hello = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._accept, name="tower-host-accept", daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for loaded in self._loaded.values():
                loaded.close()
            self._loaded.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), name="tower-host-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    (op, *args), arrays = receive(conn)
                except (ConnectionError, OSError):
                    return
                try:
                    header, out = getattr(self, f"_op_{op}")(*args, arrays=arrays)
                    reply = (("ok", header), out)
                except Exception as e:  # a bad model, a failed forward pass: the caller's error, not ours
                    reply = (("error", str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"), [])
                try:
                    send(conn, *reply)
                except OSError:  # the front end has gone
                    return

    def _op_hello(self, index: int, info: dict, arrays) -> tuple[Any, list]:
        with self.hello:
            self.front_ends[index] = info
            self.hello.notify_all()
        return None, []

    def _op_load(self, ref: str, options: dict, limits: dict, arrays) -> tuple[Any, list]:
        key = (ref, *sorted(options.items()), *sorted(limits.items()))
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is None:
                backend = load_backend(ref, **options)
                depth = batches_at_once(backend)
                towers = {
                    "image": _Tower(backend.encode_image, limits["image"], depth, "image"),
                    "text": _Tower(backend.encode_text, limits["text"], depth, "text"),
                }
                if backend.joint:
                    towers["pair"] = _Tower(backend.scores, limits["image"], depth, "pair")
                loaded = self._loaded[key] = _Loaded(backend, towers)
                log.info("towers loaded", extra={"ref": ref, "device": backend.description})
            loaded.users += 1
        return {"handle": key, **{a: getattr(loaded.backend, a) for a in _ATTRIBUTES}}, []

    def _op_release(self, key: tuple, arrays) -> tuple[Any, list]:
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is not None:
                loaded.users -= 1
                if not loaded.users:
                    del self._loaded[key]
                    loaded.close()
                    del loaded
                    gc.collect()
                    log.info("towers unloaded", extra={"ref": key[0]})
        return None, []

    def _op_warm(self, key: tuple, max_batch_size: int, text_max_batch_size: int, arrays) -> tuple[Any, list]:
        with self._lock:
            loaded = self._loaded[key]
            if not loaded.warmed:
                loaded.backend.warm(max_batch_size, text_max_batch_size)
                loaded.warmed = True
        return None, []

    def _op_call(self, key: tuple, tower: str, arrays) -> tuple[Any, list]:
        loaded = self._loaded.get(key)
        if loaded is None:
            raise RuntimeError("the model was unloaded")
        # A joint tower's pairs merge when each image has its own prompt row (not one prompt for all images).
        merge = tuple((a.dtype.str, a.shape[1:]) for a in arrays)
        if tower == "pair" and len(arrays[0]) != len(arrays[1]):
            merge = None
        return None, [loaded.towers[tower](arrays, merge)]


class TowerClient:
    """A front end's end of the host's socket: one connection per calling thread (a tower's batches run on
    threads of their own, two at once on a GPU), and one for loading, hello and releases."""

    def __init__(self, path: str):
        self.path = path
        self._local = threading.local()
        self._control = self._connect()
        self._control_lock = threading.Lock()
        self._releases: queue.SimpleQueue = queue.SimpleQueue()  # handles a finalizer let go of, sent by a thread
        threading.Thread(target=self._release_later, name="tower-release", daemon=True).start()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        return sock

    def request(self, op: str, *args: Any, arrays: Sequence[np.ndarray] = (), control: bool = False):
        """(header, arrays) of the host's answer; RuntimeError with its reason when it failed there."""
        if control:
            with self._control_lock:
                return self._exchange(self._control, op, args, arrays)
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._local.sock = self._connect()
        return self._exchange(sock, op, args, arrays)

    @staticmethod
    def _exchange(sock: socket.socket, op: str, args: tuple, arrays: Sequence[np.ndarray]):
        send(sock, (op, *args), arrays)
        (status, header), out = receive(sock)
        if status != "ok":
            raise RuntimeError(header)
        return header, out

    def hello(self, index: int, **info: Any) -> None:
        self.request("hello", index, info, control=True)

    def load(self, ref: str, settings: Settings) -> RemoteBackend:
        limits = {"image": settings.max_batch_size, "text": settings.text_max_batch_size}
        try:
            meta, _ = self.request("load", ref, settings.load_options(), limits, control=True)
        except RuntimeError as e:  # what loading a bad model raised there, as the repository reports it
            raise ValueError(str(e)) from None
        return RemoteBackend(self, meta)

    def _release_later(self) -> None:
        while True:
            handle = self._releases.get()
            try:
                self.request("release", handle, control=True)
            except (OSError, RuntimeError):
                return  # the host is gone, and the weights with it


class RemoteBackend(DualEncoder):
    """A Backend whose forward passes run in the ``TowerHost``; what it is (kind, preprocessing, tokenizer,
    precision, digest) is the host's model's. A dual encoder's scores are a dot product, computed here."""

    def __init__(self, client: TowerClient, meta: dict):
        self._client = client
        self._handle = meta.pop("handle")
        self.__dict__.update(meta)
        self.description += ", towers in the device process"
        # To this process the forward passes are remote, as a GPU's are: its batchers run them on threads of their
        # own (not the lowered pool of a CPU's compute), two batches at once, so one travels while the host
        # computes the other, and the host has the next at hand to merge with other front ends'.
        self.accelerated = True
        self.pipeline_depth = max(2, self.pipeline_depth)
        weakref.finalize(self, client._releases.put, self._handle)  # the host unloads once no front end holds it

    def _call(self, tower: str, *arrays: np.ndarray) -> np.ndarray:
        return self._client.request("call", self._handle, tower, arrays=arrays)[1][0]

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self._call("image", pixels)

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        return self._call("text", tokens)

    def scores(self, text: np.ndarray, images: np.ndarray) -> np.ndarray:
        if not self.joint:
            return super().scores(text, images)
        return self._call("pair", text, images)

    def warm(self, max_batch_size: int, text_max_batch_size: int) -> None:
        self._client.request("warm", self._handle, max_batch_size, text_max_batch_size, control=True)
