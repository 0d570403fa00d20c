"""What users install: the sdist and the wheel built from it, installed outside the repository.

Two installs, each in a fresh virtual environment under a temporary directory, run from there (no editable install,
no repository on ``sys.path``):

- **client only**: ``pip install pickscore-*.whl`` resolved by pip from the package index, as a user's would be.
  It must not bring torch, onnxruntime, a database or plotting packages, and its ``RewardClient`` and ``pickscore
  score --server`` score against a running server.
- **everything** (``[serve,export,collect]``): the wheel installed without dependencies, and beside it exactly the
  distributions its declared requirements close over, linked from this test environment (a second 5 GB copy of
  torch per run would buy nothing: what this proves is that the wheel carries every file it reads at run time and
  declares every distribution it imports). From there: ``--help``, ``score --model demo``, ``serve`` until
  SERVING with one Score and SIGTERM, ``export onnx`` and ``batch``.
- **collecting** (``[collect]``, the same way): no torch, and ``collect`` runs until its choice page renders.
"""

from __future__ import annotations

import email.parser
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from packaging.requirements import Requirement

from pickscore.scenes import random_scene, render
from tests.collect.conftest import Visitor

ROOT = Path(__file__).resolve().parent.parent
FULL_EXTRAS = ("serve", "export", "collect")
PROMPT = "two red circles on the left, blue background"
CLIENT_SCRIPT = """
import sys
from pickscore.client import RewardClient
for address in sys.argv[1:3]:  # gRPC, then HTTP
    with RewardClient(address) as rewards:
        print(rewards.submit_group(sys.argv[3], sys.argv[4:]).result())
"""


def _tracked_files(under: str = ".") -> list[str]:
    """The repository's files as a fresh clone holds them (git's list when there is one), relative to its root."""
    try:
        out = subprocess.run(["git", "ls-files", under], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        ignored = {".git", ".venv", ".tools", "build", "dist", "__pycache__", "pickscore.egg-info"}
        return [
            str(p.relative_to(ROOT))
            for p in (ROOT / under).rglob("*")
            if p.is_file() and not ignored & set(p.relative_to(ROOT).parts)
        ]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """``python -m build`` on a clean copy of the tracked files (a checkout's stale egg-info or build/ would supply
    files the package data leaves out): the sdist, then the wheel built from the unpacked sdist, as pip builds
    from PyPI."""
    checkout, out = tmp_path_factory.mktemp("checkout"), tmp_path_factory.mktemp("dist")
    for name in _tracked_files():
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, checkout / name)
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(checkout)],
        check=True,
        capture_output=True,
    )
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_sdist_and_wheel_hold_every_package_file(dist):
    with zipfile.ZipFile(dist["wheel"]) as z:
        in_wheel = set(z.namelist())
    with tarfile.open(dist["sdist"]) as t:
        in_sdist = {name.split("/", 1)[1] for name in t.getnames() if "/" in name}
    tracked = _tracked_files("pickscore")
    assert any(f.endswith(".html") for f in tracked) and any(f.endswith(".safetensors") for f in tracked)
    assert [f for f in tracked if f not in in_sdist] == []
    assert [f for f in tracked if f not in in_wheel] == []


def _venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin"


def _run(bin_dir: Path, *args: str, cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _images(directory: Path, count: int) -> list[Path]:
    """Drawn scenes, the pictures the demo model was trained on, as PNG files."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paths = []
    for i in range(count):
        path = directory / f"{i}.png"
        render(random_scene(rng), 64, rng).save(path)
        paths.append(path)
    return paths


# A client-only install -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_env(dist, tmp_path_factory) -> Path:
    bin_dir = _venv(tmp_path_factory.mktemp("client") / "venv")
    done = _run(bin_dir, "python", "-m", "pip", "install", "--quiet", str(dist["wheel"]), cwd=bin_dir)
    assert done.returncode == 0, done.stderr
    return bin_dir


def test_client_install_is_light_and_scores_against_a_server(client_env, tmp_path):
    from tests.server.test_sigterm import start_server

    size = sum(f.stat().st_size for f in client_env.parent.rglob("*") if f.is_file())
    print(f"client-only environment: {size / 2**20:.0f} MiB")  # README, "Install"
    for heavy in ("torch", "onnxruntime", "sqlalchemy", "matplotlib", "PIL", "pyarrow"):
        done = _run(client_env, "python", "-c", f"import {heavy}", cwd=tmp_path)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, heavy
    images = _images(tmp_path / "img", 2)
    missing = _run(client_env, "pickscore", "score", "--model", "demo", "--prompt", "x", "img", cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()]  # one line, no traceback
    assert "pip install 'pickscore[serve]'" in missing.stderr

    proc, serving, _ = start_server("demo")
    try:
        grpc_address, http_address = f"127.0.0.1:{serving['port']}", f"http://127.0.0.1:{serving['http_port']}"
        done = _run(
            client_env, "python", "-c", CLIENT_SCRIPT, grpc_address, http_address, PROMPT, *images, cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr
        by_grpc, by_http = done.stdout.strip().splitlines()
        assert by_grpc == by_http and len(by_grpc.strip("[]").split()) == 2
        command = ("pickscore", "rank", "--server", grpc_address, "--prompt", PROMPT, "--json", "img")
        done = _run(client_env, *command, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert sorted(r["image"] for r in json.loads(done.stdout)["results"]) == ["img/0.png", "img/1.png"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


# Everything, from the wheel ------------------------------------------------------------------------------------


def _wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        headers = email.parser.Parser().parsestr(z.read(name).decode())
    return [Requirement(r) for r in headers.get_all("Requires-Dist") or []]


def _wanted(req: Requirement, extras: set[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""})


def _closure(wheel: Path, extras: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """The installed distributions that ``pickscore[extras]``'s declared requirements reach, by name."""
    requirements = _wheel_requirements(wheel)
    ours = set(extras)
    while True:  # the extras' own references to other extras of pickscore ("pickscore[serve]")
        more = {e for r in requirements if r.name == "pickscore" and _wanted(r, ours) for e in r.extras}
        if more <= ours:
            break
        ours |= more
    found: dict[str, metadata.Distribution] = {}
    todo = [(r.name, set(r.extras)) for r in requirements if r.name != "pickscore" and _wanted(r, ours)]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        key = (name.lower().replace("_", "-"), frozenset(wanted))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)  # declared but not installed here: PackageNotFoundError, a test failure
        found[key[0]] = dist
        todo += [(r.name, set(r.extras)) for r in map(Requirement, dist.requires or []) if _wanted(r, wanted)]
    return found


def _installed(wheel: Path, root: Path, extras: tuple[str, ...]) -> Path:
    """A fresh venv with the wheel and, on a .pth path, links to exactly the distributions ``pickscore[extras]``
    declares -> its bin directory."""
    bin_dir = _venv(root / "venv")
    done = _run(bin_dir, "python", "-m", "pip", "install", "--quiet", "--no-deps", str(wheel), cwd=root)
    assert done.returncode == 0, done.stderr
    deps = root / "deps"
    deps.mkdir()
    for dist_ in _closure(wheel, extras).values():
        site = Path(dist_.locate_file(""))
        for top in {Path(f).parts[0] for f in dist_.files or [] if not str(f).startswith("..")}:
            if (site / top).exists() and not (deps / top).exists() and not top.endswith(".pth"):
                (deps / top).symlink_to(site / top)
    purelib = _run(bin_dir, "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root)
    Path(purelib.stdout.strip(), "dependencies.pth").write_text(f"{deps}\n")
    where = _run(bin_dir, "python", "-c", "import pickscore, sys; print(pickscore.__file__)", cwd=root)
    assert Path(where.stdout.strip()).is_relative_to(root / "venv"), where
    return bin_dir


@pytest.fixture(scope="module")
def full_env(dist, tmp_path_factory) -> Path:
    return _installed(dist["wheel"], tmp_path_factory.mktemp("full"), FULL_EXTRAS)


@pytest.fixture(scope="module")
def collect_env(dist, tmp_path_factory) -> Path:
    """What a team collecting preferences installs: pickscore[collect], no torch."""
    return _installed(dist["wheel"], tmp_path_factory.mktemp("collect"), ("collect",))


def test_wheel_scores_exports_and_batches(full_env, tmp_path):
    assert _run(full_env, "pickscore", "--help", cwd=tmp_path).returncode == 0
    images = _images(tmp_path / "img", 4)
    done = _run(full_env, "pickscore", "score", "--model", "demo", "--prompt", PROMPT, "--json", "img", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["results"]) == 4

    done = _run(full_env, "pickscore", "export", "onnx", "--model", "demo", "--out", "onnx", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = _run(full_env, "pickscore", "score", "--model", "onnx", "--prompt", PROMPT, "--json", "img", cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    rows = [{"prompt": PROMPT, "image": p.read_bytes(), "id": p.name} for p in images]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    done = _run(
        full_env, "pickscore", "batch", "--input", "rows.parquet", "--output", "out", "--model", "demo", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text())["rows"] == 4


def test_wheel_serves_until_sigterm(full_env, tmp_path):
    from pickscore.client import Client
    from tests.server.test_sigterm import start_server

    (image,) = _images(tmp_path, 1)
    proc, serving, _ = start_server("demo", command=(str(full_env / "pickscore"),), cwd=tmp_path)
    try:
        with Client(f"127.0.0.1:{serving['port']}") as client:
            assert len(client.score(PROMPT, [image])) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_wheel_collects_without_torch(collect_env, tmp_path):
    assert _run(collect_env, "python", "-c", "import torch", cwd=tmp_path).returncode != 0
    args = ("pickscore", "collect", "--db", str(tmp_path / "c.db"), "--port", "0", "--image-size", "64")
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{collect_env}:{os.environ['PATH']}"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stderr:
            found = re.search(r"collect: (http://[^ ]+/) ", line)
            if found:
                break
        else:
            raise AssertionError(f"collect exited with {proc.wait()} before listening")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
        visitor = Visitor(found.group(1).rstrip("/"))
        assert visitor.get("/healthz") and visitor.status == 200
        visitor.sign_in("ada")
        visitor.post("/prompt", prompt=PROMPT)
        assert visitor.status == 200 and visitor.pair is not None, visitor.body[:500]
        assert "collect.css" in visitor.body
        visitor.get("/static/collect.css")
        assert visitor.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
