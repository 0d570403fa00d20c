"""Where the candidates come from: a pool of pre-generated images, a text-to-image backend over HTTP, or the demo's
drawn scenes; optionally ordered by a served PickScore.

    source = open_source("pool:gens/")              # or "http://gen:9000/generate", or "synthetic"
    left, right = await source.draw("a red fox", 2, exclude=set())

Every candidate carries its model's name and a provenance dictionary (the source and what it was asked), which the
database keeps beside each choice.

The HTTP contract (``HttpSource``), for a team's own generator: ``POST URL`` with the JSON body
``{"prompt": str, "n": int, "seed": int}``; the answer is ``200`` with
``{"images": [{"image": base64 of PNG/JPEG/WebP bytes, "model": str, "params": {...}?}, ...]}`` holding ``n``
images (``params``, when present, is stored as the image's provenance). Anything else is a failed generation:
the page says so and nothing is stored.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from pickscore.collect.store import Candidate, check_image, clean_prompt
from pickscore.datasets.inputs import input_files, read_rows
from pickscore.errors import InvalidInput, PickScoreError, Unavailable
from pickscore.scenes import ATTRIBUTES, CHOICES, Scene, random_scene, render, vary
from pickscore.training.synthetic import Generator, generators, png

GENERATION_TIMEOUT_S = 120.0
GENERATED_LAYOUT = "<model>/<prompt index>/ folders of images (`pickscore data synthetic --models` writes them)"


class Source(Protocol):
    """What the app needs of a candidate source."""

    description: str

    def prompts(self) -> Sequence[str]:
        """Prompts to suggest (a pool's, all of them); empty when any prompt works."""

    async def draw(self, prompt: str, n: int, exclude: set[str]) -> list[Candidate]:
        """``n`` candidates for ``prompt``, none of whose image ids is in ``exclude`` when that can be helped."""


# The demo: drawn scenes ---------------------------------------------------------------------------------


def _every_scene() -> dict[str, Scene]:
    scenes = {}
    for values in itertools.product(*(CHOICES[a] for a in ATTRIBUTES)):
        scene = Scene(**dict(zip(ATTRIBUTES, values)))
        if scene.colour != scene.background:
            scenes[scene.caption] = scene
    return scenes


class SyntheticSource:
    """Three fake generators (pickscore.training.synthetic) drawing the scene a prompt describes.

    A prompt in the scenes' own words ("two red circles on the left, blue background") is drawn as said; any
    other prompt stands for a scene chosen by its hash, so every prompt works. Each image is drawn by a
    generator picked at random, which changes each of the scene's five attributes with its own probability:
    generator-good keeps most, so its images should win most often on the admin page.
    """

    description = "synthetic: drawn scenes from three fake generators (the demo)"

    def __init__(self, image_size: int = 256, seed: int | None = None):
        self.image_size = image_size
        self.generators = generators(3)
        self.scenes = _every_scene()
        self.rng = random.Random(seed)

    def prompts(self) -> Sequence[str]:
        return ()

    def scene(self, prompt: str) -> Scene:
        scene = self.scenes.get(prompt)
        if scene is None:
            scene = random_scene(random.Random(hashlib.sha256(prompt.encode()).digest()))
        return scene

    async def draw(self, prompt: str, n: int, exclude: set[str]) -> list[Candidate]:
        seeds = [(self.rng.choice(self.generators), self.rng.getrandbits(63)) for _ in range(n)]
        return await asyncio.to_thread(lambda: [self._draw(prompt, gen, seed) for gen, seed in seeds])

    def _draw(self, prompt: str, gen: Generator, seed: int) -> Candidate:
        rng = random.Random(seed)
        changes = sum(rng.random() < gen.change for _ in ATTRIBUTES)
        drawn = vary(self.scene(prompt), changes, rng)
        image = png(render(drawn, self.image_size, rng))
        return Candidate(image, gen.name, {"source": "synthetic", "seed": seed, "drew": drawn.caption})


# A pool of pre-generated images -------------------------------------------------------------------------


@dataclass(frozen=True)
class _PoolItem:
    model: str
    where: str
    image: bytes | None  # inside Parquet: held; a manifest's or image_path's file is read when drawn
    path: str | None


class PoolSource:
    """Images made beforehand, read with ``pickscore batch``'s readers: Parquet (``prompt``, ``image`` bytes or
    ``image_path``, ``model``), a directory with ``manifest.jsonl`` (``{"prompt", "image": path, "model"}`` a
    line), or WebDataset shards; or with ``pickscore evaluate-models``' readers, a directory with ``prompts.txt``
    beside ``<model>/<prompt index>/`` folders of images (searched recursively), as ``pickscore data synthetic
    --models`` writes it: each image goes with the prompt on its index's line, and its model is its folder's name.
    A prompt needs at least two images; a pool's prompts are the only ones it can show, and one the app would
    refuse (a control character, too long) is left out. Images inside Parquet files are held in memory; for a
    large pool, give paths (manifest, ``image_path`` or folders), which are read only when drawn."""

    def __init__(self, inputs: Sequence[str], seed: int | None = None):
        self.inputs = list(inputs)
        self.rng = random.Random(seed)
        by_prompt: dict[str, list[_PoolItem]] = defaultdict(list)
        for spec in self.inputs:
            for prompt, item in _pool_items(spec):
                try:
                    by_prompt[clean_prompt(prompt)].append(item)
                except InvalidInput:
                    continue  # a prompt the app refuses cannot be shown
        self.pool = {prompt: items for prompt, items in by_prompt.items() if len(items) >= 2}
        if not self.pool:
            raise InvalidInput(f"--candidates pool:{','.join(self.inputs)}: no prompt with at least two images")
        self.description = f"pool: {sum(map(len, self.pool.values()))} images for {len(self.pool)} prompts"

    def prompts(self) -> Sequence[str]:
        return sorted(self.pool)

    async def draw(self, prompt: str, n: int, exclude: set[str]) -> list[Candidate]:
        items = self.pool.get(prompt)
        if items is None:
            raise InvalidInput(f"prompt {prompt!r}: the pool has no images for it; choose one of its prompts")
        picked = self.rng.sample(items, len(items))
        return await asyncio.to_thread(self._read, picked, n, exclude)

    def _read(self, items: list[_PoolItem], n: int, exclude: set[str]) -> list[Candidate]:
        fresh, seen = [], []
        for item in items:
            data = item.image if item.image is not None else Path(item.path).read_bytes()
            candidate = Candidate(data, item.model, {"source": "pool", "item": item.where})
            (seen if candidate.id in exclude else fresh).append(candidate)
            if len(fresh) == n:
                return fresh
        return (fresh + seen)[:n]  # every image of the prompt has been shown: repeat some


def _pool_items(spec: str) -> list[tuple[str, _PoolItem]]:
    """(prompt, item) for each usable image under one pool path; refusals name ``--candidates``, the app's flag."""
    folder = Path(spec)
    try:
        if (folder / "prompts.txt").is_file() and not (folder / "manifest.jsonl").exists():
            return _generated_items(folder)
        try:
            files = input_files([spec])
        except InvalidInput as e:
            layouts = f"; nor prompts.txt beside {GENERATED_LAYOUT}" if folder.is_dir() else ""
            raise InvalidInput(str(e).removeprefix(f"--input {spec}: ") + layouts) from None
        rows = read_rows(files)
        return [(r.prompt, _PoolItem(r.model or "unknown", r.id, r.image, r.path)) for r in rows if not r.error]
    except InvalidInput as e:
        raise InvalidInput(f"--candidates pool:{spec}: {e}") from None


def _generated_items(folder: Path) -> list[tuple[str, _PoolItem]]:
    """FOLDER/prompts.txt and FOLDER/<model>/<prompt index>/<images>, read as ``pickscore evaluate-models`` reads
    them (the same checks: every prompt has images in every model's folder)."""
    from pickscore.datasets.image_sets import load_image_set
    from pickscore.datasets.prompts import read_prompts

    try:
        prompts = read_prompts(folder / "prompts.txt")
    except InvalidInput as e:
        raise InvalidInput(str(e).removeprefix("--prompts ")) from None
    items = []
    for model in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            images = load_image_set(model.name, model, prompts)
        except InvalidInput as e:
            raise InvalidInput(f"{model}: {str(e).removeprefix(f'--images {model.name}: ')}") from None
        for prompt, found in zip(prompts, images.per_prompt):
            for _, load in found:
                path = load()
                items.append((prompt.text, _PoolItem(model.name, str(path.relative_to(folder)), None, str(path))))
    if not items:
        raise InvalidInput(f"prompts.txt but no {GENERATED_LAYOUT}")
    return items


# A text-to-image backend over HTTP ----------------------------------------------------------------------


class HttpSource:
    """A generator behind ``URL`` (the module docstring has the contract)."""

    def __init__(self, url: str, timeout_s: float = GENERATION_TIMEOUT_S, seed: int | None = None):
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.rng = random.Random(seed)
        self.description = f"http: {url}"

    def prompts(self) -> Sequence[str]:
        return ()

    async def draw(self, prompt: str, n: int, exclude: set[str]) -> list[Candidate]:
        seed = self.rng.getrandbits(31)
        try:
            async with aiohttp.ClientSession(timeout=self.timeout) as session:
                async with session.post(self.url, json={"prompt": prompt, "n": n, "seed": seed}) as response:
                    body = await response.read()
                    if response.status != 200:
                        text = body[:200].decode("utf-8", "replace")
                        raise Unavailable(f"generator {self.url}: HTTP {response.status}: {text}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise Unavailable(f"generator {self.url}: {type(e).__name__}: {e}") from None
        return self._candidates(body, n, seed)

    def _candidates(self, body: bytes, n: int, seed: int) -> list[Candidate]:
        try:
            images = json.loads(body)["images"]
            if not isinstance(images, list) or len(images) != n:
                raise ValueError(f"{n} images asked, {len(images) if isinstance(images, list) else 'no list'} given")
            out = []
            for k, entry in enumerate(images):
                data = base64.b64decode(entry["image"], validate=True)
                check_image(data, f"image {k}")
                params = entry.get("params") or {}
                provenance = {"source": "http", "url": self.url, "seed": seed, "index": k, "params": params}
                out.append(Candidate(data, str(entry.get("model") or "unknown"), provenance))
            return out
        except (ValueError, KeyError, TypeError, InvalidInput) as e:
            raise Unavailable(f"generator {self.url}: answered {e}") from None


# Ordering by a served PickScore -------------------------------------------------------------------------


class PickScoreOrdered:
    """Draws ``pool`` candidates from ``source`` and shows the two a served PickScore finds closest (the pair
    hardest to call), or, when one image stays, the candidate scored closest to it. The pair records the
    server, its model and the scores."""

    def __init__(self, source: Source, server: str, pool: int = 4, connection: dict[str, Any] | None = None):
        from pickscore.places import open_place

        if pool < 2:
            raise InvalidInput(f"--order-pool: at least 2 candidates to order, got {pool}")
        self.source, self.server, self.pool = source, server, pool
        self.place = open_place(servers=[server], timeout=GENERATION_TIMEOUT_S, connection=connection)
        self.description = f"{source.description}; hardest of {pool} by PickScore at {server}"

    def prompts(self) -> Sequence[str]:
        return self.source.prompts()

    async def order(self, prompt: str, kept: Candidate | None, exclude: set[str]) -> tuple[list[Candidate], dict]:
        """Two candidates (``kept`` is given: one, to go beside it) and how they were chosen."""
        need = 1 if kept else 2
        drawn = [c for c in distinct(await self.source.draw(prompt, self.pool, exclude)) if not kept or c.id != kept.id]
        fresh = [c for c in drawn if c.id not in exclude]
        drawn = fresh if len(fresh) >= need else drawn  # images just shown only when there are too few others
        if len(drawn) < need:
            return drawn[:need], {"by": "none", "reason": "too few distinct candidates to order"}
        scored = drawn + ([kept] if kept else [])
        try:
            scores = await self.place.score_async(prompt, [c.image for c in scored])
            model = await asyncio.to_thread(lambda: self.place.model)  # asked once, then kept
        except PickScoreError as e:
            # Collecting goes on without ordering; the pair says why.
            return drawn[:need], {"by": "none", "reason": f"PickScore at {self.server}: {e}"}
        if kept is not None:
            target = scores[-1]
            best = min(range(len(drawn)), key=lambda i: abs(scores[i] - target))
            chosen = [best]
        else:
            chosen = list(
                min(itertools.combinations(range(len(drawn)), 2), key=lambda p: abs(scores[p[0]] - scores[p[1]]))
            )
        ordering = {
            "by": "pickscore",
            "strategy": "closest scores",
            "server": self.server,
            "model": model,
            "drawn": [c.id for c in drawn],
            "scores": {c.id: round(s, 6) for c, s in zip(scored, scores)},
        }
        return [drawn[i] for i in chosen], ordering

    async def close(self) -> None:
        await asyncio.to_thread(self.place.close)


def distinct(candidates: list[Candidate]) -> list[Candidate]:
    """``candidates`` without repeated images, first of each kept."""
    seen: dict[str, Candidate] = {}
    for c in candidates:
        seen.setdefault(c.id, c)
    return list(seen.values())


def open_source(spec: str, image_size: int = 256, seed: int | None = None) -> Source:
    """``synthetic``, ``pool:PATH[,PATH...]`` (or a bare existing path), or ``http(s)://...``."""
    if spec == "synthetic":
        return SyntheticSource(image_size, seed)
    if spec.startswith(("http://", "https://")):
        return HttpSource(spec, seed=seed)
    paths = spec.removeprefix("pool:").split(",")
    if spec.startswith("pool:") or all(Path(p).exists() for p in paths):
        return PoolSource(paths, seed)
    raise InvalidInput(
        f"--candidates {spec}: not 'synthetic', an http(s):// generator, or pool:PATH (no such file or directory)"
    )
