"""Every server knob in one frozen, typed object: a flag ``--max-batch-size``, a variable ``PICKSCORE_MAX_BATCH_SIZE``.

    settings = Settings.from_args(argv)   # flags beat environment variables beat defaults
    settings.validate()                   # ValueError saying how to fix it

The help text of each flag is the field's doc below; ``pickscore serve --help`` prints them all.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from pickscore.backends import DTYPES, KINDS
from pickscore.flags import add_flags, check_choices, field_type, flag_name, given
from pickscore.flags import option as _f
from pickscore.limits import DEFAULT_MAX_PIXELS
from pickscore.resources import usable_cores

ENV_PREFIX = "PICKSCORE_"


@dataclass(frozen=True)
class Settings:
    model: str = _f(
        "demo",
        "model reference: demo (bundled), a Hugging Face CLIP or open_clip directory, a checkpoint "
        "or ONNX export written by this project, or a hub id in the local Hugging Face cache; served as "
        "'pickscore'. Several models: NAME=REF, the flag repeated (or comma-separated), the first the default",
        repeat=True,
    )
    model_repository: str = _f(
        "",
        "serve every model of a directory instead of --model: DIR/NAME/ holds a model, or numbered version "
        "directories DIR/NAME/1/, DIR/NAME/2/ (the highest is served), and optionally DIR/NAME/model.json "
        '({"normalize": {"mean": M, "std": S}}: the declared map of Rewards\' normalize=declared)',
    )
    default_model: str = _f(
        "",
        "the model a request naming none is scored by; empty: the first --model, or the repository's model "
        "'pickscore' if it has one, else its first by name",
    )
    model_control_mode: str = _f(
        "none",
        "none: the models loaded at start are served until exit; poll: watch --model-repository and load a new "
        "version, warm it, then swap it in (the old one drains), unload a removed model; explicit: KServe's "
        "repository API (RepositoryModelLoad/Unload, /v2/repository/...) loads and unloads, behind the token",
        ("none", "poll", "explicit"),
    )
    repository_poll_s: float = _f(5.0, "with --model-control-mode poll: seconds between looks at the repository")
    backend: str = _f("auto", "inference backend; auto is onnxruntime for an ONNX export, torch otherwise", KINDS)
    device: str = _f("auto", "torch device: auto (CUDA when present), cpu, cuda, cuda:1, ...")
    dtype: str = _f(
        "auto",
        "compute precision of the torch backend; auto is bf16 on CUDA, fp32 on CPU (exact). On a CPU with AMX-BF16 "
        "or AVX512-BF16, bf16 is the faster path: check its rank agreement first (README, 'Which path on which CPU')",
        DTYPES,
    )
    compile: bool = _f(
        False,
        "torch backend: compile the towers (torch.compile; CUDA graphs on a GPU), batches "
        "padded to powers of two, every size compiled during warm-up (minutes on a CPU)",
    )
    host: str = _f("0.0.0.0", "address the gRPC server binds (127.0.0.1 for loopback only)")
    port: int = _f(8001, "gRPC port (scoring.v1, KServe v2, health, reflection); 0 picks a free port")
    http_port: int = _f(
        8000,
        "HTTP port (KServe v2 REST for tritonclient.http, /v1/score and /v1/rank in JSON, multipart or msgpack, "
        "/openapi.json) on the same host, engine and settings; -1 disables, 0 picks a free port",
    )
    metrics_port: int = _f(
        8002,
        "Prometheus /metrics port on the same host (Triton's: 8000 HTTP, 8001 gRPC, 8002 metrics); -1 disables, 0 "
        "picks a free port",
    )
    max_batch_size: int = _f(32, "most images per forward pass of the image tower")
    text_max_batch_size: int = _f(64, "most prompts per forward pass of the text tower")
    max_queue_delay_ms: float = _f(5.0, "longest a queued item waits for its batch to fill, in milliseconds")
    max_gather_ms: float = _f(
        100.0,
        "longest a batch stays open, past its oldest item, for images of admitted requests still being decoded "
        "(so a request's images share one forward pass); 0: only --max-queue-delay-ms",
    )
    max_queue_size: int = _f(
        1024,
        "images (and prompts) admitted but not yet computed, per tower; beyond it "
        "requests get RESOURCE_EXHAUSTED at once",
    )
    max_queue_wait_s: str = _f(
        "auto",
        "admission by time: a request whose estimated wait for the towers (work admitted at its priority or above "
        "x each tower's measured seconds per item) exceeds this bound, or its own deadline, is refused at once "
        "with RESOURCE_EXHAUSTED and a retry hint. auto: the tower's batches in flight (1 on a CPU, 2 on a GPU) x "
        "its measured batch time (max batch size x seconds per item), the work that keeps it busy and no more "
        "(docs/DESIGN.md, 'Admission by time'); SECONDS: a fixed bound; 0 admits by --max-queue-size alone",
    )
    max_inflight_per_client: int = _f(
        0,
        "most requests one caller may have in flight (beyond it RESOURCE_EXHAUSTED); the caller is the "
        "`x-client-id` metadata or header, else the peer's address; 0: no per-caller limit",
    )
    batch_timeout_s: float = _f(
        120.0,
        "watchdog: a forward pass that has not returned after this many seconds fails its batch with "
        "INTERNAL and marks the replica NOT_SERVING (readiness and liveness) so it is replaced; 0 disables",
    )
    max_images_per_request: int = _f(256, "most images one request may carry")
    max_image_bytes: int = _f(32 << 20, "largest encoded image accepted, in bytes")
    max_pixels: int = _f(
        DEFAULT_MAX_PIXELS,
        "largest image accepted, in pixels (width x height), checked before "
        "decoding: a guard against decompression bombs",
    )
    max_aspect_ratio: float = _f(
        50.0,
        "longest side over shortest side accepted (checked before decoding): the centre crop of a "
        "thinner strip keeps under 1/50 of it",
    )
    max_message_bytes: int = _f(64 << 20, "largest gRPC message received or sent, in bytes")
    compute_threads: int = _f(
        0,
        "threads each tower's forward pass may use (torch / ONNX Runtime intra-op); 0: "
        "every usable core on CPU, 1 on a GPU (docs/DESIGN.md, 'Threads')",
    )
    decode_workers: int = _f(0, "workers decoding and preprocessing images; 0: one per usable core")
    decode_processes: bool = _f(
        False,
        "decode in worker processes instead of threads: past the interpreter lock, "
        "for hosts with many cores (docs/DESIGN.md, 'Threads')",
    )
    decode_on_device: bool = _f(
        False,
        "torch backend: decode JPEGs (nvJPEG on a GPU) and resize them on the model's device, for hosts whose "
        "CPUs cannot feed their GPU; close to, not equal to, the exact preprocessing (rank agreement in "
        "benchmarks/RESULTS.md); other formats take the exact path. Threads only",
    )
    front_ends: int = _f(
        0,
        "serve from N front-end processes (transports, validation, decoding, caches, batching), all on the same "
        "ports, feeding one process that owns the device and runs every forward pass, merging their batches: for "
        "GPU hosts whose callers send more requests than one process takes in (docs/DESIGN.md, 'Front ends'). "
        "The kernel spreads connections, not calls, over them. 0: one process",
    )
    text_cache_bytes: int = _f(64 << 20, "text-embedding cache size in bytes (per prompt; 0 disables)")
    image_cache_bytes: int = _f(0, "image-embedding cache size in bytes (per image content hash; 0 disables)")
    stream_window: int = _f(8, "requests of one ScoreStream computed at the same time")
    auth_token: str = _f(
        "",
        "when set, requests must carry the metadata `authorization: Bearer TOKEN` (else "
        "UNAUTHENTICATED); health and reflection stay open. Prefer the variable to the flag",
    )
    auth_token_file: str = _f(
        "",
        "a file of accepted bearer tokens, one per line (blank lines and # comments ignored), re-read "
        "when it changes: rotate tokens without a restart. Combines with --auth-token",
    )
    tls_cert: str = _f("", "PEM certificate chain of the server: serve TLS (with --tls-key); re-read when it changes")
    tls_key: str = _f("", "PEM private key of --tls-cert")
    tls_client_ca: str = _f(
        "",
        "PEM CA bundle: require client certificates signed by it (mutual TLS); needs --tls-cert; "
        "re-read when it changes",
    )
    grace_period_s: float = _f(30.0, "on SIGTERM, how long admitted requests may take to finish before exit")
    warmup: bool = _f(True, "run one batch through each tower before reporting SERVING")
    log_level: str = _f("info", "log level", ("debug", "info", "warning", "error"))
    log_format: str = _f("json", "log lines as JSON objects, or as text with key=value fields", ("json", "text"))

    def validate(self) -> None:
        """Raise ValueError with what to change."""
        positive = (
            "max_batch_size",
            "text_max_batch_size",
            "max_queue_size",
            "max_images_per_request",
            "max_image_bytes",
            "max_pixels",
            "max_message_bytes",
            "stream_window",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name} must be at least 1, got {getattr(self, name)} ({flag_name(name)} or {env_name(name)})"
                )
        for name in (
            "compute_threads",
            "decode_workers",
            "front_ends",
            "text_cache_bytes",
            "image_cache_bytes",
            "max_queue_delay_ms",
            "max_gather_ms",
            "max_inflight_per_client",
            "batch_timeout_s",
            "grace_period_s",
            "repository_poll_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{name} must not be negative, got {getattr(self, name)} ({flag_name(name)} or {env_name(name)})"
                )
        if self.max_queue_size < max(self.max_batch_size, self.max_images_per_request):
            raise ValueError(
                f"max_queue_size ({self.max_queue_size}) must hold at least one full batch and one full "
                f"request (max_batch_size {self.max_batch_size}, max_images_per_request "
                f"{self.max_images_per_request}); raise --max-queue-size"
            )
        if self.model_control_mode == "poll" and not self.model_repository:
            raise ValueError("--model-control-mode poll watches --model-repository: give the directory")
        if self.decode_on_device and self.decode_processes:
            raise ValueError("--decode-on-device decodes in threads: drop --decode-processes")
        if self.front_ends and self.decode_on_device:
            raise ValueError("--front-ends decode on the host: drop --decode-on-device")
        if self.front_ends and self.model_control_mode == "explicit":
            raise ValueError(
                "--front-ends and --model-control-mode explicit: a load or unload would reach one front end; "
                "use poll (each front end watches the repository) or none"
            )
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be at least 1, got {self.max_aspect_ratio} (--max-aspect-ratio)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both to serve TLS, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs the server's own --tls-cert and --tls-key")
        self.queue_wait_limit()  # ValueError naming the flag
        check_choices(self)

    def queue_wait_limit(self) -> float | None:
        """--max-queue-wait-s as admission takes it: seconds (0: by count alone), or None for auto."""
        text = str(self.max_queue_wait_s).strip().lower()
        if text == "auto":
            return None
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not seconds >= 0 or math.isinf(seconds):
            raise ValueError(
                f"max_queue_wait_s must be auto or a number of seconds, 0 or more; got {self.max_queue_wait_s!r} "
                f"(--max-queue-wait-s or {env_name('max_queue_wait_s')})"
            )
        return seconds

    def load_options(self) -> dict[str, Any]:
        """``load_backend``'s keyword arguments these settings choose (in this process, or the device's)."""
        return dict(
            kind=self.backend,
            device=self.device,
            dtype=self.dtype,
            max_batch_size=self.max_batch_size,
            threads=self.compute_threads,
            compile=self.compile,
        )

    @property
    def workers(self) -> int:
        return self.decode_workers or usable_cores()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``PICKSCORE_*`` variables, then ``overrides``."""
        environ = os.environ if environ is None else environ
        known = {env_name(f.name) for f in fields(cls)}
        for name in sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known):
            raise ValueError(_unknown_variable(name, known))
        values = {}
        for f in fields(cls):
            if env_name(f.name) in environ:
                values[f.name] = _parse(f.name, field_type(f), environ[env_name(f.name)])
        return replace(cls(**values), **overrides)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field; the default shown is the built-in one, which the environment may change."""
        add_flags(parser, cls, env=env_name)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
        """Flags given on the command line over the environment over defaults; validated."""
        settings = cls.from_env(environ, **given(args, cls))
        settings.validate()
        return settings


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _unknown_variable(name: str, known: set[str]) -> str:
    """Why ``name`` is refused (a typo would otherwise leave a setting at its default unnoticed)."""
    message = f"{name} is not a setting"
    if close := difflib.get_close_matches(name, sorted(known), n=1):
        message += f" (did you mean {close[0]}?)"
    if name.startswith((ENV_PREFIX + "SERVICE_", ENV_PREFIX + "PORT_")):
        message += "; Kubernetes sets it for a Service named pickscore: give the pod spec enableServiceLinks: false"
    return message + "; `pickscore serve --help` lists every PICKSCORE_* variable"


def _parse(name: str, kind: type, text: str) -> Any:
    try:
        if kind is bool:
            if text.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(text)
            return text.strip().lower() in ("1", "true", "yes", "on")
        return kind(text)
    except ValueError:
        raise ValueError(f"{env_name(name)}={text!r} is not a valid {kind.__name__}") from None
