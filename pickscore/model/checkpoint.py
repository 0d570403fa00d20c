"""The model resolver behind every ``--model`` flag, and this project's checkpoint writer.

A reference is one of:
  * a directory in Hugging Face ``transformers`` CLIP format (config.json + weights), e.g. PickScore_v1;
  * a directory in open_clip format (open_clip_config.json + weights), which is also what
    this project writes (plus preprocessor_config.json);
  * ``demo``: the small model that ships inside the package, trained by this project on synthetic data;
  * a Hugging Face hub id such as ``yuvalkirstain/PickScore_v1``, taken from the local cache
    (downloaded only when the hub is reachable and offline mode is off);
  * the other scorers' published files (``pickscore.model.kinds``): HPS v2/v2.1 (``HPS_v2*_compressed.pt``, the
    file or its directory), the LAION aesthetic predictor (``*linearMSE.pth`` beside a CLIP ViT-L/14), ImageReward
    (``ImageReward.pt`` + ``med_config.json`` + ``vocab.txt``).

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
from pickscore.model import architecture, hf_convert, kinds
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
    """A model ready to score: weights, architecture, preprocessing and tokenizer settings.

    ``model`` has ``encode_image`` and ``encode_text`` (and ``score_pairs`` when ``joint``): a ``CLIP`` for the
    "clip" kind (PickScore and any CLIP checkpoint), a kind's own module otherwise (``pickscore.model.kinds``)."""

    model: torch.nn.Module
    model_cfg: dict[str, Any]
    preprocess: PreprocessConfig
    source: str  # the reference it was resolved from
    layout: str  # the files it came from: "huggingface", "open_clip", "hps", "aesthetic", "image_reward"
    kind: str = "clip"
    score_scale: float | None = None  # log of the factor on <text, image> when the kind fixes it (HPS: 0, cosine)
    unit_features: bool = True  # the towers' outputs are L2-normalised before they meet
    joint: bool = False  # the score is model.score_pairs(text rows, image rows), not a dot product
    text_tokenizer: Any = None  # the kind's own tokenizer (ImageReward's WordPiece); None: the CLIP BPE

    @property
    def context_length(self) -> int:
        if self.text_tokenizer is not None:
            return int(self.text_tokenizer.context_length)
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    @property
    def logit_scale(self) -> float:
        """Scores are exp(logit_scale) * <text, image> (fp32): the kind's fixed scale, else the model's own."""
        if self.score_scale is not None:
            return float(self.score_scale)
        return float(self.model.logit_scale.detach().float())

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    def tokenizer(self) -> Tokenizer:
        if self.text_tokenizer is not None:
            return self.text_tokenizer
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
        if kinds.kind_of(path) in ("hps", "aesthetic"):  # one weights file names which of several to load
            return load_directory(path, source=str(ref))
        raise ModelLoadError(f"model {ref}: expected a directory or one of the published files of {kinds.EXPECTED}")
    if _looks_like_hub_id(str(ref)):
        return load_directory(_from_hub(str(ref)), source=str(ref))
    raise ModelLoadError(f"model {ref}: no such directory, and not a Hugging Face hub id (owner/name)")


def load_directory(path: Path, source: str | None = None) -> LoadedModel:
    """Load a model directory in Hugging Face or open_clip layout, or another kind's files (a directory, or the
    one weights file of HPS or the aesthetic predictor)."""
    source = source or str(path)
    try:
        kind = kinds.kind_of(path)
        if kind is not None:
            return _KIND_LOADERS[kind](path, source)
        return _load_clip_directory(path, source)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"model {source}: {e}") from e


def _load_clip_directory(path: Path, source: str) -> LoadedModel:
    if (path / "open_clip_config.json").is_file():
        return _load_open_clip(path, source)
    if (path / "config.json").is_file():
        return _load_huggingface(path, source)
    raise ModelLoadError(f"model {source}: {path} holds none of the layouts this package loads: {kinds.EXPECTED}")


def _load_hps(path: Path, source: str) -> LoadedModel:
    """HPS v2 / v2.1: an open_clip state dict; ViT-H-14 unless an open_clip_config.json beside it says otherwise."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        found = [name for name in kinds.HPS_FILES if (path / name).is_file()]
        if len(found) > 1:
            raise ModelLoadError(
                f"model {source}: holds {' and '.join(found)}; pass the file to load, e.g. --model {path / found[0]}"
            )
        path = path / found[0]
    config = _read_json(folder / "open_clip_config.json") if (folder / "open_clip_config.json").is_file() else {}
    model_cfg = config.get("model_cfg", config) or kinds.VIT_H_14
    weights = _read_weight_file(path)
    model = _materialize(model_cfg, _open_clip_state(weights), source)
    preprocess = kinds.torchvision_preprocess(int(model_cfg["vision_cfg"].get("image_size", 224)))
    return LoadedModel(model, model_cfg, preprocess, source, "hps", kind="hps", score_scale=0.0)


def _load_aesthetic(path: Path, source: str) -> LoadedModel:
    """The aesthetic predictor's MLP (``path``, or the *linearMSE.pth in it) over the CLIP beside it."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = next(p for p in sorted(path.iterdir()) if p.name.endswith(kinds.AESTHETIC_SUFFIX))
    clip_dir = folder / "clip" if (folder / "clip").is_dir() else folder
    if not any((clip_dir / n).is_file() for n in ("config.json", "open_clip_config.json")):
        raise ModelLoadError(
            f"model {source}: the aesthetic predictor ({path.name}) scores OpenAI CLIP ViT-L/14 image embeddings; "
            f"put that CLIP model (e.g. openai/clip-vit-large-patch14: config.json and its weights) in {folder} "
            f"or {folder / 'clip'}"
        )
    clip = _load_clip_directory(clip_dir, f"{source} (its CLIP)")
    try:
        head = kinds.MLPHead(_read_weight_file(path))
    except (KeyError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"model {source}: {path.name} is not the aesthetic predictor's MLP ({e})") from e
    if head.in_features != clip.embed_dim:
        raise ModelLoadError(
            f"model {source}: {path.name} takes {head.in_features}-dimensional embeddings; the CLIP in {clip_dir} "
            f"makes {clip.embed_dim} (the predictor needs OpenAI CLIP ViT-L/14's 768)"
        )
    model_cfg = {"embed_dim": 1, "clip": clip.model_cfg}
    preprocess = kinds.torchvision_preprocess(clip.preprocess.crop_size[0])
    model = kinds.AestheticPredictor(clip.model, head)
    return LoadedModel(
        model,
        model_cfg,
        preprocess,
        source,
        "aesthetic",
        kind="aesthetic",
        score_scale=0.0,
        unit_features=False,
        text_tokenizer=clip.tokenizer(),  # prompts are checked and tokenised as for any model, then ignored
    )


def _load_image_reward(path: Path, source: str) -> LoadedModel:
    from pickscore.model.image_reward import load_image_reward

    model, tokenizer, info = load_image_reward(path, source)
    preprocess = kinds.torchvision_preprocess(int(info["image_size"]))
    return LoadedModel(
        model,
        {"embed_dim": int(info["embed_dim"]), **info},
        preprocess,
        source,
        "image_reward",
        kind="image_reward",
        score_scale=0.0,
        unit_features=False,
        joint=True,
        text_tokenizer=tokenizer,
    )


_KIND_LOADERS = {"hps": _load_hps, "aesthetic": _load_aesthetic, "image_reward": _load_image_reward}


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
    return LoadedModel(model, model_cfg, _preprocess_config(path, model_cfg, None), source, "huggingface")


def _load_open_clip(path: Path, source: str) -> LoadedModel:
    config = _read_json(path / "open_clip_config.json")
    model_cfg = config.get("model_cfg", config)
    weights = _read_weights(path, OPEN_CLIP_WEIGHTS, source)
    weights = _open_clip_state(weights)
    model = _materialize(model_cfg, weights, source)
    preprocess = _preprocess_config(path, model_cfg, config.get("preprocess_cfg", {}))
    return LoadedModel(model, model_cfg, preprocess, source, "open_clip")


def _open_clip_state(weights: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's tensors from an open_clip file: a training checkpoint's ``state_dict`` (HPS v2's files are one)
    or the state dict itself, with DistributedDataParallel's ``module.`` prefix dropped."""
    if isinstance(weights.get("state_dict"), dict):
        weights = weights["state_dict"]
    return {k.removeprefix("module."): v for k, v in weights.items()}


def _materialize(model_cfg: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> CLIP:
    try:
        return architecture.load_weights(architecture.build(model_cfg, device="meta"), state)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"model {source}: {e.args[0]}") from e


def _preprocess_config(path: Path, model_cfg: dict[str, Any], open_clip_pp: dict[str, Any] | None) -> PreprocessConfig:
    """preprocessor_config.json when present, else derived from the architecture: CLIPImageProcessor's defaults for
    a Hugging Face layout (``open_clip_pp`` None), open_clip's own transform (torchvision's) for an open_clip one."""
    if (path / "preprocessor_config.json").is_file():
        return PreprocessConfig.from_hf(_read_json(path / "preprocessor_config.json"))
    size = model_cfg["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    fields: dict[str, Any] = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    if open_clip_pp is None:
        open_clip_pp = {}
    else:
        fields["pickscore_style"] = "torchvision"
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

    patterns = [
        "*.json",
        "*.txt",
        "*.safetensors",
        *kinds.HPS_FILES,
        kinds.IMAGE_REWARD_FILE,
        f"*{kinds.AESTHETIC_SUFFIX}",
    ]
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
