"""KServe's own Python SDK (``kserve``: ``InferenceRESTClient``, ``InferenceGRPCClient``) against the server.

The SDK pins protobuf below 7, which this package's generated stubs need, so it cannot share the test environment:
it is installed from the package index into a virtual environment of its own, and talks to a real
``pickscore serve --model demo`` over loopback, as a KServe user's code would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import venv

import numpy as np
import pytest

from pickscore.client import Client
from tests.server.conftest import PROMPT, jpeg
from tests.server.test_sigterm import start_server

KSERVE = "kserve>=0.21,<0.22"
SCRIPT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

http_port, grpc_port, prompt, *paths = sys.argv[1:]
images = [open(p, "rb").read() for p in paths]

def request():
    text = InferInput("PROMPT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    image = InferInput("IMAGE", [len(images), 1], "BYTES")
    image.set_data_from_numpy(np.array([[i] for i in images], dtype=object))
    return InferRequest(model_name="pickscore", infer_inputs=[text, image])

async def main():
    out = {}
    rest, base = InferenceRESTClient(RESTConfig(protocol="v2")), f"http://127.0.0.1:{http_port}"
    out["rest"] = [await rest.is_server_live(base), await rest.is_server_ready(base),
                   await rest.is_model_ready(base, "pickscore")]
    result = await rest.infer(base, request(), model_name="pickscore")
    out["rest_scores"] = result.outputs[0].as_numpy().ravel().tolist()
    await rest.close()
    grpc = InferenceGRPCClient(f"127.0.0.1:{grpc_port}")
    out["grpc"] = [await grpc.is_server_live(), await grpc.is_server_ready(), await grpc.is_model_ready("pickscore")]
    out["grpc_scores"] = (await grpc.infer(request())).outputs[0].as_numpy().ravel().tolist()
    await grpc.close()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def kserve_python(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("kserve")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    python = str(root / "venv" / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([python, "-m", "pip", "install", "--quiet", KSERVE], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return python


def test_kserve_sdk_rest_and_grpc_clients(kserve_python, tmp_path):
    paths = []
    for seed in range(2):
        paths.append(tmp_path / f"{seed}.jpg")
        paths[-1].write_bytes(jpeg(seed))
    proc, serving, _ = start_server("demo")
    try:
        with Client(f"127.0.0.1:{serving['port']}") as client:
            expected = client.score(PROMPT, paths)
        args = [str(serving["http_port"]), str(serving["port"]), PROMPT, *map(str, paths)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run(
            [kserve_python, "-c", SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert out["rest"] == [True, True, True] and out["grpc"] == [True, True, True]
    np.testing.assert_allclose(out["rest_scores"], expected, atol=1e-5)
    np.testing.assert_allclose(out["grpc_scores"], expected, atol=1e-5)
