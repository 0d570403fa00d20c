"""`--decode-on-device` against the exact preprocessing: how often rankings agree, and what each costs.

    python benchmarks/device_decode_bench.py                         # the demo model, on the CPU
    python benchmarks/device_decode_bench.py --device cuda --model DIR

Best-of-8 sets of drawn scenes (one caption each, candidates that change 0-5 of its attributes), saved as JPEGs,
are cropped both ways -- Pillow exactly as transformers does, and torchvision on the device (nvJPEG on a GPU) --
and scored by the same model. Reports the fraction of candidate pairs ordered alike, how often the best
candidate is the same, the largest score difference, and images/s of one thread cropping each way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, best_of_8, machine  # noqa: E402


def rate(crop, blobs: list[bytes], seconds: float = 3.0) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        crop(blobs[n % len(blobs)])
        n += 1
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="demo", help="model reference to score with (default: the bundled demo)")
    p.add_argument("--device", default="cpu", help="torch device decoding and scoring (default cpu)")
    p.add_argument("--sets", type=int, default=200, help="best-of-8 sets (default 200)")
    p.add_argument("--side", type=int, default=512, help="JPEG side in pixels (default 512)")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    from pickscore.backends import load_backend
    from pickscore.exporter.verify import pairs_ordered_alike
    from pickscore.model.device_decode import crop_on_device
    from pickscore.model.preprocess import DEFAULT_MAX_PIXELS, load_uint8

    backend = load_backend(args.model, "torch", args.device, "fp32")
    cfg = backend.preprocess

    def exact(b):
        return load_uint8(b, cfg)

    def on_device(b):
        return crop_on_device(b, cfg, args.device, DEFAULT_MAX_PIXELS)

    agree = pairs = same_best = 0
    worst = 0.0
    data = best_of_8(args.sets, args.side)
    for caption, blobs in tqdm(data, desc="sets", unit="set"):
        text = backend.encode_text(backend.tokenizer([caption]))[0]
        a = backend.logit_scale * backend.encode_image(np.stack([exact(b) for b in blobs])) @ text
        b = backend.logit_scale * backend.encode_image(np.stack([on_device(x) for x in blobs])) @ text
        alike, n = pairs_ordered_alike(a, b)
        agree, pairs = agree + alike, pairs + n
        same_best += int(np.argmax(a) == np.argmax(b))
        worst = max(worst, float(np.abs(a - b).max()))
    sample = [blob for _, blobs in data[:8] for blob in blobs]
    exact_rate, device_rate = rate(exact, sample), rate(on_device, sample)

    table = "\n".join(
        [
            "| measure | value |",
            "|---|---:|",
            f"| candidate pairs ordered alike ({pairs} pairs) | {agree / pairs:.4f} |",
            f"| sets with the same best candidate ({len(data)} sets) | {same_best / len(data):.4f} |",
            f"| largest score difference (logit scale) | {worst:.4f} |",
            f"| exact crop, images/s (one thread) | {exact_rate:.0f} |",
            f"| on-device crop ({args.device}), images/s (one thread) | {device_rate:.0f} |",
        ]
    )
    print(table)
    if not args.no_append:
        append_results(
            f"Decoding on the device ({args.model}, {args.device}, {args.side} px JPEG, best-of-8)",
            table,
            {
                "machine": machine(),
                "command": "python " + " ".join(["benchmarks/device_decode_bench.py", *(argv or sys.argv[1:])]),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
