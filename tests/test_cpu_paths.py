"""The CPU's matrix units and the path they suggest (resources.cpu_features, cpu_path)."""

from __future__ import annotations

import pytest

from pickscore.resources import MATRIX_FLAGS, cpu_features, cpu_path

XEON = "Intel(R) Xeon(R) Platinum 8488C"
XEON_FLAGS = "fpu sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni fma"


def cpuinfo(tmp_path, model: str, flags: str, processors: int = 2):
    entry = f"processor\t: {{n}}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
    path = tmp_path / "cpuinfo"
    path.write_text("".join(entry.format(n=n) for n in range(processors)))
    return path


def test_cpu_features_reads_the_model_and_the_matrix_flags_only(tmp_path):
    features = cpu_features(cpuinfo(tmp_path, XEON, XEON_FLAGS))
    assert features.model == XEON
    assert features.flags == set(MATRIX_FLAGS)  # every flag it checks, none of the others (fpu, sse2, fma)


def test_an_unreadable_cpuinfo_is_an_unknown_cpu_without_flags(tmp_path):
    features = cpu_features(tmp_path / "missing")
    assert (features.model, features.flags) == ("unknown", frozenset())


@pytest.mark.parametrize(
    ("flags", "path"),
    [
        ({"avx2", "avx512f", "amx_tile", "amx_bf16", "amx_int8", "avx512_vnni"}, "torch-bf16"),  # Sapphire Rapids
        ({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, "torch-bf16"),  # Cooper Lake, Zen 4
        ({"avx2", "avx512f", "avx512_vnni"}, "onnx-int8"),  # Cascade Lake
        ({"avx2", "avx_vnni"}, "onnx-int8"),  # Alder Lake
        ({"avx2"}, "onnx-fp32"),  # Zen 2/3 (the AMD EPYC here)
        (set(), "onnx-fp32"),
    ],
)
def test_cpu_path_follows_the_matrix_units(flags, path):
    assert cpu_path(frozenset(flags)) == path
