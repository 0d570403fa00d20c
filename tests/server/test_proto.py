"""The generated stubs in pickscore/v1 are exactly what grpcio-tools makes of proto/pickscore/v1/scoring.proto."""

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_the_proto(tmp_path):
    rc = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto/pickscore/v1/scoring.proto"),
        ]
    )
    assert rc == 0
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert [str(p) for p in generated] == [
        "pickscore/v1/scoring_pb2.py",
        "pickscore/v1/scoring_pb2.pyi",
        "pickscore/v1/scoring_pb2_grpc.py",
    ]
    for rel in generated:
        assert (ROOT / rel).read_text() == (tmp_path / rel).read_text(), (
            f"{rel} drifted from the .proto: run `make proto`"
        )
