"""Each kind of scorer at its published shape: in process, served, and one Rewards request over all four.

    python benchmarks/kinds_bench.py            # full size, random weights (about 12 min on 2 cores)
    python benchmarks/kinds_bench.py --smoke    # tiny shapes, small images, one run: under a minute

The four kinds at the shapes their authors publish, with random weights, each written in its published file layout
(speed does not depend on the weights):
  pickscore     PickScore_v1: CLIP ViT-H-14, Hugging Face layout (transformers' CLIPImageProcessor preprocessing)
  hps           HPS v2: open_clip ViT-H-14 under "state_dict" in HPS_v2_compressed.pt (no config: the loader's
                default, as published)
  aesthetic     the LAION aesthetic predictor v2: MLP(768) in sac+logos+ava1-l14-linearMSE.pth, OpenAI CLIP ViT-L/14
                (Hugging Face layout) in clip/
  image_reward  ImageReward: BLIP ViT-L/16 and BERT-base with cross-attention and MLP(768) in ImageReward.pt,
                med_config.json, a vocab.txt of bert-base-uncased's size (30,522 pieces)
The last three preprocess alike (torchvision's resize and crop to 224 px, CLIP's mean and std), PickScore its own way.

Measured in fp32 on this CPU on best-of-8 sets: 8 JPEGs of --image-side px of drawn scenes, the caption as prompt.
  in process  one Scorer per kind, loaded alone and freed before the next: images/s over --sets sets after one
              warm-up set, median of --runs runs
  served      one `pickscore serve --model pickscore=DIR --model hps=DIR ...` hosting all four (default flags, image
              cache off): each set scored by the four models one after another (four Score requests, as a trainer
              calling four reward functions) and by one Rewards request over all four (weight 1 each); in each run
              both on the same sets and prompts, the order alternating between runs. Reported: images/s of each
              model's Score requests, of the four in turn and of the Rewards request (medians over --runs), and the
              images the server decoded per image scored (pickscore_images_decoded_total): the four in turn decode
              each image four times, one Rewards request once per preprocessing. Every Rewards reward is checked
              against the sum of the four scores (--tolerance).
Writes JSON and markdown under --out and a section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PER_REQUEST, append_results, best_of_8, git_revision, machine_with_flags, serve, write_outputs  # noqa: E402
from rewards_bench import decoded  # noqa: E402

from pickscore.model import architecture, kinds  # noqa: E402
from pickscore.model.image_reward import ImageReward, TextConfig, TextEncoder, VisionTransformer  # noqa: E402

KINDS = ("pickscore", "hps", "aesthetic", "image_reward")


def _tower(width: int, layers: int, heads: int, **more) -> dict:
    return dict(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads, **more
    )


def _hf_clip(vision: tuple, text: tuple, projection: int, patch: int, act: str) -> dict:
    """CLIPConfig fields: (width, layers, heads) of each tower, MLPs 4x wide, 224 px."""
    return dict(
        projection_dim=projection,
        text_config=_tower(*text, hidden_act=act),
        vision_config=_tower(*vision, patch_size=patch, image_size=224, hidden_act=act),
    )


def _open_clip(embed: int, vision: tuple, text: tuple, patch: int) -> dict:
    """An open_clip model config: (width, layers, head width) of the image tower, (width, layers, heads) of the text."""
    return {
        "embed_dim": embed,
        "vision_cfg": {
            "image_size": 224,
            "width": vision[0],
            "layers": vision[1],
            "head_width": vision[2],
            "patch_size": patch,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text[0], "layers": text[1], "heads": text[2]},
    }


# kind -> its shape. image_reward: BLIP's ViT (width, depth, patch; 64-wide heads), med_config.json's BERT (hidden,
# layers, heads, intermediate), vocab.txt's pieces.
SIZES = {
    "full": {
        "pickscore": _hf_clip((1280, 32, 16), (1024, 24, 16), 1024, 14, "gelu"),  # laion CLIP-ViT-H-14's config
        "hps": kinds.VIT_H_14,  # the loader's default: no config written
        "aesthetic": _hf_clip((1024, 24, 16), (768, 12, 12), 768, 14, "quick_gelu"),  # openai/clip-vit-large-patch14
        "image_reward": {"vision": (1024, 24, 16), "text": (768, 12, 12, 3072), "vocab": 30522},
    },
    "smoke": {
        "pickscore": _hf_clip((32, 2, 4), (32, 2, 4), 16, 32, "gelu"),
        "hps": _open_clip(16, (32, 2, 16), (32, 2, 4), 32),
        "aesthetic": _hf_clip((32, 2, 4), (32, 2, 4), 24, 32, "quick_gelu"),
        "image_reward": {"vision": (64, 2, 32), "text": (32, 2, 4, 64), "vocab": 0},  # vocab 0: what the prompts need
    },
}
HEAD = (1024, 128, 64, 16, 1)  # the MLP the aesthetic predictor and ImageReward put on 768 (here: any) features


def head_state(in_features: int, prefix: str, seed: int) -> dict[str, torch.Tensor]:
    """The predictors' MLP (Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear) as a state dict."""
    torch.manual_seed(seed)
    state, width = {}, in_features
    for index, out_features in zip((0, 2, 4, 6, 7), HEAD):
        layer = torch.nn.Linear(width, out_features)
        state |= {f"{prefix}{index}.weight": layer.weight.detach(), f"{prefix}{index}.bias": layer.bias.detach()}
        width = out_features
    return state


def write_pickscore(cfg: dict, directory: Path, seed: int) -> Path:
    from common import write_clip

    return write_clip(cfg, directory, seed)


def write_hps(cfg: dict, directory: Path, seed: int) -> Path:
    """HPS_v2_compressed.pt ({"state_dict": open_clip names}); an open_clip_config.json only for a shape other than
    ViT-H-14 (the published file has none)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save({"state_dict": architecture.build(cfg).state_dict()}, directory / kinds.HPS_FILES[1])
    if cfg != kinds.VIT_H_14:
        (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return directory


def write_aesthetic(cfg: dict, directory: Path, seed: int) -> Path:
    write_pickscore(cfg, directory / "clip", seed)
    head = head_state(cfg["projection_dim"], "layers.", seed + 1)
    torch.save(head, directory / f"sac+logos+ava1-l14-{kinds.AESTHETIC_SUFFIX}")
    return directory


def vocabulary(size: int, prompts: list[str]) -> list[str]:
    """A vocab.txt of ``size`` pieces (at least what the prompts need): bert-base-uncased's specials first, the
    prompts' words, single characters and their ## continuations, then [unusedN] up to ``size``."""
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(5)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = string.punctuation + string.digits + string.ascii_lowercase
    tokens += [*characters, *(f"##{c}" for c in characters)]
    tokens += sorted({w for p in prompts for w in re.findall(r"[a-z0-9]+", p.lower())})
    tokens = list(dict.fromkeys(tokens))
    return tokens + [f"[unused{i}]" for i in range(5, 5 + max(0, size - len(tokens)))]


def write_image_reward(cfg: dict, directory: Path, seed: int, prompts: list[str]) -> Path:
    """ImageReward.pt (the ImageReward module's keys: blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*),
    med_config.json and vocab.txt, drawn at ``cfg``'s sizes with this package's modules (published names)."""
    from pickscore.model.kinds import MLPHead

    directory.mkdir(parents=True, exist_ok=True)
    tokens = vocabulary(cfg["vocab"], prompts)
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    width, depth, patch = cfg["vision"]
    hidden, layers, text_heads, inner = cfg["text"]
    med = {"architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu", "add_cross_attention": True}
    med |= {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": text_heads}
    med |= {"intermediate_size": inner, "vocab_size": len(tokens) + 2, "encoder_width": width}
    (directory / "med_config.json").write_text(json.dumps(med, indent=2))
    torch.manual_seed(seed)
    visual = VisionTransformer(224, patch, width, depth, width // 64, 4 * width)
    model = ImageReward(
        visual, TextEncoder(TextConfig.from_med_config(med, width)), MLPHead(head_state(hidden, "layers.", seed))
    )
    with torch.no_grad():  # the modules leave these as storage to load into: draw them
        for name, tensor in model.named_parameters():
            if name.endswith(("cls_token", "pos_embed", "word_embeddings.weight", "position_embeddings.weight")):
                tensor.normal_(0.0, 0.02)
    torch.save(model.state_dict(), directory / kinds.IMAGE_REWARD_FILE)
    return directory


def write_models(sizes: dict, root: Path, prompts: list[str], kinds_: tuple[str, ...]) -> dict[str, Path]:
    """Each kind's layout under ``root`` (kept: a directory already there is reused)."""
    writers = {"pickscore": write_pickscore, "hps": write_hps, "aesthetic": write_aesthetic}
    out = {}
    for seed, kind in enumerate(kinds_):
        target, scratch = root / kind, root / f"{kind}.partial"
        if not target.is_dir():
            if kind == "image_reward":
                write_image_reward(sizes[kind], scratch, seed, prompts)
            else:
                writers[kind](sizes[kind], scratch, seed)
            scratch.rename(target)
            gc.collect()
        out[kind] = target
    return out


def in_process(directory: Path, sets: list, runs: int) -> dict:
    """One kind in a Scorer (fp32, CPU): one warm-up set, then images/s of every set, ``runs`` times."""
    from pickscore import Scorer

    scorer = Scorer.from_pretrained(directory, device="cpu", dtype="fp32")
    try:
        scorer.score(sets[0][0], sets[0][1])
        rates = []
        for run in range(runs):
            start = time.perf_counter()
            for prompt, blobs in sets:
                scorer.score(f"r{run} {prompt}", blobs)
            rates.append(len(sets) * PER_REQUEST / (time.perf_counter() - start))
    finally:
        scorer.close()
        del scorer
        gc.collect()
    return {"images_per_s": statistics.median(rates), "runs": rates}


def served(dirs: dict[str, Path], sets: list, runs: int) -> dict:
    """All kinds in one server: each set scored by the models in turn and by one Rewards request (the docstring)."""
    from pickscore.client import Client

    flags = [a for kind, directory in dirs.items() for a in ("--model", f"{kind}={directory}")]
    proc, entry = serve(*flags[1:])  # serve() writes the first --model itself
    address, metrics = f"127.0.0.1:{entry['port']}", entry["metrics_port"]
    clients = {kind: Client(address, model=kind, timeout=3600) for kind in dirs}
    try:
        sides = {"in_turn": _in_turn(clients), "rewards": _rewards(clients[next(iter(dirs))], list(dirs))}
        for side in sides.values():
            side(f"warm-up {sets[0][0]}", sets[0][1])
        measured: dict[str, list[dict]] = {"in_turn": [], "rewards": []}
        for run in range(runs):  # the order alternates: neither side always finds the other's text encoded
            for name in ("in_turn", "rewards") if run % 2 == 0 else ("rewards", "in_turn"):
                measured[name].append(_measure(sides[name], sets, f"r{run}", metrics))
    finally:
        for client in clients.values():
            client.close()
        proc.terminate()
        proc.wait(60)
    return _served_summary(measured, list(dirs))


def _in_turn(clients: dict):
    """Score one set with each model, one request after another -> ({model: scores}, {model: seconds})."""

    def call(prompt: str, blobs: list[bytes]):
        scores, seconds = {}, {}
        for name, client in clients.items():
            start = time.perf_counter()
            scores[name] = np.asarray(client.score(prompt, blobs), np.float64)
            seconds[name] = time.perf_counter() - start
        return scores, seconds

    return call


def _rewards(client, names: list[str]):
    """One Rewards request over every model, weight 1 each -> ({"sum": rewards}, {"sum": seconds})."""

    def call(prompt: str, blobs: list[bytes]):
        start = time.perf_counter()
        rewards = client.rewards(prompt, blobs, models={name: 1.0 for name in names}).rewards
        return {"sum": np.asarray(rewards, np.float64)}, {"sum": time.perf_counter() - start}

    return call


def _measure(call, sets: list, tag: str, metrics_port: int) -> dict:
    """One pass of ``call`` over the sets: wall seconds, seconds per model, decodes per image, answers by prompt."""
    decoded0, start = decoded(metrics_port), time.perf_counter()
    answers, seconds = {}, {}
    for prompt, blobs in sets:
        answers[f"{tag} {prompt}"], spent = call(f"{tag} {prompt}", blobs)
        for name, s in spent.items():
            seconds[name] = seconds.get(name, 0.0) + s
    images = len(sets) * PER_REQUEST
    decodes = (decoded(metrics_port) - decoded0) / images
    return {
        "images_per_s": images / (time.perf_counter() - start),
        "decodes_per_image": decodes,
        "per_model_images_per_s": {n: images / s for n, s in seconds.items()},
        "answers": answers,
    }


def _served_summary(measured: dict, names: list[str]) -> dict:
    """Medians over runs, and the check of every Rewards reward against the sum of the models' scores."""
    out = {}
    for side, runs in measured.items():
        out[side] = {
            "images_per_s": statistics.median(r["images_per_s"] for r in runs),
            "decodes_per_image": statistics.median(r["decodes_per_image"] for r in runs),
            "runs": [r["images_per_s"] for r in runs],
        }
    out["per_model"] = {
        name: statistics.median(r["per_model_images_per_s"][name] for r in measured["in_turn"]) for name in names
    }
    diffs = [
        np.abs(answer["sum"] - sum(turn["answers"][prompt].values())).max()
        for rewards, turn in zip(measured["rewards"], measured["in_turn"])
        for prompt, answer in rewards["answers"].items()
    ]
    out["check"] = {"max_abs_diff": float(max(diffs)), "rewards": len(diffs) * PER_REQUEST}
    return out


SHAPE_NAMES = {
    "pickscore": "CLIP ViT-H-14, Hugging Face layout",
    "hps": "open_clip ViT-H-14",
    "aesthetic": "CLIP ViT-L/14 + MLP(768)",
    "image_reward": "BLIP ViT-L/16 + BERT-base (cross-attention) + MLP(768)",
}


def markdown(results: dict) -> str:
    local, remote = results["in_process"], results["served"]
    names = list(local)
    full = results["size"] == "full"
    lines = [
        "| kind | shape | in process images/s | served images/s (its Score requests) | served / in process |",
        "|---|---|---:|---:|---:|",
    ]
    for name in names:
        a, b = local[name]["images_per_s"], remote["per_model"][name]
        lines.append(f"| {name} | {SHAPE_NAMES[name] if full else 'tiny'} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    a = 1 / sum(1 / local[n]["images_per_s"] for n in names)  # the models in turn, from their own rates
    b = remote["in_turn"]["images_per_s"]
    lines.append(f"| all {len(names)} in turn | | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    lines += [
        "",
        f"| served, all {len(names)} models per image | images/s | vs in turn | images decoded per image scored |",
        "|---|---:|---:|---:|",
    ]
    for side, label in (("in_turn", f"{len(names)} Score requests in turn"), ("rewards", "one Rewards request")):
        r = remote[side]
        ratio = r["images_per_s"] / remote["in_turn"]["images_per_s"]
        lines.append(f"| {label} | {r['images_per_s']:.2f} | {ratio:.2f}x | {r['decodes_per_image']:.2f} |")
    check = remote["check"]
    lines.append(
        f"\nRewards against the sum of the {len(names)} scores: max abs difference {check['max_abs_diff']:.2e} over "
        f"{check['rewards']} rewards. {results['sets']} best-of-8 set(s) of {results['image_side']} px JPEGs per run, "
        f"medians of {results['runs']} runs."
    )
    return "\n".join(lines) + "\n"


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 64 px images, one run: under a minute")
    p.add_argument("--image-side", type=int, default=None, help="JPEG side in pixels (default 512; 64 with --smoke)")
    p.add_argument("--sets", type=int, default=None, help="best-of-8 sets per run, after one warm-up set (default 1)")
    p.add_argument("--runs", type=int, default=None, help="runs whose median is reported (default 3; 1 with --smoke)")
    p.add_argument(
        "--kinds", default=",".join(KINDS), help=f"the kinds to measure, comma-separated (default {','.join(KINDS)})"
    )
    p.add_argument(
        "--models",
        type=Path,
        default=None,
        help="keep the written models in this directory and reuse those already there (default: a temporary one)",
    )
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest |Rewards reward - sum of scores| accepted")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for JSON and markdown")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    defaults = dict(image_side=64, sets=1, runs=1) if args.smoke else dict(image_side=512, sets=1, runs=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.kinds = tuple(args.kinds.split(","))
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        p.error(f"unknown kind(s) {', '.join(unknown)}; choose among {', '.join(KINDS)}")
    return args


def measure(args: argparse.Namespace, root: Path) -> dict:
    size = "smoke" if args.smoke else "full"
    sets = best_of_8(args.sets, args.image_side)
    started = time.perf_counter()
    dirs = write_models(SIZES[size], root, [prompt for prompt, _ in sets], args.kinds)
    print(f"models written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    local = {}
    for kind, directory in dirs.items():
        local[kind] = in_process(directory, sets, args.runs)
        print(f"{kind} in process: {local[kind]['images_per_s']:.2f} images/s", file=sys.stderr)
    remote = served(dirs, sets, args.runs)
    print(f"served in {time.perf_counter() - started:.0f} s since the start", file=sys.stderr)
    return {"size": size, "sizes": {k: SIZES[size][k] for k in dirs}, "in_process": local, "served": remote}


def main(argv=None) -> int:
    args = parse(argv)
    if args.models is not None:
        args.models.mkdir(parents=True, exist_ok=True)
        measured = measure(args, args.models)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            measured = measure(args, Path(tmp))
    results = {"machine": machine_with_flags(), "commit": git_revision(), **measured}
    results.update(image_side=args.image_side, sets=args.sets, runs=args.runs)
    table = write_outputs(args.out, f"kinds-{results['size']}-{args.image_side}px", results, markdown)
    if results["served"]["check"]["max_abs_diff"] > args.tolerance:
        print(
            f"Rewards differ from the sums of the scores by more than {args.tolerance}: not appended", file=sys.stderr
        )
        return 1
    if not args.no_append:
        command = "python benchmarks/kinds_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
        append_results(
            f"Kinds at their published shapes: in process, served, one Rewards request ({results['size']}, fp32)",
            table,
            {"machine": results["machine"], "command": command.strip()},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
