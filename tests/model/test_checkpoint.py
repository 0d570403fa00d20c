"""The resolver: Hugging Face and open_clip layouts, hub cache, strict weight accounting, safe loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pickscore.backends.torch_backend import TorchBackend
from pickscore.errors import ModelLoadError
from pickscore.model import hf_convert
from pickscore.model.checkpoint import resolve, save
from pickscore.scorer import Scorer
from tests.conftest import TINY_HF_CONFIG, make_hf_clip, save_hf_clip, varied_images

IMAGES = [data for _, data, _ in varied_images()[:6]]
PROMPT = "a watercolor fox in the snow"


def _scores(ref) -> np.ndarray:
    return np.array(Scorer.from_pretrained(ref, device="cpu", dtype="fp32").score(PROMPT, IMAGES))


def test_every_hf_tensor_is_mapped(tiny_hf_model):
    state = tiny_hf_model.state_dict()
    mapped = hf_convert.state_dict(state)
    # q/k/v collapse into one in_proj per layer and bias: 4 layers x 2 -> 3 tensors become 1.
    assert len(mapped) == len(state) - 4 * 2 * 2
    with pytest.raises(KeyError, match="unexpected tensors.*text_model.extra.weight"):
        hf_convert.state_dict({**state, "text_model.extra.weight": torch.zeros(1)})
    incomplete = {k: v for k, v in state.items() if "layers.0.self_attn.k_proj.weight" not in k}
    with pytest.raises(KeyError, match="missing \\['k'\\]"):
        hf_convert.state_dict(incomplete)


def test_missing_tensor_in_checkpoint_is_an_error(tmp_path, tiny_hf_dir):
    shutil.copytree(tiny_hf_dir, tmp_path / "m")
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    del weights["vision_model.post_layernorm.bias"]
    save_file(weights, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing visual.ln_post.bias"):
        resolve(tmp_path / "m")


def test_quick_gelu_checkpoint_matches_transformers(tmp_path):
    quick = {**TINY_HF_CONFIG["text_config"], "hidden_act": "quick_gelu"}
    hf = make_hf_clip(
        seed=3, text_config=quick, vision_config={**TINY_HF_CONFIG["vision_config"], "hidden_act": "quick_gelu"}
    )
    save_hf_clip(hf, tmp_path)
    loaded = resolve(tmp_path)
    assert loaded.model_cfg["quick_gelu"] is True
    scorer = Scorer(TorchBackend(loaded))
    tokens = scorer.tokenizer([PROMPT])
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=torch.from_numpy(tokens))
    ref = getattr(ref, "pooler_output", ref)
    np.testing.assert_allclose(
        scorer.encode_text([PROMPT]), torch.nn.functional.normalize(ref, dim=-1).numpy(), atol=1e-5
    )


def test_pytorch_bin_loads_with_weights_only_and_refuses_pickled_code(tmp_path, tiny_hf_dir, tiny_hf_model):
    d = tmp_path / "bin"
    shutil.copytree(tiny_hf_dir, d)
    (d / "model.safetensors").unlink()
    torch.save(tiny_hf_model.state_dict(), d / "pytorch_model.bin")
    np.testing.assert_allclose(_scores(d), _scores(tiny_hf_dir), atol=1e-6)

    torch.save({"payload": ModelLoadError("an arbitrary object")}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        resolve(d)


def test_sharded_safetensors(tmp_path, tiny_hf_dir):
    d = tmp_path / "sharded"
    shutil.copytree(tiny_hf_dir, d)
    weights = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, part in shards.items():
        save_file({k: weights[k] for k in part}, str(d / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_allclose(_scores(d), _scores(tiny_hf_dir), atol=1e-6)


def test_open_clip_round_trip(tmp_path, tiny_hf_dir):
    out = save(resolve(tiny_hf_dir), tmp_path / "converted")
    assert {p.name for p in out.iterdir()} == {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "preprocessor_config.json",
    }
    assert resolve(out).layout == "open_clip"
    np.testing.assert_allclose(_scores(out), _scores(tiny_hf_dir), atol=1e-6)
    # Without preprocessor_config.json, preprocessing comes from open_clip's preprocess_cfg.
    (out / "preprocessor_config.json").unlink()
    np.testing.assert_allclose(_scores(out), _scores(tiny_hf_dir), atol=1e-6)
    # Saving again over an existing directory replaces it.
    save(resolve(out), out)
    assert (out / "preprocessor_config.json").is_file() and not (tmp_path / "converted.tmp").exists()
    # Every file gets the process umask's mode (safetensors alone writes the weights owner-only).
    assert len({(p.stat().st_mode & 0o777) for p in out.iterdir()}) == 1


def test_hub_id_from_the_local_cache_offline(tmp_path, tiny_hf_dir, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-pickscore" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_hf_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    np.testing.assert_allclose(_scores("someone/tiny-pickscore"), _scores(tiny_hf_dir), atol=1e-6)
    with pytest.raises(
        ModelLoadError, match="someone/absent: not in the Hugging Face cache.*hf download someone/absent"
    ):
        resolve("someone/absent")


@pytest.mark.parametrize(
    "files,message",
    [
        ({}, "none of the layouts this package loads"),
        ({"config.json": "{not json"}, "invalid JSON"),
        ({"config.json": json.dumps({"model_type": "siglip"})}, "model_type 'siglip'"),
        ({"config.json": "{}"}, "no weights"),
    ],
)
def test_bad_directories_say_what_is_wrong(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        resolve(tmp_path)


def test_unknown_reference(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        resolve(tmp_path / "missing" / "deeper" / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelLoadError, match="expected a directory"):
        resolve(tmp_path / "file")


def test_foreign_vocabulary_is_refused(tmp_path, tiny_hf_dir):
    shutil.copytree(tiny_hf_dir, tmp_path / "m")
    vocab = json.loads((tmp_path / "m" / "vocab.json").read_text())
    vocab["a</w>"], vocab["b</w>"] = vocab["b</w>"], vocab["a</w>"]
    (tmp_path / "m" / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ModelLoadError, match="differs from the CLIP BPE"):
        resolve(tmp_path / "m")
