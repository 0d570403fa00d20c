"""The training loop: fine-tune (or train from scratch) a CLIP scorer with the PickScore objective.

One optimizer step = ``global_batch`` pairs = accumulation x processes x ``micro_batch``.
Data: the train split streamed in a deterministic order (epoch e shuffled by a seeded buffer),
pair k going to process k % world_size, so a run resumes exactly by skipping what it consumed.
Checkpoints: ``OUT/last`` (model + optimizer + position, written atomically every save_every
steps) and ``OUT/best`` (the model with the best validation accuracy); both load with ``--model``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pickscore.backends.torch_backend import TORCH_DTYPES, TorchBackend
from pickscore.datasets.pickapic import PreferencePair, has_pairs, iter_pairs
from pickscore.errors import InvalidInput
from pickscore.model import architecture
from pickscore.model.checkpoint import LoadedModel, atomic_directory, recover_directory, resolve, write_model
from pickscore.model.preprocess import PreprocessConfig
from pickscore.training import metrics
from pickscore.training.config import TrainConfig
from pickscore.training.data import SkipCounter, decode_pair_or_error
from pickscore.training.evaluate import score_pairs
from pickscore.training.loss import pickscore_loss

log = logging.getLogger(__name__)
VALIDATION = "validation_unique"  # the split validation runs on and OUT/best is chosen by


def pair_stream(
    data: str | os.PathLike, seed: int, buffer: int, start: int = 0
) -> Iterator[tuple[int, PreferencePair]]:
    """Endless (position, pair) over the train split; epoch e is shuffled by a buffer seeded with (seed, e).

    The order depends only on the files, the seed and the buffer size; ``start`` skips positions
    without decoding anything, which is how a resumed run continues exactly where it stopped.
    """
    position, epoch = 0, 0
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        held: list[PreferencePair] = []
        empty = True
        for pair in iter_pairs(data, split="train"):
            empty = False
            if len(held) < buffer:
                held.append(pair)
                continue
            i = rng.randrange(buffer)
            pair, held[i] = held[i], pair
            if position >= start:
                yield position, pair
            position += 1
        if empty:
            raise ValueError(f"the train split of {data} has no rows")
        rng.shuffle(held)
        for pair in held:
            if position >= start:
                yield position, pair
            position += 1
        epoch += 1


def check_run(
    cfg: TrainConfig, data: str | os.PathLike, out: str | os.PathLike, world: int = 1, local: int | None = None
) -> None:
    """Refuse, before any process starts, a run that would fail later or could not be validated.

    ``world`` processes in all, ``local`` of them on this machine (default all). ValueError (FileNotFoundError for
    a missing split) says what to change: the batch sizes against the processes, more processes than GPUs, a
    train split without rows, a validation split without labeled pairs, a resume with another process count.
    """
    cfg.accumulation(world)
    check_gpus(world if local is None else local, torch.cuda.device_count())
    if not has_pairs(data, "train"):
        raise ValueError(f"the train split of {data} has no rows; training needs at least one pair")
    if not has_pairs(data, VALIDATION, labeled_only=True):
        raise ValueError(
            f"the {VALIDATION} split of {data} has no labeled pairs; training validates on it to keep OUT/best and "
            "needs at least one pair with a label (has_label true, label_0 + label_1 > 0)"
        )
    saved_state(Path(out), world)


def check_gpus(processes: int, gpus: int) -> None:
    """Each process on a machine with GPUs trains on its own one (cuda:LOCAL_RANK); ValueError when too few."""
    if gpus and processes > gpus:
        raise ValueError(
            f"{processes} processes but {gpus} GPU(s) on this machine, and each process needs its own: use --nproc "
            f"{gpus} or fewer, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU"
        )


def saved_state(out: Path, world: int) -> dict[str, Any] | None:
    """The trainer state in OUT/last a run resumes from, or None; ValueError when other process counts wrote it."""
    resume = out / "last"
    recover_directory(resume)
    path = resume / "trainer_state.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if len(state["positions"]) != world:
        raise ValueError(
            f"{resume} was written by {len(state['positions'])} processes; resume with as many (--nproc), "
            "or pick a new --out"
        )
    return state


def initial_model(cfg: TrainConfig, model_ref: str | None) -> LoadedModel:
    """Where a run starts: ``model_ref`` as loaded, or the preset's architecture with weights drawn from its seed."""
    if model_ref:
        return resolve(model_ref)
    if not cfg.architecture:
        raise ValueError("give --model REF to fine-tune, or a preset with an 'architecture' to train from scratch")
    torch.manual_seed(cfg.seed)  # same initial weights on every process, and for `train --init-only`
    model = architecture.build(cfg.architecture)
    preprocess = PreprocessConfig.from_hf(cfg.preprocess or {})
    return LoadedModel(model, cfg.architecture, preprocess, source="scratch", layout="open_clip")


class Trainer:
    """Holds the model, optimizer and data position of one process of a (possibly distributed) run."""

    def __init__(self, cfg: TrainConfig, model_ref: str | None, data: str | os.PathLike, out: str | os.PathLike):
        self.cfg, self.data, self.out = cfg, Path(data), Path(out)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        self.accumulation = cfg.accumulation(self.world)
        self.skipped = SkipCounter("train")

        resume = self.out / "last"
        saved = saved_state(self.out, self.world)
        # best_accuracy: None until a validation scored a pair (older runs wrote -1.0, which any accuracy beats)
        self.state: dict[str, Any] = saved or {"step": 0, "positions": [0] * self.world, "best_accuracy": None}
        loaded = resolve(resume) if saved else initial_model(cfg, model_ref)
        self.loaded = loaded
        self.model = loaded.model.to(self.device).train()
        self.model.set_grad_checkpointing(cfg.grad_checkpointing)
        self.tokenizer = loaded.tokenizer()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]  # gains, biases, logit_scale, class token
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16" and self.device.type == "cuda")
        if (resume / "optimizer.pt").is_file():
            saved = torch.load(resume / "optimizer.pt", map_location=self.device, weights_only=True)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
        self.ddp = (
            torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[local] if self.device.type == "cuda" else None
            )
            if self.world > 1
            else self.model
        )
        self.decode_pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="decode")

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over warmup_steps, then cosine decay to 0 at max_steps."""
        if step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        progress = (step - self.cfg.warmup_steps) / max(1, self.cfg.max_steps - self.cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # -- data -------------------------------------------------------------------------------------

    def _local_pairs(self) -> Iterator[tuple[int, PreferencePair]]:
        """This process's share of the stream: positions p with p % world == rank, from where it stopped."""
        start = self.state["positions"][self.rank]
        for position, pair in pair_stream(self.data, self.cfg.seed, self.cfg.shuffle_buffer, start):
            if position % self.world == self.rank:
                yield position, pair

    def batches(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(next stream position, micro batch) with micro_batch decodable pairs; bad rows are skipped and counted."""
        pairs = self._local_pairs()
        pp = self.loaded.preprocess
        while True:
            chosen, pixels, last = [], [], 0
            while len(chosen) < self.cfg.micro_batch:
                window = [next(pairs) for _ in range(self.cfg.micro_batch - len(chosen))]
                for (position, pair), result in zip(
                    window, self.decode_pool.map(lambda item: decode_pair_or_error(item[1], pp), window)
                ):
                    last = position + 1
                    if isinstance(result, InvalidInput):
                        self.skipped.skip(position, pair, result)
                        continue
                    chosen.append(pair)
                    pixels.append(result)
            yield (
                last,
                {
                    "tokens": torch.from_numpy(self.tokenizer([p.caption for p in chosen])),  # (B, 77)
                    "pixels_0": torch.from_numpy(np.stack([x[0] for x in pixels])),  # (B, 3, H, W)
                    "pixels_1": torch.from_numpy(np.stack([x[1] for x in pixels])),
                    "label_0": torch.tensor([p.label_0 for p in chosen], dtype=torch.float32),
                    "label_1": torch.tensor([p.label_1 for p in chosen], dtype=torch.float32),
                    "weight_n": torch.tensor([p.num_example_per_prompt for p in chosen], dtype=torch.float32),
                },
            )

    # -- steps ------------------------------------------------------------------------------------

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        n = b["tokens"].shape[0]
        autocast = torch.autocast(
            self.device.type, dtype=TORCH_DTYPES[self.cfg.precision], enabled=self.cfg.precision != "fp32"
        )
        with autocast:
            # One forward through DDP so gradients synchronise: both images of each pair in one image batch.
            images, text, scale = self.ddp(
                torch.cat([b["pixels_0"], b["pixels_1"]]), b["tokens"]
            )  # (2B, D), (B, D), ()
        return pickscore_loss(
            text.float(),
            images[:n].float(),
            images[n:].float(),
            b["label_0"],
            b["label_1"],
            scale.float().log(),
            b["weight_n"],
            in_batch_negatives=self.cfg.in_batch_negatives,
        )

    def step(self, batches: Iterator[tuple[int, dict[str, torch.Tensor]]]) -> float:
        """One optimizer step over accumulation micro batches -> the mean loss."""
        total = 0.0
        for micro in range(self.accumulation):
            position, batch = next(batches)
            sync = micro == self.accumulation - 1 or self.world == 1
            context = self.ddp.no_sync() if not sync else contextlib.nullcontext()
            with context:
                loss = self._loss(batch) / self.accumulation
                self.scaler.scale(loss).backward()
            total += float(loss.detach())  # note: a CPU-GPU sync point, once per micro batch
            self.state["positions"][self.rank] = position
        self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))  # as CLIP: the temperature stays in [1, 100]
        self.state["step"] += 1
        return total

    def validate(self) -> dict[str, Any]:
        """Tie-aware accuracy on validation_unique at its best threshold (rank 0 only); accuracy and threshold
        are None when no pair could be scored (every one skipped as undecodable)."""
        self.model.eval()
        pairs = iter_pairs(self.data, split=VALIDATION, labeled_only=True)
        if self.cfg.eval_pairs:
            pairs = itertools.islice(pairs, self.cfg.eval_pairs)
        skipped = SkipCounter(VALIDATION)
        backend = TorchBackend(self.loaded, device=self.device)  # the model being trained, as served: fp32, eval
        s0, s1, l0, l1 = score_pairs(backend, pairs, self.decode_pool, skipped)
        self.model.train()
        if not len(s0):
            log.warning("%s: no pair could be scored (%d skipped); no accuracy at this step", VALIDATION, skipped.count)
            return {"accuracy": None, "threshold": None, "pairs": 0, "skipped": skipped.count}
        threshold, accuracy = metrics.best_threshold(metrics.preference_probabilities(s0, s1), l0, l1)
        return {"accuracy": accuracy, "threshold": threshold, "pairs": len(s0), "skipped": skipped.count}

    def save(self, name: str, with_state: bool) -> None:
        """Rank 0 writes OUT/name atomically: the model, plus optimizer and position when resumable."""
        positions = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(positions, self.state["positions"][self.rank])
            self.state["positions"] = positions
        if self.rank != 0:
            return
        with atomic_directory(self.out / name) as tmp:
            write_model(self.model, self.loaded.model_cfg, self.loaded.preprocess, tmp)
            if with_state:
                torch.save(
                    {
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(),
                    },
                    tmp / "optimizer.pt",
                )
                (tmp / "trainer_state.json").write_text(
                    json.dumps({**self.state, "config": asdict(self.cfg)}, indent=2, allow_nan=False)
                )


def train(cfg: TrainConfig, model_ref: str | None, data: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) training to cfg.max_steps; returns the final state. Call under torchrun for DDP.

    ``check_run`` first: data that cannot be validated, or settings that cannot run, are refused before any step.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_run(cfg, data, out, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    _init_distributed()
    trainer = Trainer(cfg, model_ref, data, out)
    out = Path(out)
    log_path = out / "log.jsonl"
    if trainer.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, trainer.state["step"])
    batches = trainer.batches()
    bar = tqdm(total=cfg.max_steps, initial=trainer.state["step"], unit="step", disable=trainer.rank != 0 or None)
    while trainer.state["step"] < cfg.max_steps:
        started = time.perf_counter()
        loss = trainer.step(batches)
        step = trainer.state["step"]
        record: dict[str, Any] = {
            "step": step,
            "loss": loss if math.isfinite(loss) else None,  # a diverged run's NaN is logged as null
            "lr": trainer.scheduler.get_last_lr()[0],
            "samples_per_s": cfg.global_batch / (time.perf_counter() - started),
        }
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            if trainer.rank == 0:
                record["validation"] = trainer.validate()
            if trainer.world > 1:
                shared = [record.get("validation")]
                dist.broadcast_object_list(shared, src=0)
                record["validation"] = shared[0]
            if _improves(record["validation"]["accuracy"], trainer.state["best_accuracy"]):
                trainer.state["best_accuracy"] = record["validation"]["accuracy"]
                trainer.save("best", with_state=False)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            trainer.save("last", with_state=True)
        if trainer.rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            best = trainer.state["best_accuracy"]
            bar.set_postfix(
                loss=f"{loss:.4f}",
                acc="-" if best is None else f"{best:.3f}",
                samples_s=f"{record['samples_per_s']:.1f}",
            )
            bar.update(1)
    bar.close()
    if trainer.rank == 0:
        plot_curves(log_path, out / "curves.png")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return {**trainer.state, "skipped": trainer.skipped.count}


def _improves(accuracy: float | None, best: float | None) -> bool:
    return accuracy is not None and (best is None or accuracy > best)


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint so the log reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def plot_curves(log_path: Path, png: Path) -> None:
    """Loss and validation accuracy against step, from the JSONL log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax_loss.set(xlabel="step", ylabel="training loss", title="PickScore loss")
    evals = [r for r in records if "validation" in r]
    ax_acc.plot([r["step"] for r in evals], [r["validation"]["accuracy"] for r in evals], marker="o")
    ax_acc.set(xlabel="step", ylabel="tie-aware accuracy", title="validation_unique", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
