"""Several models in one server, over gRPC: each model's own scores, Rewards (weighted, normalised, one decode per
image), and versions loaded, swapped under load and unloaded without a restart (explicit control and a watched
repository). Small CLIP models of different shapes and preprocessing, in a real server on loopback."""

from __future__ import annotations

import json
import shutil
import threading
import time
import weakref
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kgrpc

from pickscore import Scorer
from pickscore.server.app import ServerThread
from pickscore.server.repository import ModelSpec, parse_models
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc
from tests.conftest import TINY_HF_CONFIG, make_hf_clip, save_hf_clip
from tests.server.conftest import PROMPT, jpeg, metric, scrape, settings_for

IMAGES = [jpeg(i) for i in range(6)]


def stubs(server: ServerThread):
    channel = grpc.insecure_channel(server.address)
    return channel, scoring_pb2_grpc.ScoringServiceStub(channel), kgrpc.GRPCInferenceServiceStub(channel)


def images(blobs=IMAGES) -> list[pb.Image]:
    return [pb.Image(data=b) for b in blobs]


def scores_of(stub, model: str, blobs=IMAGES) -> np.ndarray:
    response = stub.Score(pb.ScoreRequest(prompt=PROMPT, images=images(blobs), model=model), timeout=60)
    return np.array([r.score for r in response.results])


def in_process(directory: Path, blobs=IMAGES) -> np.ndarray:
    return np.asarray(Scorer.from_pretrained(directory, device="cpu", dtype="fp32").score(PROMPT, blobs))


@pytest.fixture(scope="module")
def expected(tiny_hf_dir, other_hf_dir, small_crop_hf_dir) -> dict[str, np.ndarray]:
    return {
        "pickscore": in_process(tiny_hf_dir),
        "other": in_process(other_hf_dir),
        "small": in_process(small_crop_hf_dir),
    }


def version(root: Path, name: str, number: int, source: Path) -> Path:
    """``source``'s files as ``root/name/number``, written beside and renamed in (a watcher never sees half)."""
    staging = root / f".{name}-{number}"
    shutil.copytree(source, staging)
    (root / name).mkdir(exist_ok=True)
    return staging.rename(root / name / str(number))


@pytest.fixture(scope="module")
def repository(tmp_path_factory, tiny_hf_dir, other_hf_dir, small_crop_hf_dir) -> Path:
    root = tmp_path_factory.mktemp("repository")
    version(root, "pickscore", 1, tiny_hf_dir)
    version(root, "other", 1, other_hf_dir)
    version(root, "small", 1, small_crop_hf_dir)
    (root / "other" / "model.json").write_text(json.dumps({"normalize": {"mean": 0.5, "std": 2.0}}))
    return root


@pytest.fixture(scope="module")
def server(repository):
    with ServerThread(settings_for("unused", model_repository=str(repository))) as s:
        yield s


def test_models_are_named_on_the_command_line_or_by_the_repository(repository):
    assert parse_models("demo") == [ModelSpec("pickscore", "demo")]
    assert parse_models("yuvalkirstain/PickScore_v1") == [ModelSpec("pickscore", "yuvalkirstain/PickScore_v1")]
    assert [s.name for s in parse_models("a=demo,b=/models/x")] == ["a", "b"]
    for bad, message in [
        ("a=demo,b", "name every model of several"),
        ("a=demo,a=demo", "model 'a' named twice"),
        ("a=demo,a_image=demo", "would share a KServe name"),
        ("-x=demo", "model name '-x'"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_models(bad)
    with pytest.raises(ValueError, match="--default-model 'nope' is not served; the models: other, pickscore, small"):
        ServerThread(settings_for("unused", model_repository=str(repository), default_model="nope"))


def test_each_model_scores_as_it_does_in_process(server, expected):
    channel, stub, _ = stubs(server)
    with channel:
        for name in ("", "pickscore", "other", "small"):
            np.testing.assert_allclose(scores_of(stub, name), expected[name or "pickscore"], atol=1e-5, rtol=1e-5)
        ranking = stub.Rank(pb.RankRequest(prompt=PROMPT, images=images(), model="other"), timeout=60).ranking
        assert [r.index for r in ranking] == list(np.argsort(-expected["other"], kind="stable"))
        info = stub.GetModelInfo(pb.GetModelInfoRequest(model="other"))
        assert (info.model, info.model_version, info.embed_dim) == ("other", "1", 24) and info.weights_bytes > 0
        listed = stub.ListModels(pb.ListModelsRequest()).models
        assert [m.model for m in listed] == ["pickscore", "other", "small"]  # the default first
        with pytest.raises(grpc.RpcError) as error:
            stub.Score(pb.ScoreRequest(prompt=PROMPT, images=images(), model="clip"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model 'clip' is not served; this server serves other, pickscore, small" in error.value.details()
    assert metric(server, "pickscore_model_weights_bytes", model="other", model_version="1") == info.weights_bytes
    assert metric(server, "pickscore_images_scored_total", model="other") >= len(IMAGES)


def test_rewards_are_the_weighted_sum_and_each_image_is_decoded_once_per_preprocessing(server, expected):
    channel, stub, _ = stubs(server)
    with channel:
        for models, decodes in ((["pickscore", "other"], 1), (["pickscore", "other", "small"], 2)):
            weights = [1.0, -0.5, 0.25][: len(models)]
            before = metric(server, "pickscore_images_decoded_total")
            request = pb.RewardsRequest(
                prompt=PROMPT,
                images=images(),
                models=[pb.ModelWeight(model=m, weight=w) for m, w in zip(models, weights)],
            )
            response = stub.Rewards(request, timeout=60)
            assert metric(server, "pickscore_images_decoded_total") - before == decodes * len(IMAGES)
            want = sum(w * expected[m] for m, w in zip(models, weights))
            np.testing.assert_allclose(response.rewards, want, atol=1e-4)
            assert [(p.model, p.version, p.weight) for p in response.models] == [
                (m, "1", w) for m, w in zip(models, weights)
            ]
            for part in response.models:
                np.testing.assert_allclose(part.scores, expected[part.model], atol=1e-5)
                np.testing.assert_allclose(part.normalized, part.scores)
        default = stub.Rewards(pb.RewardsRequest(prompt=PROMPT, images=images()), timeout=60)
        assert [p.model for p in default.models] == ["pickscore"]
        np.testing.assert_allclose(default.rewards, expected["pickscore"], atol=1e-5)


def test_normalisation_by_the_declared_map_or_the_running_statistics(server, expected):
    channel, stub, _ = stubs(server)
    weights = [pb.ModelWeight(model="other", weight=2.0)]
    with channel:
        declared = stub.Rewards(
            pb.RewardsRequest(prompt=PROMPT, images=images(), models=weights, normalize=pb.NORMALIZE_DECLARED)
        )
        np.testing.assert_allclose(declared.models[0].normalized, (expected["other"] - 0.5) / 2.0, atol=1e-5)
        np.testing.assert_allclose(declared.rewards, 2.0 * (expected["other"] - 0.5) / 2.0, atol=1e-5)
        with pytest.raises(grpc.RpcError) as error:
            stub.Rewards(pb.RewardsRequest(prompt=PROMPT, images=images(), normalize=pb.NORMALIZE_DECLARED))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model 'pickscore' declares no normalisation" in error.value.details()

        seen = stub.GetModelInfo(pb.GetModelInfoRequest(model="small"))
        running = stub.Rewards(
            pb.RewardsRequest(
                prompt=PROMPT, images=images(), models=[pb.ModelWeight(model="small", weight=1.0)], normalize=2
            )
        )
        # the statistics before, merged with this request's scores: what the server divided by
        new = expected["small"].astype(np.float64)
        n = seen.scores_seen + len(new)
        mean = (seen.score_mean * seen.scores_seen + new.sum()) / n
        squares = (seen.score_std**2 + seen.score_mean**2) * seen.scores_seen + (new**2).sum()
        std = np.sqrt(squares / n - mean**2)
        np.testing.assert_allclose(running.models[0].normalized, (new - mean) / std, atol=1e-4)
        after = stub.GetModelInfo(pb.GetModelInfoRequest(model="small"))
        assert (
            after.scores_seen == n and after.score_mean == pytest.approx(mean) and after.score_std == pytest.approx(std)
        )


def test_a_declared_score_scale_gives_zero_shot_clip_its_100_cos(tmp_path, tiny_hf_dir, expected):
    version(tmp_path, "clip100", 1, tiny_hf_dir)
    (tmp_path / "clip100" / "model.json").write_text(json.dumps({"score_scale": 100}))
    own = float(np.exp(Scorer.from_pretrained(tiny_hf_dir, device="cpu").logit_scale))
    with ServerThread(settings_for("unused", model_repository=str(tmp_path))) as s:
        channel, stub, _ = stubs(s)
        with channel:
            np.testing.assert_allclose(scores_of(stub, "clip100"), expected["pickscore"] * 100 / own, atol=1e-4)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(model="clip100"))
            assert info.logit_scale == pytest.approx(np.log(100)) and info.kind == "clip"
    (tmp_path / "clip100" / "model.json").write_text(json.dumps({"score_scale": -1}))
    with pytest.raises(ValueError, match="score_scale must be positive, got -1"):
        ServerThread(settings_for("unused", model_repository=str(tmp_path)))


def test_a_bad_image_fails_the_same_item_for_every_model(server):
    channel, stub, _ = stubs(server)
    with channel:
        request = pb.RewardsRequest(
            prompt=PROMPT,
            images=images([IMAGES[0], b"not an image", IMAGES[1]]),
            models=[pb.ModelWeight(model="pickscore", weight=1.0), pb.ModelWeight(model="small", weight=1.0)],
        )
        with pytest.raises(grpc.RpcError) as error:
            stub.Rewards(request, timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("image 1: not a decodable image")
        twice = pb.RewardsRequest(prompt=PROMPT, images=images(), models=[pb.ModelWeight(model="other")] * 2)
        with pytest.raises(grpc.RpcError, match="a model named twice"):
            stub.Rewards(twice)


def test_model_control_is_refused_unless_enabled(server):
    channel, _, kserve = stubs(server)
    with channel:
        with pytest.raises(grpc.RpcError) as error:
            kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="other"))
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "--model-control-mode explicit" in error.value.details()
        index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest())
        assert {(m.name, m.version, m.state) for m in index.models} == {
            ("other", "1", "READY"),
            ("pickscore", "1", "READY"),
            ("small", "1", "READY"),
        }


def big_model(directory: Path) -> Path:
    """A CLIP whose image tower holds 84 MB of weights, every one of them read by each forward pass (so they are
    resident, not only mapped): their release shows in the process's resident memory."""
    vision = {**TINY_HF_CONFIG["vision_config"], "hidden_size": 512, "intermediate_size": 4096, "num_hidden_layers": 4}
    return save_hf_clip(make_hf_clip(seed=3, vision_config={**vision, "num_attention_heads": 8}), directory)


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_a_swap_under_load_answers_every_request_from_one_version_and_releases_the_old(
    tmp_path, tiny_hf_dir, other_hf_dir, expected
):
    root = tmp_path / "repository"
    root.mkdir()
    v1 = big_model(tmp_path / "big")
    version(root, "m", 1, v1)
    old = in_process(v1)
    settings = settings_for("unused", model_repository=str(root), model_control_mode="explicit")
    with ServerThread(settings) as server:
        channel, stub, kserve = stubs(server)
        backend = weakref.ref(server.server.repository.get("m").backend)
        answers, errors, stop = [], [], threading.Event()

        def load() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    answers.append((started, scores_of(stub, "m")))
                except grpc.RpcError as e:
                    errors.append(e)

        with channel:
            threads = [threading.Thread(target=load) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            resident = rss_bytes()
            version(root, "m", 2, other_hf_dir)
            kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="m"), timeout=120)
            swapped = time.monotonic()
            time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join()
            assert not errors, errors[:3]
            which = [
                "old"
                if np.allclose(s, old, atol=1e-5)
                else "new"
                if np.allclose(s, expected["other"], atol=1e-5)
                else "mix"
                for _, s in answers
            ]
            assert "mix" not in which and "old" in which and "new" in which
            assert all(w == "new" for (started, _), w in zip(answers, which) if started > swapped)
            assert stub.GetModelInfo(pb.GetModelInfoRequest(model="m")).model_version == "2"
            deadline = time.monotonic() + 30
            while backend() is not None and time.monotonic() < deadline:  # it drains, then is unloaded
                time.sleep(0.1)
            assert backend() is None, "the old version's weights are still referenced after it drained"
            assert metric(server, "pickscore_model_weights_bytes", model="m", model_version="1") == 0
            released = resident - rss_bytes()
            assert released > 60e6, f"resident memory fell by {released / 1e6:.0f} MB after the 84 MB model left"

            # A broken version: the load fails, naming it; the version in service keeps serving.
            (version(root, "m", 3, tiny_hf_dir) / "config.json").write_text("{ not json")
            with pytest.raises(grpc.RpcError) as error:
                kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="m"), timeout=120)
            assert error.value.code() == grpc.StatusCode.INTERNAL
            assert "model 'm' version 3" in error.value.details()
            np.testing.assert_allclose(scores_of(stub, "m"), expected["other"], atol=1e-5)
            index = {
                (m.name, m.version): (m.state, m.reason)
                for m in kserve.RepositoryIndex(kpb.RepositoryIndexRequest()).models
            }
            assert index[("m", "2")] == ("READY", "") and index[("m", "3")][0] == "UNAVAILABLE"
            assert "version 3" in index[("m", "3")][1]

            kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="m"), timeout=60)
            with pytest.raises(grpc.RpcError) as error:
                scores_of(stub, "m")
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            for family in ("pickscore_queue_capacity", "pickscore_estimated_wait_seconds", "pickscore_model_info"):
                assert f'{family}{{model="m"' not in scrape(server)  # its series left with it


def test_a_watched_repository_serves_new_versions_and_drops_removed_models(
    tmp_path, tiny_hf_dir, other_hf_dir, expected
):
    root = tmp_path / "repository"
    root.mkdir()
    version(root, "pickscore", 1, tiny_hf_dir)
    version(root, "m", 1, tiny_hf_dir)
    settings = settings_for("unused", model_repository=str(root), model_control_mode="poll", repository_poll_s=0.2)
    with ServerThread(settings) as server:
        channel, stub, _ = stubs(server)
        with channel:

            def served(name: str) -> str:
                try:
                    return stub.GetModelInfo(pb.GetModelInfoRequest(model=name)).model_version
                except grpc.RpcError as e:
                    return e.code().name

            def waits_for(name: str, state: str) -> None:
                deadline = time.monotonic() + 60
                while served(name) != state and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert served(name) == state

            version(root, "m", 2, other_hf_dir)
            waits_for("m", "2")
            np.testing.assert_allclose(scores_of(stub, "m"), expected["other"], atol=1e-5)
            version(root, "n", 1, other_hf_dir)  # a new model
            waits_for("n", "1")
            shutil.rmtree(root / "m")
            waits_for("m", "NOT_FOUND")
            np.testing.assert_allclose(scores_of(stub, ""), expected["pickscore"], atol=1e-5)
