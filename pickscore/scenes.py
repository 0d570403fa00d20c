"""Drawn scenes that a caption describes exactly: the synthetic world of the demo model and export checks.

    rng = random.Random(0)
    scene = random_scene(rng)                   # Scene(count=2, colour="red", shape="circle", ...)
    scene.caption                               # "two red circles on the left, blue background"
    image = render(scene, 224, rng)             # a PIL RGB image of it
    other = vary(scene, changes=2, rng=rng)     # the same scene with two attributes changed

A scene has five attributes (count, colour, shape, position, background); the number two scenes share is how
well an image of one matches the other's caption. Training data (``pickscore data synthetic``) builds
preference pairs on this, and the exporters verify exports on rendered scenes with their captions.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 210, 30),
    "purple": (130, 40, 170),
    "orange": (250, 130, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "pink": (250, 175, 200),
}
COUNTS = {1: "one", 2: "two", 3: "three"}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
BACKGROUNDS = ("white", "black", "gray", "pink", "blue", "green")
POSITIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Where the shapes go, as (x0, y0, x1, y1) fractions of the image; no region reaches the (0, 0) corner,
# so that pixel always shows the background.
REGIONS = {
    "left": (0.0, 0.15, 0.45, 0.85),
    "right": (0.55, 0.15, 1.0, 0.85),
    "top": (0.15, 0.0, 0.85, 0.45),
    "bottom": (0.15, 0.55, 0.85, 1.0),
    "center": (0.25, 0.25, 0.75, 0.75),
}


def _polygon(points: int, inner: float = 1.0) -> tuple[tuple[float, float], ...]:
    """Vertices in the unit square, alternating outer and ``inner`` radius (1.0: a regular polygon)."""
    n = points * (1 if inner == 1.0 else 2)
    radius = [0.5, 0.5 * inner]
    return tuple(
        (
            0.5 + radius[k % 2] * math.cos(2 * math.pi * k / n - math.pi / 2),
            0.5 + radius[k % 2] * math.sin(2 * math.pi * k / n - math.pi / 2),
        )
        for k in range(n)
    )


# Each shape is a polygon in the unit square, scaled into its box when drawn.
SHAPES = {
    "circle": _polygon(32),
    "square": ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "star": _polygon(5, inner=0.4),
}
ATTRIBUTES = ("count", "colour", "shape", "position", "background")
CHOICES = {
    "count": tuple(COUNTS),
    "colour": COLOURS,
    "shape": tuple(SHAPES),
    "position": tuple(POSITIONS),
    "background": BACKGROUNDS,
}


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for, or what an image shows. The shape colour never equals the background."""

    count: int
    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        return f"{COUNTS[self.count]} {self.colour} {noun} {POSITIONS[self.position]}, {self.background} background"

    def matches(self, other: Scene) -> int:
        """How many of the five attributes agree (0-5)."""
        return sum(getattr(self, a) == getattr(other, a) for a in ATTRIBUTES)


def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image; ``rng`` jitters shape sizes and positions."""
    img = Image.new("RGB", (size, size), PALETTE[scene.background])
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = (v * size for v in REGIONS[scene.position])
    # Line the shapes up along the region's long side in square cells, the row centred in the region, so
    # that where the shapes sit says which region they are in (a lone shape "on the left" is not drawn in
    # the corner that "at the top" also reaches).
    along_x = x1 - x0 >= y1 - y0
    long_side, short_side = (x1 - x0, y1 - y0) if along_x else (y1 - y0, x1 - x0)
    cell = min(long_side / scene.count, short_side)
    start = (long_side - cell * scene.count) / 2
    for i in range(scene.count):
        side = cell * rng.uniform(0.6, 0.9)
        along = start + i * cell + rng.uniform(0, cell - side)
        across = (short_side - cell) / 2 + rng.uniform(0, cell - side)
        left, top = (x0 + along, y0 + across) if along_x else (x0 + across, y0 + along)
        draw.polygon([(left + u * side, top + v * side) for u, v in SHAPES[scene.shape]], fill=PALETTE[scene.colour])
    return img


def random_scene(rng: random.Random) -> Scene:
    """A scene with every attribute drawn at random (shape colour never the background's)."""
    colour = rng.choice(COLOURS)
    return Scene(
        count=rng.choice(tuple(COUNTS)),
        colour=colour,
        shape=rng.choice(tuple(SHAPES)),
        position=rng.choice(tuple(POSITIONS)),
        background=rng.choice([b for b in BACKGROUNDS if b != colour]),
    )


def vary(prompt: Scene, changes: int, rng: random.Random) -> Scene:
    """``prompt`` with exactly ``changes`` attributes set to other values, keeping colour and background apart."""
    scene = prompt
    for attribute in rng.sample(ATTRIBUTES, changes):
        clash = {"colour": scene.background, "background": scene.colour}.get(attribute)
        options = [v for v in CHOICES[attribute] if v != getattr(prompt, attribute) and v != clash]
        scene = replace(scene, **{attribute: rng.choice(options)})
    return scene
