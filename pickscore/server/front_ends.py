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
import sys
import threading
import time
import urllib.request
from dataclasses import replace

from prometheus_client import CollectorRegistry, Metric, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from pickscore.errors import PickScoreError
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
        with self.host.hello:  # a front end may say hello meanwhile
            front_ends = sorted(self.host.front_ends.items())
        for index, info in front_ends:
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
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = FrontEnds(settings)
    try:
        signal.signal(signal.SIGHUP, lambda *_: server.signal(signal.SIGHUP))
        server.start()
        status = server.watch(stop)
    finally:
        server.close()
    log.info("stopped", extra={"exit_status": status})
    return status


class FrontEnds:
    """The ports held, the towers' host, the metrics port, and the front-end processes (``start``)."""

    def __init__(self, settings: Settings):
        s = self.settings = settings
        self.procs: list[multiprocessing.Process] = []
        self.metrics_server = None
        self.held = {"port": ports.reserve(s.host, s.port, "port")}  # a busy port stops the start here, named
        self.host: TowerHost | None = None
        try:
            if s.http_port >= 0:
                self.held["http_port"] = ports.reserve(s.host, s.http_port, "http_port")
            self.host = TowerHost(s)
            registry = CollectorRegistry()
            registry.register(FrontEndMetrics(self.host))
            registry.register(GpuCollector())  # the device's gauges, from the one process with a CUDA context
            if s.metrics_port >= 0:
                try:
                    self.metrics_server, _ = start_http_server(s.metrics_port, addr=s.host, registry=registry)
                except OSError as e:
                    raise ports.unbindable(s.host, s.metrics_port, "metrics_port", e) from None
        except BaseException:
            self.close()
            raise
        self.ports = {name: sock.getsockname()[1] for name, sock in self.held.items()}

    def start(self) -> None:
        s = self.settings
        self.host.start()
        each = replace(
            s,
            front_ends=0,
            port=self.ports["port"],
            http_port=self.ports.get("http_port", -1),
            metrics_port=0,
            # The host's cores divided, at least 2 each: the kernel spreads connections, not load, so one front
            # end may take more than its share.
            decode_workers=s.decode_workers or max(2, usable_cores() // s.front_ends),
        )
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this one's threads
        for i in range(s.front_ends):
            proc = context.Process(
                target=_front_end, args=(each, self.host.path, i, os.getpid()), name=f"front-end-{i}"
            )
            self.procs.append(proc)
            proc.start()

    def watch(self, stop: threading.Event) -> int:
        """Until ``stop`` (0) or a front end exits on its own (1); logs "serving" once every front end serves."""
        serving = False
        while not stop.is_set():
            multiprocessing.connection.wait([p.sentinel for p in self.procs], timeout=0.2)
            if failed := [p for p in self.procs if p.exitcode is not None]:
                log.error(
                    "a front end exited; stopping the server",
                    extra={"front_end": self.procs.index(failed[0]), "exit_status": failed[0].exitcode},
                )
                return 1
            if not serving and len(self.host.front_ends) == len(self.procs):
                serving = True
                log.info(
                    "serving",
                    extra={
                        **self.ports,
                        "metrics_port": self.metrics_server.server_port if self.metrics_server else None,
                        "front_ends": [self.host.front_ends[i]["pid"] for i in range(len(self.procs))],
                        "device_process": os.getpid(),
                    },
                )
        return 0

    def signal(self, signum: int) -> None:
        for proc in self.procs:
            if proc.exitcode is None and proc.pid:
                os.kill(proc.pid, signum)

    def close(self) -> None:
        """Each front end drains (its admitted requests finish, within the grace period), then all is released."""
        self.signal(signal.SIGTERM)
        give_up = time.monotonic() + self.settings.grace_period_s + 30
        for proc in self.procs:
            proc.join(max(0.0, give_up - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.host is not None:
            self.host.close()
        for sock in self.held.values():
            sock.close()


def _front_end(settings: Settings, path: str, index: int, device_pid: int) -> None:
    """One front end: a whole server whose towers are the device process's; it drains if that process goes."""
    import asyncio

    from pickscore.server.app import configure_logging, run

    configure_logging(settings)
    towers = TowerClient(path)

    def serving(server) -> None:
        towers.hello(index, pid=os.getpid(), metrics_port=server.metrics_port)
        threading.Thread(target=orphaned, name="front-end-watch", daemon=True).start()

    def orphaned() -> None:
        while os.getppid() == device_pid:
            time.sleep(0.5)
        log.error("the device process has gone; draining", extra={"front_end": index})
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        asyncio.run(run(settings, towers, serving))
    except (PickScoreError, OSError, ValueError) as e:  # a bad model, as `pickscore serve` says it: one line
        print(f"pickscore: error: front end {index}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
