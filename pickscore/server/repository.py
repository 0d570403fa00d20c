"""The models one server serves: what to load (``--model``, ``--model-repository``), each name's version in service,
and versions loaded, swapped and unloaded while serving.

    repository = Repository(settings, metrics, shared, on_hung)
    await repository.start(model_specs(settings))      # every model loaded and warmed before SERVING
    with repository.use(["pickscore", "aesthetic"]) as (a, b):   # pinned: a swap cannot change them mid-request
        ...
    await repository.load(spec)        # a new version: loaded, warmed, then in service; the old one drains
    await repository.unload("aesthetic")

The life of a version: LOADING (weights read, engine started, warmed: no request sees it), READY (in service:
new requests go to it), UNLOADING (a newer version took over, or an unload: the requests that hold it finish on it,
none start), then unloaded (its engine stopped, its weights released). A version that fails to load is reported
(``index``, the log, the caller of a load) and the version in service keeps serving. Loads run one at a time.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pickscore.backends import DEFAULT_NAME, Backend, load_backend, model_identity
from pickscore.errors import InvalidInput, ModelLoadError, NotFound, Unavailable
from pickscore.server.engine import Engine, Shared
from pickscore.server.metrics import Metrics
from pickscore.server.settings import Settings
from pickscore.version import __version__

log = logging.getLogger("pickscore.server")
# DEFAULT_NAME (pickscore): a single --model REF is served under it (KServe: pickscore, pickscore_image, ...)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CONFIG = "model.json"  # a repository model's own settings: the declared normalisation, a fixed score scale


@dataclass(frozen=True)
class Normalize:
    """A declared affine map of a model's scores: (score - mean) / std."""

    mean: float
    std: float


@dataclass(frozen=True)
class ModelSpec:
    name: str
    ref: str  # a model reference (load_backend's), or a repository's version directory
    version: str = "1"
    normalize: Normalize | None = None
    score_scale: float | None = None  # model.json's: scores are score_scale * cosine (zero-shot CLIP's 100 * cos)
    stamp: float = 0.0  # the newest modification time under a repository version: a changed failed one is retried


def parse_models(text: str) -> list[ModelSpec]:
    """``--model``: one ``REF`` (named pickscore), or ``NAME=REF`` items, comma-separated."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("--model is empty: give a model reference, or NAME=REF items")
    specs = []
    for item in items:
        name, sep, ref = item.partition("=")
        if not sep or "/" in name:  # a path or hub id of its own (hub ids hold a slash, names never do)
            name, ref = DEFAULT_NAME, item
        _check_name(name, f"--model {item!r}")
        specs.append(ModelSpec(name, ref))
    if len(specs) > 1 and any("=" not in item for item in items):
        raise ValueError(f"--model {text!r}: name every model of several (NAME=REF), e.g. pickscore=demo")
    _unique([s.name for s in specs], "--model")
    return specs


def scan(directory: str | Path) -> dict[str, ModelSpec]:
    """Each model of a repository at its highest version: DIR/NAME/ is a model, or holds numbered versions."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--model-repository {directory}: not a directory")
    found = {}
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        _check_name(path.name, f"repository model {path}")
        versions = [v for v in path.iterdir() if v.is_dir() and v.name.isdigit()]
        where = max(versions, key=lambda v: int(v.name)) if versions else path
        found[path.name] = ModelSpec(
            path.name,
            str(where),
            str(int(where.name)) if versions else "1",
            *_config(path / CONFIG),
            max((f.stat().st_mtime for f in where.rglob("*")), default=where.stat().st_mtime),
        )
    return found


def model_specs(settings: Settings) -> list[ModelSpec]:
    if settings.model_repository:
        specs = list(scan(settings.model_repository).values())
        if not specs:
            raise ValueError(f"--model-repository {settings.model_repository}: no model directories in it")
        return specs
    return parse_models(settings.model)


def default_name(settings: Settings, specs: Sequence[ModelSpec]) -> str:
    names = [s.name for s in specs]
    if settings.default_model:
        if settings.default_model not in names:
            raise ValueError(
                f"--default-model {settings.default_model!r} is not served; the models: {', '.join(names)}"
            )
        return settings.default_model
    return DEFAULT_NAME if DEFAULT_NAME in names and settings.model_repository else names[0]


def _check_name(name: str, where: str) -> None:
    if not NAME.fullmatch(name):
        raise ValueError(
            f"{where}: model name {name!r}: letters, digits, '_', '.', '-', at most 64, a letter or digit first"
        )


def _unique(names: list[str], where: str) -> None:
    towers = {f"{n}_image" for n in names} | {f"{n}_text" for n in names}
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"{where}: model {name!r} named twice")
        if name in towers:
            raise ValueError(f"{where}: model {name!r} would share a KServe name with another model's tower")


def _config(path: Path) -> tuple[Normalize | None, float | None]:
    """model.json's declared normalisation and score scale (each None when not given)."""
    if not path.is_file():
        return None, None
    try:
        config = json.loads(path.read_text())
        n, scale = config.get("normalize"), config.get("score_scale")
        normalize = None if n is None else Normalize(float(n["mean"]), float(n["std"]))
        scale = None if scale is None else float(scale)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f'{path}: expected {{"normalize": {{"mean": M, "std": S}}, "score_scale": K}}, each optional '
            f"({type(e).__name__}: {e})"
        ) from None
    if normalize is not None and not normalize.std > 0:
        raise ValueError(f"{path}: normalize.std must be positive, got {normalize.std}")
    if scale is not None and not scale > 0:
        raise ValueError(f"{path}: score_scale must be positive, got {scale}")
    return normalize, scale


def _rescale(backend: Backend, spec: ModelSpec) -> None:
    """A declared score scale replaces a CLIP-style model's own (scores = score_scale * cosine)."""
    if spec.score_scale is None:
        return
    if backend.kind not in ("clip", "hps"):
        raise ValueError(f"score_scale applies to CLIP-style models (clip, hps); this one is {backend.kind}")
    backend.logit_scale = math.log(spec.score_scale)


class ServedModel:
    """One loaded version of a model and the requests holding it; ``identity``: what it is (``model_identity``),
    composed once at load."""

    def __init__(self, spec: ModelSpec, engine: Engine):
        self.spec = spec
        self.engine: Engine | None = engine
        self.weights_bytes = engine.backend.weights_bytes
        self.identity = model_identity(spec.name, engine.backend)
        self.state = "READY"
        self.inflight = 0
        self._idle = asyncio.Event()

    name = property(lambda self: self.spec.name)
    version = property(lambda self: self.spec.version)

    @property
    def backend(self) -> Backend:
        return self.engine.backend

    def hold(self) -> None:
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1
        if not self.inflight:
            self._idle.set()

    async def drained(self, timeout: float) -> bool:
        if self.inflight:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                return False
        return True


class Repository:
    """Model name -> the version in service. ``backend``: the one model's backend, given rather than loaded (tests
    inject faulty ones that way)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        shared: Shared,
        on_hung: Callable[[str], None] | None = None,
        backend: Backend | None = None,
        load: Callable[[str], Backend] | None = None,
    ):
        self.settings = settings
        self._load = load or self._load_here
        self.metrics = metrics
        self.shared = shared
        self.on_hung = on_hung
        self._given = backend
        self.serving: dict[str, ServedModel] = {}
        self.default = ""
        self.specs: dict[str, ModelSpec] = {}  # what was asked for at start, by name: explicit loads reload these
        self.problems: dict[str, tuple[ModelSpec, str]] = {}  # name -> (what, why) of its last failed load
        self._retiring: list[ServedModel] = []
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()  # versions draining after a swap

    async def start(self, specs: Sequence[ModelSpec]) -> None:
        """Load every model (one at a time: peak memory is the largest one's loading, not all at once)."""
        self.specs = {s.name: s for s in specs}
        default = default_name(self.settings, specs)
        for spec in specs:
            self.serving[spec.name] = await self._open(spec)
        self.default = default  # from now on a request naming no model is answered

    def get(self, name: str, version: str = "") -> ServedModel:
        """The version in service of ``name`` (empty: the default model); NotFound naming what is served."""
        model = self.serving.get(name or self.default)
        if model is None and not self.default:
            raise Unavailable("the models are loading; retry shortly")
        if model is None:
            what = f"model {name!r}" if name else f"the default model {self.default!r}"
            raise NotFound(f"{what} is not served; this server serves {', '.join(self.serving) or 'no model'}")
        if version and version != model.version:
            raise NotFound(f"model {model.name!r} has no version {version!r} in service; it serves {model.version}")
        return model

    @contextmanager
    def use(self, names: Sequence[str], version: str = "") -> Iterator[list[ServedModel]]:
        """The models for one request, held until it ends: a swap meanwhile finishes it on these versions."""
        models = [self.get(name, version) for name in names]
        if len({m.name for m in models}) < len(models):
            raise InvalidInput(f"models {', '.join(m.name for m in models)}: a model named twice")
        for m in models:
            m.hold()
        try:
            yield models
        finally:
            for m in models:
                m.release()

    async def load(self, spec: ModelSpec) -> ServedModel:
        """Load, warm and put in service ``spec`` (ModelLoadError when it cannot be: the version in service stays);
        the version it replaces drains in the background, then is unloaded."""
        async with self._lock:
            try:
                new = await self._open(spec)
            except ModelLoadError as e:
                self.problems[spec.name] = (spec, str(e))
                log.error("model load failed; the version in service stays", extra={"model": spec.name, "why": str(e)})
                raise
            self.problems.pop(spec.name, None)
            old = self.serving.get(spec.name)
            self.serving[spec.name] = new  # from now on new requests get the new version
        log.info("model in service", extra={"model": spec.name, "model_version": spec.version})
        if old is not None:
            self._retire_later(old)
        return new

    async def unload(self, name: str) -> None:
        """Take ``name`` out of service; returns once its requests finished (at most the grace period)."""
        async with self._lock:
            model = self.get(name)
            del self.serving[name]
        await self._retire(model, successor=False)

    async def poll(self) -> None:
        """One look at the repository: load what is new or changed, unload what was removed."""
        try:
            found = scan(self.settings.model_repository)
        except ValueError as e:
            log.error("cannot read the model repository", extra={"why": str(e)})
            return
        for name, spec in found.items():
            current = self.serving.get(name)
            if current is not None and current.version == spec.version:
                continue
            problem = self.problems.get(name)
            if problem and (problem[0].version, problem[0].stamp) == (spec.version, spec.stamp):
                continue  # failed as it is: wait for its files to change
            try:
                await self.load(spec)
            except ModelLoadError:
                pass  # reported by load; the version in service stays
        for name in [n for n in self.serving if n not in found]:
            await self.unload(name)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            await self.poll()

    def index(self) -> list[dict[str, str]]:
        """Every model known: in service (READY), draining (UNLOADING), failed or on disk only (UNAVAILABLE)."""
        rows = [{"name": m.name, "version": m.version, "state": "READY", "reason": ""} for m in self.serving.values()]
        rows += [{"name": m.name, "version": m.version, "state": "UNLOADING", "reason": ""} for m in self._retiring]
        for name, (spec, why) in self.problems.items():
            rows.append({"name": name, "version": spec.version, "state": "UNAVAILABLE", "reason": why})
        for name, spec in self._known().items():
            if not any(r["name"] == name for r in rows):
                rows.append({"name": name, "version": spec.version, "state": "UNAVAILABLE", "reason": "unloaded"})
        return sorted(rows, key=lambda r: (r["name"], r["version"]))

    def spec_to_load(self, name: str) -> ModelSpec:
        """What an explicit load of ``name`` loads: the repository's highest version, or the --model it was."""
        known = self._known()
        if name not in known:
            where = "the repository has" if self.settings.model_repository else "this server was started with"
            raise NotFound(f"no model {name!r} to load; {where} {', '.join(known)}")
        return known[name]

    def _known(self) -> dict[str, ModelSpec]:
        """What can be loaded: the repository's models at their highest versions, or the --model specs."""
        return scan(self.settings.model_repository) if self.settings.model_repository else self.specs

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for model in [*self.serving.values(), *self._retiring]:
            if model.engine is not None:
                await model.engine.stop()

    @property
    def hung(self) -> bool:
        return any(m.engine is not None and m.engine.hung for m in [*self.serving.values(), *self._retiring])

    def _load_here(self, ref: str) -> Backend:
        """The model's backend in this process (a server with front ends loads it in the device's instead)."""
        return load_backend(ref, **self.settings.load_options())

    async def _open(self, spec: ModelSpec) -> ServedModel:
        """LOADING: the backend read, the engine started and warmed; ModelLoadError naming the model otherwise."""
        s = self.settings
        log.debug("loading model", extra={"model": spec.name, "model_version": spec.version, "ref": spec.ref})
        try:
            backend = self._given
            self._given = None  # given once, for the first model
            if backend is None:
                backend = await asyncio.get_running_loop().run_in_executor(None, self._load, spec.ref)
            _rescale(backend, spec)
            engine = Engine(backend, s, self.metrics.for_model(spec.name), self.shared, self.on_hung)
            await engine.start()
        except ModelLoadError as e:
            raise ModelLoadError(f"model {spec.name!r} version {spec.version}: {e}") from e
        except (ValueError, OSError, RuntimeError, KeyError) as e:  # what loading a bad or partial model raises
            why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise ModelLoadError(f"model {spec.name!r} version {spec.version} ({spec.ref}): {why}") from e
        model = ServedModel(spec, engine)
        b = backend
        log.info(
            "model loaded",
            extra={
                "model": spec.name,
                "model_version": spec.version,
                "source": b.source,
                "backend": b.name,
                "device": b.description,
                "weights_bytes": model.weights_bytes,
                "identity": model.identity,
            },
        )
        labels = (spec.name, spec.version, b.source, b.name, b.description, model.identity, __version__)
        self.metrics.model_info.labels(*labels).set(1)
        self.metrics.model_weights.labels(spec.name, spec.version).set(model.weights_bytes)
        return model

    def _retire_later(self, model: ServedModel) -> None:
        task = asyncio.ensure_future(self._retire(model, successor=True))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retire(self, model: ServedModel, successor: bool) -> None:
        """UNLOADING until its requests finish (at most the grace period), then stop it and release its weights."""
        model.state = "UNLOADING"
        self._retiring.append(model)
        if not await model.drained(self.settings.grace_period_s):
            log.warning("grace period over; stopping a draining model", extra={"model": model.name})
        engine, model.engine = model.engine, None
        b, m = engine.backend, self.metrics
        await engine.release()
        m.model_info.remove(model.name, model.version, b.source, b.name, b.description, model.identity, __version__)
        m.model_weights.remove(model.name, model.version)
        if not successor:  # the model's tower series go with it (the scrape-time gauge would keep its batcher)
            for family in (m.queue_depth, m.queue_capacity, m.estimated_wait, m.tower_hung):
                for batcher in engine.batchers:
                    family.remove(model.name, batcher.tower)
        del engine, b
        self._retiring.remove(model)
        model.state = "UNLOADED"
        gc.collect()  # whatever else of the version's engine is in cycles
        log.info("model unloaded", extra={"model": model.name, "model_version": model.version})
