"""The README's examples run, in order, as a user would type them: every ```bash and ```python block.

They run in one fresh directory with this environment's ``bin`` first on PATH, against what a reader would have:
the bundled demo model, a tiny random CLIP in the published layout standing in for ``./PickScore_v1`` (and, in a
Hugging Face cache, for the hub id), drawn-scene images under the names the examples use, and a running
``pickscore serve --model pickscore=demo --model other=./PickScore_v1 --model-control-mode explicit`` whose free
ports replace the defaults the examples name (8001, 8000, 8002).

A block that cannot run here says so on the line above it: ``<!-- not run: REASON -->`` (a server that does not
return, a GPU, the network, a cluster). ```console and ```text blocks show output and are not run.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pickscore.scenes import random_scene, render
from tests.conftest import make_hf_clip, save_hf_clip

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUN = ("bash", "python")
NOT_RUN = re.compile(r"<!-- not run: (\S.*) -->")
FENCE = re.compile(r"^```(\w*)\s*$")
IMAGE_NAMES = ("a.png", "b.jpg", "c.webp", "a.jpg", "cat.jpg")
IMAGE_DIRS = {"img": 3, "images": 3, "shots": 2}
TIMEOUT_S = 300  # one block


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None  # the reason given above it

    @property
    def name(self) -> str:
        return f"README.md:{self.line}:{self.language}"


def readme_blocks(text: str) -> list[Block]:
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = NOT_RUN.search(lines[i - 1]) if i else None
        blocks.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", above and above.group(1)))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.language in RUN and b.not_run is None]


def test_every_example_is_run_or_says_why_not():
    assert len(RUNNABLE) >= 10
    for block in BLOCKS:
        assert block.language in (*RUN, "console", "text", ""), f"{block.name}: unknown block language"
        if block.not_run is not None:
            assert block.language in RUN and len(block.not_run) > 10, f"{block.name}: a reason, for a runnable block"


def _picture(path: Path, rng: random.Random) -> None:
    image = render(random_scene(rng), 96, rng)
    buffer = io.BytesIO()
    image.save(buffer, {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix])
    path.write_bytes(buffer.getvalue())


def _hub_cache(cache: Path, repo_id: str, model_dir: Path) -> None:
    """``model_dir`` as the Hugging Face cache holds a downloaded ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The reader's directory, the environment the blocks run with, and the ports that replace the defaults."""
    from tests.server.test_sigterm import start_server

    home = tmp_path_factory.mktemp("reader")
    rng = random.Random(0)
    for name in IMAGE_NAMES:
        _picture(home / name, rng)
    for directory, count in IMAGE_DIRS.items():
        (home / directory).mkdir()
        for i in range(count):
            _picture(home / directory / f"{i}.png", rng)
    save_hf_clip(make_hf_clip(), home / "PickScore_v1")
    _hub_cache(home / "hub", "yuvalkirstain/PickScore_v1", home / "PickScore_v1")
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKSCORE_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE="1")
    models = f"pickscore=demo,other={home / 'PickScore_v1'}"
    proc, serving, _ = start_server(models, "--model-control-mode", "explicit")
    ports = {"8001": serving["port"], "8000": serving["http_port"], "8002": serving["metrics_port"]}
    yield home, env, ports
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def _with_ports(code: str, ports: dict[str, int]) -> str:
    return re.sub(r"\b(localhost|127\.0\.0\.1):(800[012])\b", lambda m: f"{m.group(1)}:{ports[m.group(2)]}", code)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_readme_example_runs(block, workspace):
    home, env, ports = workspace
    code = _with_ports(block.code, ports)
    command = ["bash", "-euo", "pipefail", "-c", code] if block.language == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, (
        f"{block.name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
