"""The model resolver behind every ``--model`` flag, and this project's checkpoint writer.

A reference is one of:
  * a directory in Hugging Face ``transformers`` CLIP format (config.json + weights), e.g. PickScore_v1;
  * a directory in open_clip format (open_clip_config.json + weights), which is also what
    this project writes (plus preprocessor_config.json);
  * ``demo``: the small model that ships inside the package, trained by this project on synthetic data;
  * a Hugging Face hub id such as ``yuvalkirstain/PickScore_v1``, taken from the local cache
    (downloaded only when the hub is reachable and offline mode is off).

Weights are read with safetensors when present, else ``torch.load(weights_only=True)``:
never an arbitrary unpickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pickscore.errors import ModelLoadError
from pickscore.model import architecture, hf_convert
from pickscore.model.clip import CLIP
from pickscore.model.preprocess import PreprocessConfig
from pickscore.model.tokenizer import Tokenizer, vocabulary

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# The small model that ships with the package (`make demo-model` rebuilds it; see README).
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
_INTERPOLATION = {"bicubic": 3, "bilinear": 2, "nearest": 0}


@dataclass
class LoadedModel:
    """A model ready to score: weights, architecture, preprocessing and tokenizer settings."""

    model: CLIP
    model_cfg: dict[str, Any]
    preprocess: PreprocessConfig
    source: str  # the reference it was resolved from
    layout: str  # "huggingface" or "open_clip"

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(context_length=self.context_length)


def resolve(ref: str | os.PathLike) -> LoadedModel:
    """Load the model a reference names. Raises ModelLoadError saying what was wrong and how to fix it."""
    if str(ref) == "demo":
        if not (DEMO_DIR / "open_clip_config.json").is_file():
            raise ModelLoadError("model demo: not bundled in this installation; build it with `make demo-model`")
        return load_directory(DEMO_DIR, source="demo")
    path = Path(ref).expanduser()
    if path.is_dir():
        return load_directory(path, source=str(ref))
    if path.exists():
        raise ModelLoadError(f"model {ref}: expected a directory, got a file")
    if _looks_like_hub_id(str(ref)):
        return load_directory(_from_hub(str(ref)), source=str(ref))
    raise ModelLoadError(f"model {ref}: no such directory, and not a Hugging Face hub id (owner/name)")


def load_directory(path: Path, source: str | None = None) -> LoadedModel:
    """Load a model directory in Hugging Face or open_clip layout."""
    source = source or str(path)
    try:
        if (path / "open_clip_config.json").is_file():
            return _load_open_clip(path, source)
        if (path / "config.json").is_file():
            return _load_huggingface(path, source)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"model {source}: {e}") from e
    raise ModelLoadError(
        f"model {source}: {path} holds neither config.json (Hugging Face CLIP) nor open_clip_config.json (open_clip)"
    )


def save(loaded: LoadedModel, out: str | os.PathLike) -> Path:
    """Write a model in this project's layout (open_clip layout + preprocessor_config.json), atomically."""
    with atomic_directory(Path(out)) as tmp:
        write_model(loaded.model, loaded.model_cfg, loaded.preprocess, tmp)
    return Path(out)


def write_model(
    model: torch.nn.Module, model_cfg: dict[str, Any], preprocess: PreprocessConfig, directory: Path
) -> None:
    """The three files of this project's model layout, into an existing directory (weights as fp32 safetensors)."""
    config = {"model_cfg": model_cfg, "preprocess_cfg": _open_clip_preprocess_cfg(preprocess)}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocess.to_hf(), indent=2) + "\n")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    weights = directory / OPEN_CLIP_WEIGHTS[0]
    save_file(state, str(weights))
    # safetensors creates the file owner-only (0600); give it the umask's mode, as the JSON files got, so a
    # server running as another user (the containers' uid 10001) can read a model a training job wrote.
    shutil.copymode(directory / "open_clip_config.json", weights)


def recover_directory(out: Path) -> None:
    """Undo a crash between ``atomic_directory``'s two renames: bring ``out.old`` back when ``out`` is missing."""
    old = out.with_name(out.name + ".old")
    if not out.exists() and old.is_dir():
        old.rename(out)


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``out`` only once the block finished without error.

    A reader (or a resumed run) sees the old directory or the new one, never a half-written one.
    """
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _load_huggingface(path: Path, source: str) -> LoadedModel:
    hf_config = _read_json(path / "config.json")
    model_cfg = hf_convert.model_config(hf_config)
    _check_vocabulary(path, model_cfg)
    weights = _read_weights(path, HF_WEIGHTS, source)
    try:
        state = hf_convert.state_dict(weights)
    except KeyError as e:
        raise ModelLoadError(f"model {source}: {e.args[0]}") from e
    model = _materialize(model_cfg, state, source)
    return LoadedModel(model, model_cfg, _preprocess_config(path, model_cfg, {}), source, "huggingface")


def _load_open_clip(path: Path, source: str) -> LoadedModel:
    config = _read_json(path / "open_clip_config.json")
    model_cfg = config.get("model_cfg", config)
    weights = _read_weights(path, OPEN_CLIP_WEIGHTS, source)
    if "state_dict" in weights and isinstance(weights["state_dict"], dict):  # an open_clip training checkpoint
        weights = weights["state_dict"]
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    model = _materialize(model_cfg, weights, source)
    preprocess = _preprocess_config(path, model_cfg, config.get("preprocess_cfg", {}))
    return LoadedModel(model, model_cfg, preprocess, source, "open_clip")


def _materialize(model_cfg: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> CLIP:
    try:
        return architecture.load_weights(architecture.build(model_cfg, device="meta"), state)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"model {source}: {e.args[0]}") from e


def _preprocess_config(path: Path, model_cfg: dict[str, Any], open_clip_pp: dict[str, Any]) -> PreprocessConfig:
    """preprocessor_config.json when present, else derived from the architecture (CLIP defaults)."""
    if (path / "preprocessor_config.json").is_file():
        return PreprocessConfig.from_hf(_read_json(path / "preprocessor_config.json"))
    size = model_cfg["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    fields: dict[str, Any] = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    if open_clip_pp.get("resize_mode") == "squash":
        fields["size"] = {"height": size, "width": size}
    if "mean" in open_clip_pp:
        fields["image_mean"], fields["image_std"] = open_clip_pp["mean"], open_clip_pp["std"]
    fields["resample"] = _INTERPOLATION.get(open_clip_pp.get("interpolation", "bicubic"), 3)
    return PreprocessConfig.from_hf(fields)


def _open_clip_preprocess_cfg(pp: PreprocessConfig) -> dict[str, Any]:
    interpolation = {v: k for k, v in _INTERPOLATION.items()}.get(int(pp.resample), "bicubic")
    return {
        "size": pp.crop_size[0],
        "mean": list(pp.image_mean),
        "std": list(pp.image_std),
        "interpolation": interpolation,
        "resize_mode": "shortest" if pp.resize_to is None else "squash",
    }


def _check_vocabulary(path: Path, model_cfg: dict[str, Any]) -> None:
    """The tokenizer is the bundled CLIP BPE; refuse a checkpoint whose vocabulary differs."""
    expected = vocabulary()[0]
    if model_cfg["text_cfg"]["vocab_size"] != len(expected):
        raise ModelLoadError(
            f"text vocabulary of {model_cfg['text_cfg']['vocab_size']} tokens; only the CLIP BPE "
            f"({len(expected)}) is supported"
        )
    if (path / "vocab.json").is_file() and _read_json(path / "vocab.json") != expected:
        raise ModelLoadError(f"{path / 'vocab.json'} differs from the CLIP BPE vocabulary this package tokenizes with")


def _read_weights(path: Path, names: tuple[str, ...], source: str) -> dict[str, torch.Tensor]:
    for name in names:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(_read_json(file)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_weight_file(path / shard))
            return state
        return _read_weight_file(file)
    raise ModelLoadError(f"model {source}: no weights in {path} (looked for {', '.join(names)})")


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        return load_file(str(file))
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for unsafe or corrupt files
        raise ModelLoadError(f"{file}: not a loadable weights file with weights_only=True ({e})") from e


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file}: invalid JSON ({e})") from e


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "~"))


def _from_hub(repo_id: str) -> Path:
    """A hub model's snapshot directory from the local cache, downloading only when allowed."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    errors = []
    for local_only in (True,) if offline else (True, False):
        try:
            directory = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
            if not any((directory / n).is_file() for n in HF_WEIGHTS[:2] + OPEN_CLIP_WEIGHTS[:1]):
                directory = Path(
                    snapshot_download(repo_id, allow_patterns=patterns + ["*.bin"], local_files_only=local_only)
                )
            return directory
        except Exception as e:  # huggingface_hub raises several unrelated types for "not cached" and "no network"
            errors.append(f"{type(e).__name__}: {e}")
    raise ModelLoadError(
        f"model {repo_id}: not in the Hugging Face cache and could not be downloaded ({errors[-1]}). "
        f"On a machine with network access run `hf download {repo_id}` (or copy the directory) "
        "and pass --model with its path."
    )
