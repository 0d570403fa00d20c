"""How long a command takes to start, as a user runs it: `pickscore --help`, and `score --model demo` on 4 drawn images.

    python benchmarks/startup_bench.py --pickscore ENV/bin/pickscore --baseline OLD_ENV/bin/pickscore [--runs 7]

Each command runs as a whole process, the two executables in turn (A B A B ...) so drift hits both alike; medians
and the ratio of medians are appended to RESULTS.md. Give executables installed from wheels (what users run): a
checkout's editable install times the same code but not the same environment.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import append_results, machine

from pickscore.scenes import random_scene, render

PROMPT = "two red circles on the left, blue background"


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pickscore", required=True, help="the pickscore executable to measure (A)")
    parser.add_argument("--baseline", required=True, help="the pickscore executable to compare with (B)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command and executable, after a warm-up")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work, rng = Path(tmp), random.Random(0)
        images = [f"{i}.png" for i in range(4)]
        for name in images:
            render(random_scene(rng), 64, rng).save(work / name)
        commands = {
            "pickscore --help": ["--help"],
            "pickscore score --model demo (4 images)": ["score", "--model", "demo", "--prompt", PROMPT, *images],
        }
        rows = ["| command | A median s | B median s | A/B |", "|---|---:|---:|---:|"]
        for name, tail in commands.items():
            times: dict[str, list[float]] = {"A": [], "B": []}
            for run in range(args.runs + 1):
                for key, exe in (("A", args.pickscore), ("B", args.baseline)):
                    seconds = timed([exe, *tail], work)
                    if run:  # the first round warms the page cache
                        times[key].append(seconds)
            a, b = statistics.median(times["A"]), statistics.median(times["B"])
            rows.append(f"| `{name}` | {a:.2f} | {b:.2f} | {a / b:.2f} |")
            print(rows[-1], flush=True)
    body = "\n".join([f"A: `{args.pickscore}`; B: `{args.baseline}`; {args.runs} runs each, interleaved.", "", *rows])
    append_results("Start-up", body, {"machine": machine(), "command": " ".join(["python", *sys.argv])})


if __name__ == "__main__":
    main()
