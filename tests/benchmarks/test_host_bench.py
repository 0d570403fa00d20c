"""benchmarks/host_bench.py, the projection of the host that feeds a GPU, cannot rot: a short run of a mode measures
a real `pickscore serve` end to end (its images counted from its metrics, its CPU from /proc, its interpreter lock
from py-spy), projects a ceiling, and leaves no server behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.benchmarks.runs import benchmark_module, help_text, run_benchmark, servers_under


def test_a_short_run_measures_cpu_and_lock_per_image_and_projects_a_ceiling(tmp_path):
    # one Score call a request, a stream's messages, a RewardClient; front ends
    modes = "processes,processes-stream,processes-reward,front-ends"
    flags = ("--modes", modes, "--warmup-s", "1", "--window-s", "2", "--gil-window-s", "1", "--rate", "50")
    out = run_benchmark(tmp_path, "host_bench.py", *flags)
    (report,) = [json.loads(p.read_text()) for p in out.glob("host-*.json")]
    assert [m["rpc"] for m in report["modes"].values()] == ["unary", "stream", "reward", "unary"]
    for other in ("processes-stream", "processes-reward"):  # each load kept the server scoring through its windows
        assert report["modes"][other]["images_per_s"] > 0 and report["modes"][other]["rt_gil_images_per_s"] > 0
    mode = report["modes"]["processes"]
    assert mode["images"] > 0 and mode["images_per_s"] > 0  # the server's own counter moved
    assert mode["cpu_ms_per_image"] > 0 and mode["gil_ms_per_image"] > 0
    assert mode["gil_workers_ms_per_image"]  # each decode worker's lock counted apart
    assert mode["ceiling"] == min(mode["cores_over_cpu"], mode["one_over_gil"])
    # the ceiling's lock is the real-time window's (held on a core); the plain window's bound stands beside it
    assert mode["rt_gil_ms_per_image"] > 0 and mode["one_over_gil"] == 1000 / mode["rt_gil_ms_per_image"]
    assert mode["ceiling_bound"] == min(mode["cores_over_cpu"], 1000 / mode["gil_ms_per_image"])
    assert "| exact path, `--decode-processes` |" in next(out.glob("host-*.md")).read_text()
    front = report["modes"]["front-ends"]  # each front end's lock apart, over the images it scored
    assert len(front["gil_front_ends_ms_per_image"]) == 2 and sum(front["gil_front_ends_images_per_s"]) > 0
    # the device's process: the forward passes' threads hold its lock; a 50-sample window may catch it in none
    # (test_the_projection_... reads that case), two of them hardly
    assert front["gil_ms_per_image"] + front["rt_gil_ms_per_image"] > 0
    assert front["one_over_gil"] > 0 and front["ceiling"] == min(front["cores_over_cpu"], front["one_over_gil"])
    assert servers_under(tmp_path / "work") == []


def test_the_projection_reads_a_lock_held_in_no_sample_as_no_ceiling_and_a_front_end_given_nothing_as_none():
    """project(): 16 cores over the CPU an image; the lock ceiling is the smaller of one over the device process's
    lock an image and the front ends' sum of one over theirs. A lock no sample caught (0 ms) bounds nothing; a front
    end that scored nothing (an infinite ms an image) adds nothing."""
    project = benchmark_module("host_bench").project

    def projected(**r):
        r = {"cpu_ms_per_image": 4.0, **r}
        project(r, cores=16, target=2400)
        return r

    one = projected(gil_ms_per_image=0.5, rt_gil_ms_per_image=0.25)
    assert (one["cores_over_cpu"], one["one_over_gil_bound"], one["one_over_gil"]) == (4000, 2000, 4000)
    assert (one["ceiling"], one["ceiling_bound"], one["meets_target"]) == (4000, 2000, True)
    assert projected(gil_ms_per_image=0.0)["one_over_gil"] == float("inf")  # no lock caught: the cores bind
    fronts = {"gil_ms_per_image": 0.1, "gil_front_ends_ms_per_image": [0.5, 0.25]}
    assert projected(**fronts)["one_over_gil"] == 2000 + 4000  # the front ends bind before the device (10,000)
    assert projected(**{**fronts, "gil_ms_per_image": 0.25})["one_over_gil"] == 4000  # the device binds
    rt = {**fronts, "rt_gil_ms_per_image": 0.0, "rt_gil_front_ends_ms_per_image": [0.5, 0.0]}
    assert projected(**rt)["one_over_gil"] == float("inf")  # the failure CI met: a front end's lock caught in no sample
    given_nothing = projected(**{**fronts, "gil_front_ends_ms_per_image": [0.5, float("inf")]})
    assert given_nothing["one_over_gil"] == 2000 and given_nothing["ceiling"] == 2000
    assert not given_nothing["meets_target"]


def test_help_documents_every_flag():
    text = help_text("host_bench.py")
    flags = ("--modes", "--window-s", "--gil-window-s", "--rate", "--cores", "--target", "--realtime", "--py-spy")
    for flag in (*flags, "--out"):
        assert flag in text


# A process whose main thread holds its lock a known share of the time: it spins in Python 2 ms, then waits 3 ms in
# select() (which releases the lock), and reports the share it measured itself, over its whole run.
DUTY = """
import select, sys, time
start = time.perf_counter(); held = 0.0
while time.perf_counter() - start < float(sys.argv[1]):
    t = time.perf_counter()
    while time.perf_counter() - t < 0.002:
        pass
    held += time.perf_counter() - t
    select.select([], [], [], 0.003)
print(held / (time.perf_counter() - start))
"""


def test_the_lock_is_read_as_the_share_of_time_a_thread_holds_it(tmp_path):
    """sample_lock reads who holds the lock without stopping the process: a known 40% duty reads as itself, as it
    runs and on the real-time scheduler. (Stopping the process for each sample, py-spy's default, read 27% here.)"""
    sample_lock = benchmark_module("host_bench").sample_lock
    child = subprocess.Popen([sys.executable, "-c", DUTY, "9"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        windows = [sample_lock(child.pid, 150, 3, tmp_path / f"{rt}.txt", realtime=rt) for rt in (0, 10)]
        policy = os.sched_getscheduler(child.pid)  # put back after the real-time window
        duty = float(child.communicate(timeout=30)[0])
    finally:
        child.kill()
    assert 0.3 < duty < 0.5
    for counts, errors, log in windows:
        held = (sum(counts.values()) + errors) / (150 * 3)
        assert set(counts) == {("main", child.pid)}, counts  # the one thread that holds it, by its id
        assert abs(held - duty) < 0.25 * duty, (held, duty, log)
    assert policy == os.SCHED_OTHER
