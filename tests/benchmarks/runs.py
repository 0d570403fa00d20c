"""What the benchmark tests share: a script of benchmarks/ run as a user would (its small flag, its files under a
temporary --out, its models and servers' files under a temporary TMPDIR, RESULTS.md untouched), its --help, its
functions imported, and the `pickscore serve` processes a run may have left behind."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(tmp_path: Path, script: str, *flags: str, timeout: float = 300) -> Path:
    """Run benchmarks/``script`` with ``flags`` and ``--out tmp_path/out --no-append``, its temporary files under
    tmp_path/work (where servers_under looks) -> the out directory. Fails the test with the script's stderr when it
    exits non-zero."""
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *flags, "--out", str(out), "--no-append"],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(work)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def benchmark_module(name: str):
    """benchmarks/``name``.py imported as a module (benchmarks/ is scripts, not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def help_text(script: str) -> str:
    """benchmarks/``script`` --help's output (it must exit 0)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def servers_under(work: Path) -> list[str]:
    """Command lines of living `pickscore serve` processes whose models lie under ``work``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "serve" in args and any(str(work) in a for a in args):
            found.append(" ".join(args))
    return found
