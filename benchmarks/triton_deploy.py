"""A plain Triton Inference Server deployment of the benchmark's model, and what measures servers side by side.

    repo = write_repository(model_dir, tmp / "repo")        # config.pbtxt + model.py (triton_model.py)
    proc, address = start_triton(repo, find_tritonserver(env))
    cpu = CpuMeter(proc.pid, cores); ...; cpu.utilisation()   # of the cores, the whole process tree

Triton comes from the ``nvidia-pytriton`` wheel, which ships the ``tritonserver`` binary, the Python backend and
its stubs for each Python version, and runs on a CPU. It cannot share pickscore's environment (it pins
numpy<2, and its tritonclient protobuf<7, where pickscore's stubs need protobuf 7), so it lives in one of its
own: ``python -m venv triton-venv && triton-venv/bin/pip install nvidia-pytriton``. Only its binaries are used:
the model runs in the stub with this interpreter and this environment's torch, transformers and Pillow, so
both servers run the same libraries on the same model files.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from common import tree_cpu_seconds

HERE = Path(__file__).resolve().parent

CONFIG = """name: "clip"
backend: "python"
max_batch_size: {max_batch}
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [{{ count: {instances} kind: KIND_CPU }}]
input [
  {{ name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }}
]
output [ {{ name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }} ]
parameters [
  {{ key: "model_dir" value: {{ string_value: "{model_dir}" }} }},
  {{ key: "torch_threads" value: {{ string_value: "{torch_threads}" }} }},
  {{ key: "decode_threads" value: {{ string_value: "{decode_threads}" }} }}
]
"""


def write_repository(
    model_dir: Path,
    out: Path,
    max_batch: int = 64,
    delay_ms: float = 5.0,
    instances: int = 1,
    torch_threads: int = 2,
    decode_threads: int = 2,
) -> Path:
    """A model repository holding ``clip``: triton_model.py as its model.py, and its config.pbtxt."""
    (out / "clip" / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "triton_model.py", out / "clip" / "1" / "model.py")
    (out / "clip" / "config.pbtxt").write_text(
        CONFIG.format(
            max_batch=max_batch,
            delay_us=int(delay_ms * 1000),
            instances=instances,
            model_dir=Path(model_dir).resolve(),
            torch_threads=torch_threads,
            decode_threads=decode_threads,
        )
    )
    return out


def find_tritonserver(env: str | None) -> Path:
    """The ``pytriton/tritonserver`` directory of nvidia-pytriton: in the environment (a virtualenv's directory)
    ``env``, else importable here. FileNotFoundError saying how to install it."""
    roots = glob.glob(os.path.join(env, "lib", "python3*", "site-packages")) if env else list(sys.path)
    for root in roots:
        candidate = Path(root) / "pytriton" / "tritonserver"
        if (candidate / "bin" / "tritonserver").exists():
            return candidate
    raise FileNotFoundError(
        f"no nvidia-pytriton in {env or 'this environment'}: python -m venv triton-venv && "
        "triton-venv/bin/pip install nvidia-pytriton, then --triton triton-venv"
    )


def _backends(home: Path, out: Path) -> Path:
    """A backend directory whose Python backend uses the stub built for this interpreter's version."""
    python = out / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        target = python / name
        if not target.exists():
            target.symlink_to(home / "backends" / "python" / name)
    stub = home / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    target = python / "triton_python_backend_stub"
    if not target.exists():
        target.symlink_to(stub / "triton_python_backend_stub")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stub_env(home: Path, out: Path) -> Path:
    """A virtual environment for the Python stub, whose interpreter finds its packages through the ``python3``
    first on PATH (it ignores PYTHONPATH): the Triton environment's numpy (1.x: the stubs are built against
    numpy 1's ABI and garble BYTES tensors under numpy 2; torch, built against numpy 2, runs on either), then,
    through a .pth file, this environment's packages (torch, transformers, Pillow)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = out / "lib" / version / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    for name in ("numpy", "numpy.libs"):
        if (home.parent.parent / name).exists() and not (site / name).exists():
            (site / name).symlink_to(home.parent.parent / name)
    ours = [p for p in sys.path if p.endswith("site-packages")]
    (site / "benchmark.pth").write_text("\n".join(ours) + "\n")
    (out / "bin").mkdir(exist_ok=True)
    for name in ("python3", "python"):
        if not (out / "bin" / name).exists():
            (out / "bin" / name).symlink_to(Path(sys.base_prefix) / "bin" / version)
    (out / "pyvenv.cfg").write_text(f"home = {Path(sys.base_prefix) / 'bin'}\ninclude-system-site-packages = false\n")
    return out


def start_triton(repo: Path, home: Path, timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    """tritonserver on loopback (gRPC only) serving ``repo``, with this interpreter's environment in its Python
    stub (numpy from the Triton environment, see ``_stub_env``) -> (process, gRPC address) once the model is ready."""
    import tritonclient.grpc as grpcclient

    port = _free_port()
    backends = _backends(home, repo.parent / "backends")
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH", "")])),
        "PYTHONHOME": sys.base_prefix,
        "PATH": os.pathsep.join([str(_stub_env(home, repo.parent / "stub-env") / "bin"), os.environ["PATH"]]),
    }
    cmd = [
        str(home / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        "--allow-http=false",
        "--allow-metrics=false",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={port}",
        "--log-verbose=0",
        "--exit-timeout-secs=5",
    ]
    log = open(repo.parent / "tritonserver.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    client = grpcclient.InferenceServerClient(address)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {proc.returncode}: {(repo.parent / 'tritonserver.log')}")
        try:
            if client.is_model_ready("clip"):
                return proc, address
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"tritonserver did not get ready in {timeout_s:.0f} s: {repo.parent / 'tritonserver.log'}")


def triton_caller(address: str):
    """-> (an async ``call(prompt, blobs)`` scoring one best-of-N request on Triton, the client to close)."""
    import numpy as np
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(address)

    async def call(prompt: str, blobs: list[bytes]) -> np.ndarray:
        n = len(blobs)
        p = aioclient.InferInput("PROMPT", [n, 1], "BYTES")
        p.set_data_from_numpy(np.array([[prompt.encode()]] * n, dtype=object))
        i = aioclient.InferInput("IMAGE", [n, 1], "BYTES")
        i.set_data_from_numpy(np.array([[b] for b in blobs], dtype=object))
        result = await client.infer("clip", [p, i], outputs=[aioclient.InferRequestedOutput("SCORE")])
        return result.as_numpy("SCORE")

    return call, client


class CpuMeter:
    """CPU a process tree used over a window, as a fraction of ``cores`` busy: (CPU seconds / wall) / cores."""

    def __init__(self, pid: int, cores: int):
        self.pid, self.cores = pid, cores
        self.start()

    def start(self) -> None:
        self.cpu0, self.t0 = tree_cpu_seconds(self.pid), time.perf_counter()

    def utilisation(self) -> float:
        return (tree_cpu_seconds(self.pid) - self.cpu0) / (time.perf_counter() - self.t0) / self.cores
