"""Prometheus metrics, in base units with the ``pickscore_`` prefix (docs/DESIGN.md, "Metrics").

Each server owns one ``Metrics`` (its own registry, so several servers can live in one process);
``serve_http`` exposes it on ``http://HOST:PORT/metrics``. Dashboards and alert rules in deploy/ use
exactly these names.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

# Latency buckets from 0.5 ms to 30 s; batch sizes in powers of two.
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH = tuple(float(2**k) for k in range(11))  # 1 .. 1024


# "model": the served model's name (--model NAME=REF, or the repository's directory); per model, every version
TOWER, CACHE = ("model", "tower"), ("model", "cache")
# attribute: (kind, name, help, labels[, buckets]), registered in this order
SPECS: dict[str, tuple] = {
    "request_duration": (
        Histogram,
        "pickscore_request_duration_seconds",
        "Time from receiving a request to answering it",
        ("transport", "rpc", "code"),
        SECONDS,
    ),
    "requests": (
        Counter,
        "pickscore_requests",
        "Requests answered, by transport (grpc, http), RPC (the same names on both) and status code",
        ("transport", "rpc", "code"),
    ),
    "queue_wait": (
        Histogram,
        "pickscore_queue_wait_seconds",
        "Time a request's items waited in a tower's queue before their batch started (one per batch they ran in)",
        TOWER,
        SECONDS,
    ),
    "preprocess": (
        Histogram,
        "pickscore_preprocess_seconds",
        "Time to decode and preprocess one request's images (for one preprocessing), or tokenize its prompts",
        ("stage",),
        SECONDS,
    ),
    "inference": (Histogram, "pickscore_inference_seconds", "Forward pass time of one batch", TOWER, SECONDS),
    "batch_size": (Histogram, "pickscore_batch_size", "Items per forward pass", TOWER, BATCH),
    "images_scored": (Counter, "pickscore_images_scored", "Images scored", ("model",)),
    "cache_hits": (Counter, "pickscore_cache_hits", "Embedding cache hits", CACHE),
    "cache_misses": (Counter, "pickscore_cache_misses", "Embedding cache misses", CACHE),
    "cache_bytes": (Gauge, "pickscore_cache_bytes", "Bytes held by an embedding cache", CACHE),
    "dropped": (
        Counter,
        "pickscore_dropped_items",
        "Queued items dropped before compute",
        ("model", "tower", "reason"),
    ),
    "batch_failures": (Counter, "pickscore_batch_failures", "Batches whose forward pass failed", TOWER),
    "queue_depth": (Gauge, "pickscore_queue_depth", "Items admitted to a tower and not yet computed", TOWER),
    "queue_capacity": (Gauge, "pickscore_queue_capacity", "Most items a tower admits (max_queue_size)", TOWER),
    "estimated_wait": (
        Gauge,
        "pickscore_estimated_wait_seconds",
        "Time a newly admitted item would wait: admitted work over the tower's measured throughput",
        TOWER,
    ),
    "refusals": (
        Counter,
        "pickscore_admission_refusals",
        "Requests refused with RESOURCE_EXHAUSTED before any work: queue_full (--max-queue-size), "
        "queue_wait (--max-queue-wait-s), deadline (wait over the caller's deadline), "
        "client_limit (--max-inflight-per-client; model empty: before any model is chosen)",
        ("model", "reason"),
    ),
    "tower_hung": (
        Gauge,
        "pickscore_tower_hung",
        "1 once a forward pass outlived --batch-timeout-s (the replica reports NOT_SERVING)",
        TOWER,
    ),
    "inflight": (Gauge, "pickscore_inflight_requests", "Requests being handled", ()),
    "model_info": (
        Gauge,
        "pickscore_model_info",
        "A model version in service (always 1); identity is what it is (name:kind:precision:weights digest), "
        "version the package's",
        ("model", "model_version", "source", "backend", "device", "identity", "version"),
    ),
    "model_weights": (
        Gauge,
        "pickscore_model_weights_bytes",
        "Bytes of a model version's weights, counted at load (two versions are resident during a swap)",
        ("model", "model_version"),
    ),
    "decoded": (
        Counter,
        "pickscore_images_decoded",
        "Images decoded and cropped, once per image and preprocessing whatever the number of models scoring it",
        (),
    ),
}
# series that exist from the first scrape (per model: from its load): attribute -> label values after the model's
TOWERS, CACHES = ("image", "text"), ("text", "image")
PRESET = {
    **dict.fromkeys(("queue_depth", "batch_size", "inference", "queue_wait", "estimated_wait", "tower_hung"), TOWERS),
    "refusals": ("queue_full", "queue_wait", "deadline"),
    "cache_hits": CACHES,
    "cache_misses": CACHES,
}


class Metrics:
    """The server's metric families (``SPECS``), each an attribute of the same name, in a registry of their own."""

    request_duration: Histogram
    requests: Counter
    queue_wait: Histogram
    preprocess: Histogram
    inference: Histogram
    batch_size: Histogram
    images_scored: Counter
    cache_hits: Counter
    cache_misses: Counter
    cache_bytes: Gauge
    dropped: Counter
    batch_failures: Counter
    queue_depth: Gauge
    queue_capacity: Gauge
    estimated_wait: Gauge
    refusals: Counter
    tower_hung: Gauge
    inflight: Gauge
    model_info: Gauge
    model_weights: Gauge
    decoded: Counter

    def __init__(self, gpu: bool = True) -> None:
        """``gpu``: the GPU's gauges too (a front end leaves them to the process that owns the device: reading them
        would import torch and open a CUDA context in every front end)."""
        self._http = None  # the /metrics server, once serve_http started it
        self.registry = CollectorRegistry()
        for attr, (kind, name, doc, labels, *buckets) in SPECS.items():
            extra = {"buckets": buckets[0]} if buckets else {}
            setattr(self, attr, kind(name, doc, labels, registry=self.registry, **extra))
        self.refusals.labels("", "client_limit")
        if gpu:
            self.registry.register(GpuCollector())

    def for_model(self, model: str) -> ModelMetrics:
        """The families labelled by model with ``model`` filled in, the others as they are; its series preset."""
        return ModelMetrics(self, model)

    def serve_http(self, host: str, port: int) -> int:
        """Start /metrics on a daemon thread; returns the bound port (OSError when it cannot be bound)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def stop_http(self) -> None:
        """Stop serving /metrics and release its port (nothing when it was never started)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class ModelMetrics:
    """One model's view of a server's ``Metrics``: the same attributes, each family labelled ``model`` bound to this
    model (``.labels(tower)`` is ``.labels(model, tower)``), so the batchers and caches need not know the model."""

    def __init__(self, metrics: Metrics, model: str):
        self.model = model
        for attr, (_, _, _, labels, *_) in SPECS.items():
            family = getattr(metrics, attr)
            setattr(self, attr, _Bound(family, model) if labels[:1] == ("model",) else family)
        for attr, values in PRESET.items():
            for value in values:
                getattr(self, attr).labels(value)


class _Bound:
    """A family with its first label, ``model``, given."""

    def __init__(self, family, model: str):
        self.family = family
        self.model = model

    def labels(self, *values: str):
        return self.family.labels(self.model, *values)


class GpuCollector:
    """GPU utilisation and memory per device, read at scrape time; nothing when no GPU is present."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        if not torch.cuda.is_available():
            return
        used = GaugeMetricFamily("pickscore_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("pickscore_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        util = GaugeMetricFamily(
            "pickscore_gpu_utilization_ratio", "Fraction of time a kernel ran (NVML)", labels=["gpu"]
        )
        for i in range(torch.cuda.device_count()):
            free, capacity = torch.cuda.mem_get_info(i)
            used.add_metric([str(i)], capacity - free)
            total.add_metric([str(i)], capacity)
            try:
                util.add_metric([str(i)], torch.cuda.utilization(i) / 100)
            except Exception:  # NVML (pynvml) missing: utilisation is simply not reported
                pass
        yield from (used, total, util)
