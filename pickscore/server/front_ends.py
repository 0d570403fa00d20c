"""``pickscore serve --front-ends N``: N front-end processes on the same ports, one process owning the device.

    pickscore serve --model demo --front-ends 2 --decode-processes

This process reserves the gRPC and HTTP ports (SO_REUSEPORT: the kernel spreads new connections over the front
ends that listen there), starts the ``TowerHost`` (every model's weights and forward passes) and the front ends
(each a whole ``Server``, its models' towers remote), and serves the metrics port itself: one scrape gathers
every front end's series, each labelled ``front_end``. It logs "serving" once every front end serves. SIGTERM or
SIGINT: each front end drains (its admitted requests finish); SIGHUP: each re-reads its credentials. A front end
that exits on its own stops the rest, and the server exits 1, for its supervisor to restart it whole; a front
end whose device process has gone drains and exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import urllib.request
from dataclasses import replace

from prometheus_client import CollectorRegistry, Metric, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from pickscore.resources import usable_cores
from pickscore.server import ports
from pickscore.server.metrics import GpuCollector
from pickscore.server.settings import Settings
from pickscore.server.towers import TowerClient, TowerHost

log = logging.getLogger("pickscore.server")


class FrontEndMetrics:
    """A collector: every front end's series, scraped from its loopback metrics port, with a ``front_end`` label."""

    def __init__(self, host: TowerHost):
        self.host = host

    def collect(self):
        families: dict[str, Metric] = {}
        for index, info in sorted(self.host.front_ends.items()):
            url = f"http://127.0.0.1:{info['metrics_port']}/metrics"
            try:
                text = urllib.request.urlopen(url, timeout=5).read().decode()
            except OSError:  # exiting: the scrape goes on with the others
                continue
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                for sample in family.samples:
                    labels = {**sample.labels, "front_end": str(index)}
                    merged.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
        yield from families.values()


def serve_front_ends(settings: Settings) -> int:
    """Run the device's process and its front ends until SIGTERM/SIGINT (0) or until a front end fails (1)."""
    from pickscore.server.app import configure_logging

    configure_logging(settings)
    s = settings
    held = {"port": ports.reserve(s.host, s.port, "port")}  # a busy port stops the start here, named
    if s.http_port >= 0:
        held["http_port"] = ports.reserve(s.host, s.http_port, "http_port")
    chosen = {name: sock.getsockname()[1] for name, sock in held.items()}
    host = TowerHost(s)
    registry = CollectorRegistry()
    registry.register(FrontEndMetrics(host))
    registry.register(GpuCollector())  # the device's gauges, from the one process with a CUDA context
    metrics_server = None
    if s.metrics_port >= 0:
        try:
            metrics_server, _ = start_http_server(s.metrics_port, addr=s.host, registry=registry)
        except OSError as e:
            raise ports.unbindable(s.host, s.metrics_port, "metrics_port", e) from None
    host.start()
    each = replace(
        s,
        front_ends=0,
        port=chosen["port"],
        http_port=chosen.get("http_port", -1),
        metrics_port=0,
        # The host's cores divided, at least 2 each: the kernel spreads connections, not load, so one front end
        # may take more than its share.
        decode_workers=s.decode_workers or max(2, usable_cores() // s.front_ends),
    )
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this one's threads
    procs = [
        context.Process(target=_front_end, args=(each, host.path, i, os.getpid()), name=f"front-end-{i}")
        for i in range(s.front_ends)
    ]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: [os.kill(p.pid, signal.SIGHUP) for p in procs if p.pid])
    for proc in procs:
        proc.start()
    status, serving = 0, False
    try:
        while not stop.is_set():
            multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0.2)
            if failed := [p for p in procs if p.exitcode is not None]:
                log.error(
                    "a front end exited; stopping the server",
                    extra={"front_end": procs.index(failed[0]), "exit_status": failed[0].exitcode},
                )
                status = 1
                break
            if not serving and len(host.front_ends) == len(procs):
                serving = True
                log.info(
                    "serving",
                    extra={
                        **chosen,
                        "metrics_port": metrics_server.server_port if metrics_server else None,
                        "front_ends": [host.front_ends[i]["pid"] for i in range(len(procs))],
                        "device_process": os.getpid(),
                    },
                )
    finally:
        for proc in procs:  # each drains: its admitted requests finish, within the grace period
            if proc.exitcode is None and proc.pid:
                os.kill(proc.pid, signal.SIGTERM)
        give_up = time.monotonic() + s.grace_period_s + 30
        for proc in procs:
            proc.join(max(0.0, give_up - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        if metrics_server is not None:
            metrics_server.shutdown()
        host.close()
        for sock in held.values():
            sock.close()
    log.info("stopped", extra={"exit_status": status})
    return status


def _front_end(settings: Settings, path: str, index: int, device_pid: int) -> None:
    """One front end: a whole server whose towers are the device process's; it drains if that process goes."""
    import asyncio

    from pickscore.server.app import configure_logging, run

    configure_logging(settings)
    towers = TowerClient(path)

    def serving(server) -> None:
        towers.hello(index, pid=os.getpid(), metrics_port=server.metrics_port)
        threading.Thread(target=orphaned, args=(server,), name="front-end-watch", daemon=True).start()

    def orphaned(server) -> None:
        while os.getppid() == device_pid:
            time.sleep(0.5)
        log.error("the device process has gone; draining", extra={"front_end": index})
        os.kill(os.getpid(), signal.SIGTERM)

    asyncio.run(run(settings, towers, serving))
