"""`pickscore score|rank --server` print what the local commands print; `pickscore serve` settings."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pickscore.cli import build_parser, main
from pickscore.server.settings import Settings
from tests.server.conftest import PROMPT
from tests.test_cli import run


@pytest.mark.parametrize("command", [["score"], ["rank", "--top-k", "4"]])
def test_server_json_matches_local_json(capsys, server, tiny_hf_dir, image_dir, command):
    code, local, _ = run(capsys, *command, "--model", tiny_hf_dir, "--prompt", PROMPT, "--json", image_dir)
    assert code == 0
    code, remote, _ = run(capsys, *command, "--server", server.address, "--prompt", PROMPT, "--json", image_dir)
    assert code == 0
    local, remote = json.loads(local), json.loads(remote)
    assert remote["model"] == local["model"] and remote["prompt"] == local["prompt"]
    assert [r["image"] for r in remote["results"]] == [r["image"] for r in local["results"]]
    for key in ("score", "probability", "rank"):
        if key in local["results"][0]:
            np.testing.assert_allclose(
                [r[key] for r in remote["results"]], [r[key] for r in local["results"]], atol=1e-5
            )


def test_server_skip_invalid_reports_the_bad_file_and_scores_the_rest(capsys, server, image_dir, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    code, out, _ = run(
        capsys, "score", "--server", server.address, "--prompt", PROMPT, "--json", "--skip-invalid", image_dir, bad
    )
    assert code == 0
    doc = json.loads(out)
    assert len(doc["results"]) == len(list(image_dir.iterdir()))
    assert [e["image"] for e in doc["errors"]] == [str(bad)]
    assert str(bad) in doc["errors"][0]["error"] and "not a decodable image" in doc["errors"][0]["error"]


def test_server_bad_image_fails_with_exit_1_naming_it(capsys, server, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    code, _, err = run(capsys, "score", "--server", server.address, "--prompt", PROMPT, bad)
    assert code == 1
    assert "INVALID_ARGUMENT" in err and str(bad) in err


def test_unreachable_server_is_a_clear_error(capsys, tmp_path, image_dir):
    code, _, err = run(capsys, "score", "--server", "127.0.0.1:1", "--timeout", "2", "--prompt", PROMPT, image_dir)
    assert code == 1 and "UNAVAILABLE" in err


def test_model_and_server_are_exclusive(capsys, image_dir):
    with pytest.raises(SystemExit) as info:
        main(["score", "--model", "demo", "--server", "x:1", "--prompt", PROMPT, str(image_dir)])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_settings_flags_beat_environment_beat_defaults():
    env = {"PICKSCORE_MAX_BATCH_SIZE": "8", "PICKSCORE_WARMUP": "off", "PICKSCORE_PORT": "7000"}
    args = build_parser().parse_args(["serve", "--port", "7001"])
    settings = Settings.from_namespace(args, environ=env)
    assert (settings.port, settings.max_batch_size, settings.warmup, settings.model) == (7001, 8, False, "demo")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PICKSCORE_MAX_BATCH_SIZE": "many"}, "PICKSCORE_MAX_BATCH_SIZE='many' is not a valid int"),
        ({"PICKSCORE_MAX_BATCH_SIZE": "0"}, "max_batch_size must be at least 1"),
        ({"PICKSCORE_MAX_QUEUE_SIZE": "10"}, "raise --max-queue-size"),
        ({"PICKSCORE_WARMUP": "perhaps"}, "PICKSCORE_WARMUP='perhaps' is not a valid bool"),
        (
            {"PICKSCORE_MAX_BATCH": "64"},
            "PICKSCORE_MAX_BATCH is not a setting (did you mean PICKSCORE_MAX_BATCH_SIZE?)",
        ),
        (
            {"PICKSCORE_SERVICE_HOST": "10.0.0.7"},
            "for a Service named pickscore: give the pod spec enableServiceLinks: false",
        ),
    ],
)
def test_bad_settings_say_how_to_fix_them(env, message):
    args = build_parser().parse_args(["serve"])
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings.from_namespace(args, environ=env)


def test_serve_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    from dataclasses import fields

    for f in fields(Settings):
        assert f"--{f.name.replace('_', '-')}" in text and f"PICKSCORE_{f.name.upper()}" in text, f.name


def test_health_command_reports_readiness_and_liveness(capsys, server):
    for service in ("", "liveness", "pickscore.v1.ScoringService"):
        assert run(capsys, "health", "--server", server.address, "--service", service)[:2] == (0, "SERVING\n")
    code, out, err = run(capsys, "health", "--server", server.address, "--service", "no.such.Service")
    assert code == 1 and out == "" and "NOT_FOUND" in err


def test_health_command_fails_when_nothing_listens(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: connection refused
        code, out, err = run(capsys, "health", "--server", address, "--timeout", "2")
    assert code == 1 and "UNAVAILABLE" in err
