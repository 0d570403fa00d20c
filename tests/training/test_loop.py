"""The training loop end to end on the tiny preset: it learns, resumes exactly, and runs under torchrun."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pickscore.cli import main
from pickscore.model.checkpoint import resolve
from pickscore.training.config import load_config
from pickscore.training.loop import check_gpus, pair_stream, train
from pickscore.training.synthetic import write_synthetic

EXE = Path(sys.executable).with_name("pickscore")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, pairs=300, seed=11, image_size=32)
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "open_clip_model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol: float, skip_key_bias: bool = False) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        x, y = wa[k], wb[k]
        if skip_key_bias and k.endswith("attn.in_proj_bias"):
            # The key bias adds the same amount to every logit of a query, which softmax cancels: its true gradient
            # is 0 and what it gets is float noise, which Adam rescales to full-size steps. It cannot change any
            # output, so it is left out; q and v biases (the other two thirds) are compared.
            third = x.shape[0] // 3
            x, y = torch.cat([x[:third], x[2 * third :]]), torch.cat([y[:third], y[2 * third :]])
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=k)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_loadable_checkpoints(capsys, dataset, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(dataset), "--out", str(run)]
    assert main([*args, *"--max-steps 30 --eval-every 10 --save-every 10".split()]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 30 and 0 <= summary["best_accuracy"] <= 1
    log = _log(run)
    assert [r["step"] for r in log] == list(range(1, 31))
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    assert last < first - 0.05, (first, last)
    assert (run / "curves.png").stat().st_size > 1000
    # Both checkpoints are ordinary model references.
    assert resolve(run / "best").layout == resolve(run / "last").layout == "open_clip"
    assert main(["eval", "--model", str(run / "last"), "--data", str(dataset), "--json", "--limit", "40"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"accuracy", "threshold", "validation_accuracy", "random_baseline"} <= set(result)


def test_init_only_writes_the_weights_training_starts_from(capsys, dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--init-only"]) == 0  # no --data needed
    assert json.loads(capsys.readouterr().out) == {"step": 0, "out": str(run / "init")}
    # One optimizer step at learning rate 0 changes nothing: its checkpoint holds the starting weights.
    zero = tmp_path / "zero"
    common = ["train", "--preset", "tiny", "--data", str(dataset), "--eval-every", "100"]
    assert main([*common, "--out", str(zero), "--max-steps", "1", "--lr", "0"]) == 0
    init, start = load_file(str(run / "init" / "open_clip_model.safetensors")), _weights(zero)
    assert init.keys() == start.keys() and all(torch.equal(init[k], start[k]) for k in init)
    # Without --init-only a run needs its data, as a usage error.
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "tiny", "--out", str(tmp_path / "other")])
    assert exit_info.value.code == 2 and "--data" in capsys.readouterr().err


def test_eval_beside_a_baseline_prints_both_and_plots_the_threshold_curves(capsys, dataset, tmp_path):
    run = tmp_path / "run"
    trained, init = run / "last", run / "init"
    common = ["train", "--preset", "tiny", "--out", str(run)]
    assert main([*common, "--data", str(dataset), "--eval-every", "100", "--max-steps", "20"]) == 0
    assert main([*common, "--init-only"]) == 0  # the starting weights, beside the run's checkpoints
    capsys.readouterr()
    evaluate = ["eval", "--model", str(trained), "--baseline", str(init), "--data", str(dataset), "--limit", "40"]
    png = tmp_path / "threshold.png"
    assert main([*evaluate, "--plot", str(png)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["model", "accuracy", "threshold"]
    assert [r.split()[0] for r in rows] == ["random", str(init), str(trained)]
    assert png.stat().st_size > 1000
    assert main([*evaluate, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == str(trained) and result["baseline"]["model"] == str(init)
    table = {name: (float(accuracy), float(threshold)) for name, accuracy, threshold in (r.split() for r in rows[1:])}
    for ref, r in ((trained, result), (init, result["baseline"])):
        assert table[str(ref)] == pytest.approx((r["accuracy"], r["threshold"]), abs=1e-3)
    assert result["threshold"] != result["baseline"]["threshold"]  # two models were scored, not one twice


def test_kill_and_resume_ends_with_the_same_weights(dataset, tmp_path):
    steps = "--max-steps 16 --save-every 4 --eval-every 8".split()
    args = ["train", "--preset", "tiny", "--data", str(dataset), *steps]
    reference = tmp_path / "uninterrupted"
    train(load_config("tiny", {"max_steps": 16, "save_every": 4, "eval_every": 8}), None, dataset, reference)

    run = tmp_path / "killed"
    proc = subprocess.Popen([EXE, *args, "--out", run], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.jsonl").exists() and len(_log(run)) >= 6:  # past the step-4 checkpoint
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = json.loads((run / "last" / "trainer_state.json").read_text())["step"]
    assert 4 <= steps_before < 16, "the kill should land mid-run"
    assert subprocess.run([EXE, *args, "--out", run], capture_output=True).returncode == 0
    _assert_same_weights(run, reference, atol=1e-6)
    assert [r["step"] for r in _log(run)] == list(range(1, 17))


def test_two_processes_match_one_with_the_same_global_batch(dataset, tmp_path):
    steps = "--max-steps 4 --global-batch 8 --eval-every 4".split()
    common = ["train", "--preset", "tiny", "--data", str(dataset), *steps]
    one = subprocess.run(
        [EXE, *common, "--micro-batch", "8", "--out", tmp_path / "one"], capture_output=True, text=True
    )
    two = subprocess.run(
        [EXE, *common, "--micro-batch", "4", "--nproc", "2", "--out", tmp_path / "two"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    state = json.loads((tmp_path / "two" / "last" / "trainer_state.json").read_text())
    assert len(state["positions"]) == 2
    _assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5, skip_key_bias=True)


def test_resume_survives_a_crash_between_checkpoint_renames(dataset, tmp_path):
    cfg = load_config("tiny", {"max_steps": 4, "save_every": 2, "eval_every": 4})
    train(cfg, None, dataset, tmp_path / "run")
    (tmp_path / "run" / "last").rename(tmp_path / "run" / "last.old")  # as if killed between the two renames
    state = train(replace(cfg, max_steps=6), None, dataset, tmp_path / "run")
    assert state["step"] == 6 and [r["step"] for r in _log(tmp_path / "run")] == list(range(1, 7))


def test_corrupt_rows_are_skipped_and_counted(dataset, tmp_path):
    data = tmp_path / "data"
    write_synthetic(data, pairs=30, seed=5, image_size=32)
    table = pq.read_table(next((data / "train").glob("*.parquet")))
    broken = table.slice(0, 1).set_column(table.schema.get_field_index("jpg_0"), "jpg_0", pa.array([b"garbage"]))
    pq.write_table(broken, data / "train" / "part-99999.parquet")
    state = train(load_config("tiny", {"max_steps": 6, "eval_every": 6, "save_every": 6}), None, data, tmp_path / "run")
    assert state["step"] == 6 and state["skipped"] >= 1


def test_stream_order_is_deterministic_and_resumable(dataset):
    first = [(p, pair.caption, pair.row) for p, pair in itertools.islice(pair_stream(dataset, 3, 50), 500)]
    again = [(p, pair.caption, pair.row) for p, pair in itertools.islice(pair_stream(dataset, 3, 50, start=123), 377)]
    assert again == first[123:]
    assert [p for p, _, _ in first] == list(range(500))
    other_seed = [pair.row for _, pair in itertools.islice(pair_stream(dataset, 4, 50), 500)]
    assert other_seed != [row for _, _, row in first]
    epoch = pq.ParquetFile(next((dataset / "train").glob("*.parquet"))).metadata.num_rows
    assert sorted(row for _, _, row in first[:epoch]) == list(range(epoch))  # each row once per epoch


def test_train_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--lr",
        "--weight-decay",
        "--warmup-steps",
        "--max-steps",
        "--global-batch",
        "--micro-batch",
        "--precision",
        "--grad-checkpointing",
        "--grad-clip",
        "--in-batch-negatives",
        "--nproc",
        "--preset",
    ):
        assert flag in text


def _strict_json(text: str):
    """json.loads refusing NaN and Infinity, which are not JSON."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _fill(data: Path, split: str, column: str, value) -> None:
    """Set ``column`` to ``value`` in every row of ``split``."""
    for path in (data / split).glob("*.parquet"):
        table = pq.read_table(path)
        values = pa.array([value] * table.num_rows, table.schema.field(column).type)
        pq.write_table(table.set_column(table.schema.get_field_index(column), column, values), path)


def test_data_that_cannot_be_validated_is_refused_before_training(capsys, tmp_path):
    small = tmp_path / "small"
    write_synthetic(small, pairs=5, seed=1, image_size=32)  # too few pairs to hold any out: validation is empty
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(small), "--out", str(run), "--max-steps", "2"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert f"the validation_unique split of {small} has no labeled pairs" in err and "needs at least one" in err
    assert not run.exists()
    assert main(["eval", "--model", "demo", "--data", str(small), "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"nothing to evaluate in the validation_unique split of {small}: it has no labeled pair" in err

    # Rows nobody judged are not validation pairs either.
    unjudged = tmp_path / "unjudged"
    write_synthetic(unjudged, pairs=60, seed=1, image_size=32)
    _fill(unjudged, "validation_unique", "has_label", False)
    assert main(["train", "--preset", "tiny", "--data", str(unjudged), "--out", str(run)]) == 1
    assert "validation_unique split" in capsys.readouterr().err and not run.exists()


def test_validation_with_only_undecodable_pairs_writes_null_not_nan(capsys, tmp_path):
    data = tmp_path / "data"
    write_synthetic(data, pairs=60, seed=2, image_size=32)
    _fill(data, "validation_unique", "jpg_0", b"garbage")  # no validation pair decodes: there is no accuracy
    run = tmp_path / "run"
    argv = [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--out",
        str(run),
        *"--max-steps 2 --eval-every 1".split(),
    ]
    assert main(argv) == 0
    summary = _strict_json(capsys.readouterr().out)
    assert summary["step"] == 2 and summary["best_accuracy"] is None
    log = [_strict_json(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["validation"]["accuracy"] for r in log] == [None, None] and log[0]["validation"]["pairs"] == 0
    assert log[0]["validation"]["skipped"] > 0 and not (run / "best").exists()
    _strict_json((run / "last" / "trainer_state.json").read_text())
    assert main(["eval", "--model", str(run / "last"), "--data", str(data), "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "nothing to evaluate in the validation_unique split" in err and "is undecodable" in err


def test_a_run_that_cannot_start_on_nproc_processes_is_refused_before_any_starts(dataset, tmp_path):
    run = tmp_path / "run"
    common = [EXE, "train", "--preset", "tiny", "--data", dataset, "--out", run]
    done = subprocess.run([*common, "--nproc", "2"], capture_output=True, text=True)  # tiny: global = micro = 8
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        "pickscore: error: global_batch 8 is not a multiple of micro_batch 8 x 2 processes = 16; change"
    )
    assert not run.exists()  # no process started: nothing was written
    # A run written by one process resumes only with one.
    assert subprocess.run([*common, "--max-steps", "1"], capture_output=True).returncode == 0
    done = subprocess.run(
        [*common, "--max-steps", "2", "--micro-batch", "4", "--nproc", "2"], capture_output=True, text=True
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"{run / 'last'} was written by 1 processes; resume with as many" in done.stderr


def test_more_processes_than_gpus_are_refused():
    check_gpus(2, 0)  # no GPU: every process trains on the CPU (gloo)
    check_gpus(2, 2)
    with pytest.raises(ValueError, match=r"3 processes but 2 GPU\(s\) on this machine.*--nproc 2 or fewer"):
        check_gpus(3, 2)
