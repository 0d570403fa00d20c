"""Where images are scored: in this process (a loaded model) or on running servers, behind one protocol.

Every command that scores chooses once, with ``open_place`` from ``--model`` / ``--server``: ``score`` and
``rank``, ``batch`` (in-process and on servers), ``evaluate-models`` and the collection app's ordering.

    with open_place(model="path/to/PickScore_v1") as place:     # or servers=["host:8001", "http://host:8000"]
        scores, errors = place.score_all("a cat in a hat", ["a.png", "b.jpg"], skip_invalid=True)
    open_place(servers=["host:8001"], model_name="hps")          # one of the servers' models (--model-name)

Three ways in, for three kinds of caller: ``score_all`` (one prompt, many images: a bad image fails alone when
``skip_invalid``), ``prepare``/``complete`` (a job's shard of rows, each with its own prompt: prepared while the
shard before it completes) and ``score_async`` (from an event loop, without blocking it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pickscore.errors import InvalidInput, PickScoreError, describe_item, item_reason, item_renamed

if TYPE_CHECKING:
    from pickscore.datasets import Row
    from pickscore.scorer import Scorer

Scores = tuple[np.ndarray, dict[int, PickScoreError]]  # (N,) in input order, NaN where failed; errors by position
ShardResult = tuple[np.ndarray, dict[int, str], dict[str, np.ndarray]]  # scores, reasons by row, extra columns


class Place(Protocol):
    """A place that scores. ``model`` names what scores; ``name`` also says where (for reports)."""

    model: str
    name: str
    identities: dict[str, str]  # model identity (name:kind:precision:digest) by served name

    def score_all(
        self, prompt: str, images: Sequence[Any], skip_invalid: bool = False, progress: bool = False
    ) -> Scores: ...

    def prepare(self, rows: list[Row]) -> Any: ...

    def complete(self, rows: list[Row], prepared: Any) -> ShardResult: ...

    async def score_async(self, prompt: str, images: Sequence[Any]) -> list[float]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Place: ...

    def __exit__(self, *exc) -> None: ...


MODEL_HELP = (
    "score in this process with this model: demo (the small model bundled with the package, trained on the drawn "
    "shapes of `pickscore data synthetic`), a Hugging Face CLIP directory (e.g. a downloaded PickScore_v1), an "
    "open_clip directory, a checkpoint or ONNX export written by this project, or a hub id such as "
    "yuvalkirstain/PickScore_v1 (see README: 'Using the real PickScore_v1')"
)
SERVER_HELP = (
    "score on running `pickscore serve` servers instead of loading a model here: HOST:PORT (gRPC) or "
    "http[s]://HOST:PORT, several separated by commas, or a DNS name whose every address is a server "
    "(dns:///HOST:PORT for gRPC, dns+http://HOST:PORT for HTTP). Each batch of images goes to the server with the "
    "least outstanding work; a server that fails is taken out and its batches go to the others (it is tried again "
    "with backoff); refusals are retried. Every server must serve the same model (see --expect-model)"
)
MODEL_NAME_HELP = (
    "with --server: which of the servers' models scores, by the name they serve it under (see `GET /v1/models`); "
    "empty (the default): the server's default model"
)
SEVERAL_MODEL_NAMES_HELP = (
    "; several, comma-separated (pickscore,other): every image scored by each of them in one request (decoded "
    "once), each model's scores reported apart. Several models need --server (--model loads one model here)"
)


def model_names(text: str | Sequence[str] | None) -> list[str]:
    """``--model-name`` as a list: "" -> [] (the server's default), "a" -> ["a"], "a,b" -> ["a", "b"] (a list is
    taken as is). ValueError for an empty name among several or a name given twice."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text or ())]
    if names == [""]:
        return []
    if "" in names:
        raise ValueError(f"--model-name {','.join(names)}: an empty name (give names separated by commas)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--model-name {','.join(names)}: {repeated[0]} is named twice")
    return names


def add_where_flags(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """--model REF or --server ADDRESS[,ADDRESS...], one of them required, and --model-name NAME (with --server):
    what ``place_from_args`` reads. ``several``: the subcommand takes several comma-separated names (``batch``,
    ``evaluate-models``), each model's scores apart."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", metavar="REF", help=MODEL_HELP)
    where.add_argument("--server", metavar="ADDRESS", help=SERVER_HELP)
    parser.add_argument(
        "--model-name",
        default="",
        metavar="NAME[,NAME...]" if several else "NAME",
        help=MODEL_NAME_HELP + (SEVERAL_MODEL_NAMES_HELP if several else ""),
    )
    parser.add_argument(
        "--expect-model",
        default="",
        metavar="IDENTITY[,IDENTITY...]",
        help="with --server: score only on the servers serving this model identity (as GET /v1/model's `identity` "
        "reports it, name:kind:precision:digest, or just the digest; one per --model-name). Without it, servers "
        "serving different models (a half-finished rollout) are refused, naming what each serves",
    )
    parser.set_defaults(where_usage=parser.error, several_model_names=several)  # for check_model_name's errors


def check_model_name(args: Any) -> None:
    """A usage error (exit 2) for --model-name without --server (it chooses among a server's models, and a model
    loaded here is --model itself), for a malformed list of names, or for several names where the subcommand
    takes one."""
    text = getattr(args, "model_name", "") or ""
    message = ""
    if text and not getattr(args, "server", None):
        message = (
            f"--model-name {text} chooses one of the models a server serves: give it with --server (with --model, "
            "REF is the model; several models need --server too)"
        )
    elif getattr(args, "expect_model", "") and not getattr(args, "server", None):
        message = f"--expect-model {args.expect_model} checks what servers serve: give it with --server"
    else:
        try:
            names = model_names(text)
        except ValueError as e:
            message = str(e)
        else:
            if len(names) > 1 and not getattr(args, "several_model_names", False):
                message = (
                    f"--model-name {text}: this command scores with one model (batch and evaluate-models take several)"
                )
    if message:
        usage = getattr(args, "where_usage", None)
        if usage is not None:
            usage(message)
        raise ValueError(message)


def add_place_flags(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """``add_where_flags`` (``several``: as it says) with ``add_scoring_flags``."""
    add_where_flags(parser, several)
    add_scoring_flags(parser)


def add_scoring_flags(parser: argparse.ArgumentParser) -> None:
    """What either place takes, for a command that chooses its models itself: the backend flags, --batch-size and
    --max-pixels (in this process), --timeout and the client's security flags (with --server)."""
    from pickscore.backends import add_backend_flags
    from pickscore.flags import int_at_least
    from pickscore.limits import DEFAULT_MAX_PIXELS
    from pickscore.tls import add_client_flags

    add_backend_flags(parser)
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=16, metavar="N", help="images per forward pass (default 16; "
        "scoring in this process)",
    )  # fmt: skip
    parser.add_argument(
        "--max-pixels",
        type=int_at_least(1),
        default=DEFAULT_MAX_PIXELS,
        metavar="PIXELS",
        help=f"an image with more pixels than this fails, alone: a guard against decompression bombs (default "
        f"{DEFAULT_MAX_PIXELS}; scoring in this process: a server applies its own limit)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up on a server request after this long, retries included (default 600; with --server)",
    )
    add_client_flags(parser.add_argument_group("server security (with --server only)"))


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_place(
    model: str | None = None,
    servers: Sequence[str] = (),
    *,
    embeddings: bool = False,
    batch_size: int = 16,
    max_pixels: int | None = None,
    timeout: float = 600.0,
    connection: dict[str, Any] | None = None,
    model_name: str = "",
    expect_model: str = "",
    **backend: str,
) -> Place:
    """In this process when ``model`` is given (``backend``: device, dtype, backend), else on ``servers``, scoring
    with their model ``model_name`` (empty: each server's default). ``connection``: the clients' keywords (TLS,
    token). ``expect_model``: the model identity the servers must serve (else they must all serve one)."""
    check_where(model, servers, embeddings, model_name, expect_model)
    if len(model_names(model_name)) > 1:
        raise ValueError(
            f"--model-name {model_name}: a place scores with one model; several score together in batch and "
            "evaluate-models (pickscore.jobs.several_models.ModelsOnServers)"
        )
    if model:
        from pickscore.scorer import Scorer

        limits = {} if max_pixels is None else {"max_pixels": max_pixels}
        return InProcess(model, Scorer.from_pretrained(model, **backend, batch_size=batch_size, **limits), embeddings)
    return OnServers(servers, timeout, connection or {}, model_name, expect_model)


def check_where(
    model: str | None, servers: Sequence[str], embeddings: bool = False, model_name: str = "", expect_model: str = ""
) -> None:
    """ValueError unless exactly one of ``model`` and ``servers`` is given (embeddings, ``model_name`` and
    ``expect_model`` only with the one that has them)."""
    if bool(model) == bool(servers):
        raise ValueError("give either --model (score here) or --server (score on running servers)")
    if embeddings and servers:
        raise ValueError("--embeddings needs --model: the servers answer scores, not embeddings")
    if model_name and not servers:
        raise ValueError(
            f"--model-name {model_name} chooses one of the models a server serves: with --server only (several "
            "models need --server too)"
        )
    if expect_model and not servers:
        raise ValueError(f"--expect-model {expect_model} checks what servers serve: with --server only")


def place_from_args(args: Any, embeddings: bool = False) -> Place:
    """``open_place`` from a subcommand's flags: ``--model`` with the backend flags, or ``--server A[,B...]`` with
    the client flags (``--timeout``, TLS, token) and ``--model-name``; ``--batch-size`` and ``--max-pixels`` where
    it has them."""
    from pickscore.backends import backend_options
    from pickscore.tls import connection

    check_model_name(args)
    servers = args.server.split(",") if getattr(args, "server", None) else ()
    return open_place(
        None if servers else args.model,
        servers,
        embeddings=embeddings,
        batch_size=getattr(args, "batch_size", 16),
        max_pixels=getattr(args, "max_pixels", None),
        timeout=getattr(args, "timeout", 600.0),
        connection=connection(args) if servers else None,
        model_name=getattr(args, "model_name", "") or "",
        expect_model=getattr(args, "expect_model", "") or "",
        **({} if servers else backend_options(args)),
    )


class InProcess(_Closing):
    """A model loaded here: images decoded on every core, prompts and images encoded in batches."""

    def __init__(self, model: str, scorer: Scorer, embeddings: bool = False):
        if embeddings and scorer.backend.joint:
            scorer.close()
            raise ValueError(
                f"--embeddings: {model} is {scorer.backend.kind}, whose prompt and image meet inside one forward "
                "pass: it has no text embedding to write"
            )
        self.model = self.name = model
        self.scorer = scorer
        self.embeddings = embeddings

    @property
    def identities(self) -> dict[str, str]:
        """The loaded model's identity, under the name ``pickscore serve --model`` would serve it."""
        return {self.scorer.identity.split(":", 1)[0]: self.scorer.identity}

    def score_all(
        self, prompt: str, images: Sequence[Any], skip_invalid: bool = False, progress: bool = False
    ) -> Scores:
        return self.scorer.score_all(prompt, images, skip_invalid=skip_invalid, progress=progress)

    async def score_async(self, prompt: str, images: Sequence[Any]) -> list[float]:
        return await asyncio.to_thread(self.scorer.score, prompt, images)

    def prepare(self, rows: list[Row]) -> tuple[dict[int, str], list[int], list[np.ndarray]]:
        """Decode and crop on every core -> (reasons by row, the rows that decoded, their crops)."""
        errors = {i: r.error for i, r in enumerate(rows) if r.error}
        todo = [i for i in range(len(rows)) if i not in errors]
        sources = [rows[i].image if rows[i].image is not None else rows[i].path for i in todo]
        ok, crops = [], []
        for i, crop in zip(todo, self.scorer.load_all(sources)):
            if isinstance(crop, InvalidInput):
                errors[i] = item_reason(crop)
            else:
                ok.append(i)
                crops.append(crop)
        return errors, ok, crops

    def complete(self, rows: list[Row], prepared) -> ShardResult:
        errors, ok, crops = prepared
        scores, extra = self.score_crops(len(rows), ok, [rows[i].prompt for i in ok], crops)
        return scores, errors, extra

    def score_crops(
        self, n: int, ok: list[int], prompts: list[str], crops: list[np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rows ``ok`` of ``n`` (their prompts and uint8 crops) -> scores (n,) with NaN elsewhere, and the image
        and text embeddings by column when asked for (NaN rows elsewhere). Each distinct prompt is encoded once."""
        scores = np.full(n, np.nan, np.float32)
        names = ("image_embedding", "text_embedding") if self.embeddings else ()
        extra = {name: np.full((n, self.scorer.embed_dim), np.nan, np.float32) for name in names}
        if not ok:
            return scores, extra
        image_embeds = self.scorer.encode_pixels(np.stack(crops))
        text_embeds = self.scorer.encode_prompts(prompts)
        scores[ok] = self.scorer.paired_scores(text_embeds, image_embeds)
        for name, values in zip(names, (image_embeds, text_embeds)):
            extra[name][ok] = values
        return scores, extra

    def close(self) -> None:
        self.scorer.close()


class OnServers(_Closing):
    """Running servers (gRPC ``host:port`` or HTTP ``http[s]://host:port``, or a DNS name: see
    ``pickscore.client.fleet``), as one ``RewardClient`` over all of them: each batch of images to the server with
    the least outstanding work, bounded in flight, a failed server's batches to the others, refusals and
    unavailability retried; a bad image fails only itself. ``model_name``: which of the servers' models scores
    (empty: each one's default); every server must serve the same model, or the one ``expect_model`` names. Nothing
    is dialled until the first use: a server that is not up yet costs nothing here."""

    def __init__(
        self,
        servers: Sequence[str],
        timeout: float,
        connection: dict[str, Any],
        model_name: str = "",
        expect_model: str = "",
    ):
        self.servers, self.timeout, self.connection = list(servers), timeout, connection
        self.model_name, self.expect_model = model_name, expect_model
        self._client = None

    def _rewards(self):
        if self._client is None:
            from pickscore.client import RewardClient

            self._client = RewardClient(
                self.servers,
                max_batch=32,
                max_inflight=4,
                timeout=self.timeout,
                model=self.model_name,
                expect_model=self.expect_model,
                **self.connection,
            )
        return self._client

    @property
    def model(self) -> str:
        """The source of the model that scores, as the servers report it (each asked once): Unavailable naming every
        address when none answers, NotFound naming the model when they do not serve it, Conflict naming what each
        serves when they serve different models."""
        return next(iter(self._rewards().served().values())).source

    @property
    def identities(self) -> dict[str, str]:
        from pickscore.client.fleet import by_name

        return by_name(self._rewards().served())

    @property
    def name(self) -> str:
        return f"{self.model} on {','.join(self.servers)}"

    def submit(self, prompt: str, image: Any) -> Future:
        """One image, to be sent in a batch to the best server; a Future of its score."""
        return self._rewards().submit(prompt, image)

    def score_all(
        self, prompt: str, images: Sequence[Any], skip_invalid: bool = False, progress: bool = False
    ) -> Scores:
        if not images:
            raise InvalidInput("no images given")
        futures = [self.submit(prompt, image) for image in images]
        scores = np.full(len(images), np.nan, np.float32)
        errors: dict[int, PickScoreError] = {}
        from tqdm import tqdm

        for i, future in enumerate(tqdm(futures, unit="img", disable=not progress or None, file=sys.stderr)):
            try:
                scores[i] = future.result()
            except InvalidInput as e:  # named by its place in ``images``; anything else (an outage) raises
                errors[i] = InvalidInput(item_renamed(e, describe_item(i, images[i])))
                if not skip_invalid:
                    raise errors[i] from None
        return scores, errors

    async def score_async(self, prompt: str, images: Sequence[Any]) -> list[float]:
        futures = [asyncio.wrap_future(self.submit(prompt, image)) for image in images]
        return list(await asyncio.gather(*futures))

    def prepare(self, rows: list[Row]) -> tuple[dict[int, str], dict[int, Future]]:
        """Submit the shard's rows (sent while the shard before it is collected); a row's image file is read
        here, by the reader the in-process path uses, so one that cannot be read fails its row alike."""
        from pickscore.model.preprocess import read_image_bytes

        errors = {i: r.error for i, r in enumerate(rows) if r.error}
        futures = {}
        for i in (i for i in range(len(rows)) if i not in errors):
            try:
                image = read_image_bytes(rows[i].image if rows[i].image is not None else rows[i].path)
            except InvalidInput as e:
                errors[i] = str(e)
                continue
            futures[i] = self.submit(rows[i].prompt, image)
        return errors, futures

    def complete(self, rows: list[Row], prepared) -> ShardResult:
        errors, futures = prepared
        scores = np.full(len(rows), np.nan, np.float32)
        for i, future in futures.items():
            try:
                scores[i] = future.result()
            except InvalidInput as e:  # this row's image; anything else (an outage) stops the job, resumably
                errors[i] = item_reason(e)
        return scores, errors, {}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
