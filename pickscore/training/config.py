"""Training settings: one frozen object, filled from a preset (JSON data file) and command-line overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from importlib import resources
from typing import Any

from pickscore.flags import check_choices
from pickscore.flags import option as _f

PRESETS = resources.files("pickscore.training") / "presets"
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = _f(3e-6, "peak learning rate of AdamW")
    weight_decay: float = _f(0.3, "AdamW weight decay (not applied to gains, biases, logit_scale)")
    warmup_steps: int = _f(500, "linear warm-up steps, then cosine decay to 0 at max_steps")
    max_steps: int = _f(4000, "optimizer steps in the run")
    global_batch: int = _f(128, "pairs per optimizer step, summed over processes and accumulation")
    micro_batch: int = _f(16, "pairs per forward pass per process; accumulation = global / (micro x processes)")
    precision: str = _f("bf16", "autocast precision (fp16 uses a gradient scaler on CUDA)", PRECISIONS)
    grad_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 disables)")
    eval_every: int = _f(500, "validate (and keep the best checkpoint by accuracy) every this many steps")
    save_every: int = _f(500, "write the resumable checkpoint every this many steps")
    eval_pairs: int = _f(0, "validation pairs to use (0: the whole validation_unique split)")
    in_batch_negatives: bool = _f(
        False, "the paper's section 7 variant: also contrast against every image in the batch"
    )
    seed: int = _f(0, "seed of the initial weights (from-scratch presets) and of the data order")
    workers: int = _f(2, "image decoding threads per process")
    shuffle_buffer: int = _f(1000, "pairs in the streaming shuffle buffer")
    architecture: dict | None = _f(
        None, "open_clip model config to train from scratch (instead of --model)", flag=False
    )
    preprocess: dict | None = _f(None, "preprocessor_config.json fields for a from-scratch model", flag=False)

    def validate(self) -> None:
        """Raise ValueError with how to fix it."""
        check_choices(self)
        if min(self.global_batch, self.micro_batch, self.max_steps, self.eval_every, self.save_every) < 1:
            raise ValueError("global_batch, micro_batch, max_steps, eval_every and save_every must be at least 1")

    def accumulation(self, world_size: int) -> int:
        """Micro batches per optimizer step on each of ``world_size`` processes; ValueError saying what to change."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch} x "
                f"{world_size} processes = {per_step}; change --global-batch, --micro-batch or --nproc"
            )
        return self.global_batch // per_step


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in PRESETS.iterdir() if p.name.endswith(".json"))


def load_config(preset: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """A preset by name (or a path to a JSON file), then the non-None overrides on top."""
    base: dict[str, Any] = {}
    if preset:
        path = PRESETS / f"{preset}.json"
        text = path.read_text() if path.is_file() else _read_preset_file(preset)
        base = {k: v for k, v in json.loads(text).items() if k != "description"}
    unknown = set(base) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"preset {preset}: unknown settings {sorted(unknown)}")
    cfg = replace(TrainConfig(**base), **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


def _read_preset_file(preset: str) -> str:
    try:
        with open(preset) as f:
            return f.read()
    except OSError as e:
        raise ValueError(
            f"unknown preset {preset!r}: not one of {', '.join(preset_names())} and not a readable file"
        ) from e
