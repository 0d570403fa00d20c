"""Fetch the wheels a GPU machine without network lacks to run benchmarks/gpu_run.py, into .whl/ (ignored).

    python benchmarks/gpu_wheels.py              # here, with PyPI: .whl/*.whl for CPython 3.12, manylinux x86-64
    # there, in the checkout (no network):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_run.py --out results

The GPU machines' image (docs/GPU.md) has torch, torchvision, numpy, Pillow, aiohttp, msgpack, regex,
safetensors, tqdm, pyarrow, matplotlib, prometheus-client and grpcio; it lacks the gRPC health and reflection
services, tritonclient (the KServe v2 stubs) with python-rapidjson, and py-spy (the serve section's profile).
grpcio and protobuf travel too, at the versions those were generated against. Versions are this environment's
(the ones the tests ran with). The tree and the wheels travel together under the device's 64 MiB limit: the
script fails, naming the sizes, when they would not fit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ["grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection", "tritonclient", "python-rapidjson"]
WHEELS += ["py-spy"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PLATFORMS += ["manylinux_2_5_x86_64", "manylinux1_x86_64"]
LIMIT = 64 << 20  # what travels to the device machine in one call: the tree and the wheels


def tracked_bytes() -> int:
    """Bytes of the files git tracks here (what travels beside the wheels)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--dest", type=Path, default=ROOT / ".whl", help="folder for the wheels (default .whl/)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for stale in args.dest.glob("*.whl"):  # two versions of one package stop the offline install
        stale.unlink()
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(args.dest)]
    cmd += ["--python-version", args.python_version, "--implementation", "cp"]
    cmd += [x for platform in PLATFORMS for x in ("--platform", platform)]
    subprocess.run(cmd + pins, check=True)
    wheels = sorted(args.dest.glob("*.whl"))
    size, tree = sum(w.stat().st_size for w in wheels), tracked_bytes()
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:6.1f} MiB  {w.name}")
    print(f"{size / 2**20:.1f} MiB of wheels + {tree / 2**20:.1f} MiB of tracked files (limit {LIMIT / 2**20:.0f} MiB)")
    if size + tree > LIMIT:
        print("too large to travel in one call: drop a wheel or carry less", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
