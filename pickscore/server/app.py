"""Wiring: backend + engine + api + transports (scoring.v1 and KServe v2 over gRPC, HTTP) + health + reflection +
metrics; the lifecycle.

    pickscore serve --model demo --port 8001 --http-port 8000 --metrics-port 8002

Start-up: bind every port (a busy one stops the start, named, before the model loads), report NOT_SERVING, load
and warm up, then SERVING. On SIGTERM (or SIGINT): NOT_SERVING, new requests get UNAVAILABLE, admitted ones finish
(at most ``grace_period_s``), then exit 0.
``ServerThread`` runs the same server on a background thread, for tests, benchmarks and notebooks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2_grpc

from pickscore.backends import Backend
from pickscore.server import ports
from pickscore.server.api import Scoring
from pickscore.server.api_kserve import KServeModels
from pickscore.server.boundary import ServerState
from pickscore.server.engine import Engine, Shared
from pickscore.server.http import HttpFrontDoor
from pickscore.server.kserve_v2 import SERVICE_NAME as KSERVE_SERVICE_NAME
from pickscore.server.kserve_v2 import KServeV2Service
from pickscore.server.metrics import Metrics
from pickscore.server.repository import Repository, default_name, model_specs
from pickscore.server.scoring_v1 import SERVICE_NAME, ScoringService
from pickscore.server.security import ServerTls, TokenSet
from pickscore.server.settings import Settings
from pickscore.server.towers import TowerClient
from pickscore.v1 import scoring_pb2_grpc

log = logging.getLogger("pickscore.server")
# Health service names: "" and the scoring service are SERVING only while the server takes requests
# (readiness); this one is SERVING for as long as the process answers (liveness).
LIVENESS_SERVICE = "liveness"


class Server:
    """One server over the models of ``settings``. ``backend``: the one model's backend, passed in rather than loaded
    (tests inject faults that way). ``towers``: this server is one of several front ends (``serve --front-ends``):
    its models' forward passes run in the process that owns the device, it shares its gRPC and HTTP ports with
    the other front ends, and its metrics port is on loopback, for that process to gather."""

    def __init__(self, settings: Settings, backend: Backend | None = None, towers: TowerClient | None = None):
        settings.validate()
        self.settings = settings
        self.towers = towers
        self.specs = model_specs(settings)  # a bad --model or repository stops the start here, before any port
        default_name(settings, self.specs)
        self.metrics = Metrics(gpu=towers is None)
        # Credentials are read here: a bad certificate, key or token file stops the start, naming the file.
        self.state = ServerState(self.metrics, TokenSet.from_settings(settings))
        self.tls = ServerTls.from_settings(settings)  # None: plaintext
        self.state.max_per_client = settings.max_inflight_per_client
        self.shared = Shared(settings)
        load = (lambda ref: towers.load(ref, settings)) if towers else None
        self.repository = Repository(settings, self.metrics, self.shared, self._on_hung, backend, load)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http: HttpFrontDoor | None = None
        self.http_port: int | None = None
        self._http_socket: socket.socket | None = None  # bound before the model loads, served after
        self._grpc: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    @property
    def engine(self) -> Engine:
        """The default model's engine."""
        return self.repository.get("").engine

    @property
    def backend(self) -> Backend:
        """The default model's backend."""
        return self.repository.get("").backend

    async def start(self) -> None:
        """Bind every port (a busy one stops the start here, before the model loads, naming it), report
        NOT_SERVING, load and warm up, then SERVING. A start that fails releases what it had bound."""
        try:
            await self._start()
        except BaseException:
            await self._close(grace=None)
            raise

    async def _start(self) -> None:
        s = self.settings
        self._bind()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # For liveness probes: SERVING whenever the process answers at all, through warm-up and drain, so
        # that an orchestrator restarts a wedged process but not one that is loading or finishing its work.
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        scoring = Scoring(self.repository)
        self.models = KServeModels(self.repository, self.state)
        scoring_pb2_grpc.add_ScoringServiceServicer_to_server(ScoringService(scoring, self.state), self._grpc)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeV2Service(self.models), self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, KSERVE_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        await self._grpc.start()  # health answers NOT_SERVING while the models load and warm up
        if self._http_socket is not None:  # the same engines, state and credentials behind a second transport
            self.http = HttpFrontDoor(scoring, self.models, self.state, s.max_message_bytes)
            sock, self._http_socket = self._http_socket, None  # the front door owns it now
            self.http_port = await self.http.start(sock, self.tls.ssl_context() if self.tls else None)
        await self.repository.start(self.specs)
        if s.model_control_mode == "poll":
            self._tasks.add(watcher := asyncio.ensure_future(self.repository.watch()))
            watcher.add_done_callback(self._tasks.discard)
        self.state.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "front end serving" if self.towers else "serving",  # with front ends "serving" says all of them are
            extra={
                "port": self.port,
                "http_port": self.http_port,
                "metrics_port": self.metrics_port,
                "models": list(self.repository.serving),
                "default_model": self.repository.default,
            },
        )

    def _bind(self) -> None:
        """The gRPC port, the HTTP port (held until the front door serves it) and the metrics port (served from
        now on); OSError naming the first one that cannot be bound."""
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # A second server on a taken port must fail, not share it silently; front ends share theirs.
            ("grpc.so_reuseport", int(self.towers is not None)),
        ]
        self._grpc = grpc.aio.server(options=options)
        address = f"{s.host}:{s.port}"
        # gRPC would log a line of its own and then say only that it failed: ask the OS first, and why.
        if s.port and not self.towers and (busy := ports.why_not(s.host, s.port)):
            raise ports.unbindable(s.host, s.port, "port", busy)
        try:
            if self.tls:  # the certificate files are re-read when they change, before each new connection
                self.port = self._grpc.add_secure_port(address, self.tls.credentials())
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as e:  # taken between the check and now
            raise ports.unbindable(s.host, s.port, "port", e) from None
        if s.http_port >= 0:
            self._http_socket = ports.listen(s.host, s.http_port, "http_port", share=self.towers is not None)
        if s.metrics_port >= 0:
            host = "127.0.0.1" if self.towers else s.host  # a front end's: gathered by the device's process
            try:
                self.metrics_port = self.metrics.serve_http(host, s.metrics_port)
            except OSError as e:
                raise ports.unbindable(host, s.metrics_port, "metrics_port", e) from None

    async def drain(self) -> None:
        """NOT_SERVING, refuse new requests, wait for admitted ones (at most the grace period), stop."""
        if self.state.draining:
            return await self._stopped.wait()
        self.state.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        grace = self.settings.grace_period_s
        log.info("draining", extra={"inflight": self.state.inflight, "grace_period_s": grace})
        give_up = time.monotonic() + grace
        while self.state.inflight and time.monotonic() < give_up:
            await asyncio.sleep(0.01)
        if self.state.inflight:
            log.warning("grace period over; cancelling what is left", extra={"inflight": self.state.inflight})
        await self._close(grace=max(0.0, give_up - time.monotonic()))
        log.info("stopped", extra={"inflight": self.state.inflight})  # 0 unless the grace period ran out
        self._stopped.set()

    async def _close(self, grace: float | None) -> None:
        """Stop serving and release every port: HTTP, gRPC (admitted RPCs get ``grace`` seconds), metrics; then
        the engine. Safe on a start that failed part way."""
        if self.http:
            await self.http.stop()
        if self._http_socket is not None:  # bound, never served: the start failed
            self._http_socket.close()
            self._http_socket = None
        if self._grpc:
            await self._grpc.stop(grace=grace)
        await asyncio.to_thread(self.metrics.stop_http)  # waits out its thread's poll (at most 0.5 s)
        for task in list(self._tasks):
            task.cancel()
        await self.repository.stop()
        self.shared.close(hung=self.repository.hung)

    async def wait(self) -> None:
        await self._stopped.wait()

    def reload_credentials(self) -> None:
        """SIGHUP: re-read the TLS files and the token file now rather than when they are next seen to change."""
        log.info("reloading credentials")
        if self.tls:
            self.tls.reload()
        self.state.tokens.reload()

    def _on_hung(self, reason: str) -> None:
        """A tower's watchdog fired: refuse work and report NOT_SERVING on readiness and liveness alike, so
        the orchestrator takes this replica out of rotation and replaces it (its stuck thread cannot be freed)."""
        self.state.unhealthy = reason
        self._tasks.add(task := asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)))
        task.add_done_callback(self._tasks.discard)

    async def _set_health(self, status) -> None:
        services = ("", SERVICE_NAME, LIVENESS_SERVICE) if self.state.unhealthy else ("", SERVICE_NAME)
        for service in services:
            await self.health.set(service, status)


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain; the process's exit status. SIGHUP re-reads the credentials."""
    configure_logging(settings)
    asyncio.run(run(settings))
    return 0


async def run(settings: Settings, towers: TowerClient | None = None, on_serving=None) -> None:
    """One server until SIGTERM/SIGINT and its drain; ``on_serving(server)`` once it serves."""
    server = Server(settings, towers=towers)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.drain()))
    loop.add_signal_handler(signal.SIGHUP, server.reload_credentials)  # re-read certificates and tokens now
    await server.start()
    if on_serving is not None:
        on_serving(server)
    await server.wait()


class ServerThread:
    """A Server on its own event loop in a daemon thread: ``with ServerThread(settings) as s: s.port``."""

    def __init__(self, settings: Settings, backend: Backend | None = None):
        self.server = Server(settings, backend)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pickscore-server", daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.call(self.server.drain())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict:
    """A record's own fields: what a log call passed as ``extra`` (request_id, rpc, code, ports, ...)."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """A line a person reads: time, level, logger, message, then the record's fields as key=value (values as
    compact JSON), so that a text log says what a JSON one does (the ports "serving" names, a request's id)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # the line; format() puts a traceback below it
        compact = {"default": str, "separators": (",", ":")}
        return super().formatMessage(record) + "".join(
            f" {k}={json.dumps(v, **compact)}" for k, v in _fields(record).items()
        )


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger("pickscore")
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
