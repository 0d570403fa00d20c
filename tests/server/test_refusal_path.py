"""A refusal costs no decode, on every transport: with the image tower's default admission bound reached (one batch
of work ahead), a request whose image bytes are not an image is refused (RESOURCE_EXHAUSTED, 429) -- the admission
decision came before anything read those bytes as an image -- and the same request once there is room is
INVALID_ARGUMENT (400), naming the image; and the CPU's forward-pass thread yields the cores to the loop that
answers refusals."""

from __future__ import annotations

import base64
import json
import os
import sys
import threading

import grpc
import msgpack
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from pickscore.client import Client
from pickscore.server.app import ServerThread
from pickscore.server.engine import Shared
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc
from tests.server.conftest import PROMPT, jpeg, metric, settings_for
from tests.server.test_decode import wait_until
from tests.server.test_http import multipart, post
from tests.server.test_overload import _POOL, SlowBackend, _park

GARBAGE = b"not an image at all"


def every_transport(server: ServerThread) -> dict[str, tuple[int, str]]:
    """One request with one undecodable image over each transport -> (gRPC code number or HTTP status, message)."""
    out = {}
    with grpc.insecure_channel(server.address) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        request = pb.ScoreRequest(prompt=PROMPT, images=[pb.Image(data=GARBAGE)])
        for name, call in (
            ("Score", lambda: stub.Score(request, timeout=30)),
            ("Rank", lambda: stub.Rank(pb.RankRequest(prompt=PROMPT, images=request.images), timeout=30)),
        ):
            try:
                call()
                out[name] = (0, "")
            except grpc.RpcError as e:
                out[name] = (e.code().value[0], e.details())
        (answer,) = stub.ScoreStream(iter([pb.ScoreStreamRequest(tag="t", request=request)]), timeout=30)
        out["ScoreStream"] = (answer.error.code, answer.error.message)
    one = {"prompt": PROMPT, "images": [{"data": base64.b64encode(GARBAGE).decode()}]}
    for name, body, kind in (
        ("/v1 json", json.dumps(one).encode(), "application/json"),
        ("/v1 msgpack", msgpack.packb({"prompt": PROMPT, "images": [{"data": GARBAGE}]}), "application/msgpack"),
        ("/v1 multipart", *multipart([("prompt", PROMPT)], [("g.jpg", GARBAGE)])),
    ):
        status, _, answer = post(server, "/v1/score", body, kind)
        message = msgpack.unpackb(answer) if kind == "application/msgpack" else json.loads(answer)
        out[name] = (status, message["error"])
    for name, module, address in (
        ("KServe grpc", triton_grpc, server.address),
        ("KServe http", triton_http, f"127.0.0.1:{server.server.http_port}"),
    ):
        prompt = module.InferInput("PROMPT", [1, 1], "BYTES")
        prompt.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
        image = module.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[GARBAGE]], dtype=object))
        client = module.InferenceServerClient(address)
        try:
            client.infer("pickscore", [prompt, image])
            out[name] = (0, "")
        except InferenceServerException as e:
            out[name] = (e.status(), e.message())
        finally:
            client.close()
    return out


def test_a_refusal_reads_no_image_on_any_transport(tiny_hf_dir):
    backend = SlowBackend(str(tiny_hf_dir))
    try:
        with ServerThread(settings_for(tiny_hf_dir), backend=backend) as server, Client(server.address) as client:
            parked = _park(server, backend, client)
            full = _POOL.submit(client.score, PROMPT, [jpeg(i) for i in range(32)])  # 33 images: over one batch
            wait_until(lambda: metric(server, "pickscore_queue_depth", tower="image") == 33, "33 images admitted")
            refused = every_transport(server)
            backend.release.set()
            assert len(full.result(30)) == 32 and len(parked.result(30)) == 1
            invalid = every_transport(server)
    finally:
        backend.release.set()
    exhausted, invalid_argument = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for name, (code, message) in refused.items():
        assert code in (exhausted, 429, "StatusCode.RESOURCE_EXHAUSTED", "429"), (name, code, message)
        assert "image tower busy" in message and "auto: 1 x the measured batch time" in message, (name, message)
    for name, (code, message) in invalid.items():
        assert code in (invalid_argument, 400, "StatusCode.INVALID_ARGUMENT", "400"), (name, code, message)
        assert "image 0" in message and "not a decodable image" in message, (name, message)


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own priority is Linux's")
def test_the_cpu_forward_pass_thread_yields_to_the_event_loop(tiny_hf_dir):
    """The towers' shared CPU thread runs at nice +10, so the loop that answers refusals is not queued behind it."""
    shared = Shared(settings_for(tiny_hf_dir))
    try:
        own = shared.compute.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    finally:
        shared.close(hung=False)
    assert own == min(os.getpriority(os.PRIO_PROCESS, 0) + 10, 19)
