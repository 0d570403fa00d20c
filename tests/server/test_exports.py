"""A served ONNX export is named by its own directory, with its precision: the fp32 and the int8 export of the
demo model are told apart in /v1/model, GetModelInfo, the model_info metric, the serving log and the JSON of
`pickscore score --server`, not both reported as the checkpoint they came from; their identities differ (precision
and digest) and each equals the in-process one."""

from __future__ import annotations

import json
import logging

import pytest

from pickscore import Scorer
from pickscore.backends import model_identity
from pickscore.backends.manifest import load_manifest
from pickscore.cli import main
from pickscore.client import Client
from pickscore.server.app import ServerThread
from tests.server.conftest import PROMPT, jpeg, metric, settings_for
from tests.server.test_http import get
from tests.test_cli import run

PRECISIONS = ("fp32", "int8")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    for precision in PRECISIONS:  # the int8 gate is the exporter's business: here it only has to be served
        argv = ["export", "onnx", "--model", "demo", "--out", str(root / precision), "--precision", precision]
        assert main([*argv, "--min-agreement", "0"]) == 0
    return root


@pytest.mark.parametrize("precision", PRECISIONS)
def test_an_export_is_served_under_its_own_name_and_precision(exports, precision, capsys, caplog, tmp_path):
    directory = exports / precision
    assert load_manifest(directory)["source"] == "demo"  # what every export of it would otherwise be called
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg(0))
    with caplog.at_level(logging.INFO, logger="pickscore.server"), ServerThread(settings_for(directory)) as server:
        (loaded,) = [r for r in caplog.records if r.getMessage() == "model loaded"]
        assert loaded.source == str(directory) and loaded.device == f"CPU {precision}"
        assert (loaded.model, loaded.model_version) == ("pickscore", "1")
        status, _, body = get(server, "/v1/model")
        assert status == 200
        over_http = json.loads(body)
        with Client(server.address) as client:
            over_grpc = client.model_info()
        assert over_http["source"] == over_grpc.source == str(directory)
        assert over_http["device"] == over_grpc.device == f"CPU {precision}"
        assert over_grpc.backend == "onnxruntime"
        identity = Scorer.from_pretrained(directory).identity  # another load of the same files: the same identity
        assert identity.startswith(f"pickscore:clip:{precision}:")
        assert over_http["identity"] == over_grpc.identity == loaded.identity == identity
        labels = {"source": str(directory), "backend": "onnxruntime", "device": f"CPU {precision}"}
        labels["identity"] = identity
        assert metric(server, "pickscore_model_info", **labels) == 1
        code, out, _ = run(capsys, "score", "--server", server.address, "--prompt", PROMPT, "--json", image)
        assert code == 0 and json.loads(out)["model"] == str(directory)


def test_an_exports_precision_and_weights_are_in_its_identity(exports):
    fp32, int8 = (Scorer.from_pretrained(exports / precision).backend for precision in PRECISIONS)
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert fp32.weights_digest != int8.weights_digest  # quantised weights: other bytes
    assert model_identity("pickscore", fp32) != model_identity("pickscore", int8)
