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


class Metrics:
    def __init__(self) -> None:
        self._http = None  # the /metrics server, once serve_http started it
        self.registry = r = CollectorRegistry()
        self.request_duration = Histogram(
            "pickscore_request_duration_seconds",
            "Time from receiving a request to answering it",
            ["transport", "rpc", "code"],
            buckets=SECONDS,
            registry=r,
        )
        self.requests = Counter(
            "pickscore_requests",
            "Requests answered, by transport (grpc, http), RPC (the same names on both) and status code",
            ["transport", "rpc", "code"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "pickscore_queue_wait_seconds",
            "Time an item waited in a tower's queue before its batch started",
            ["tower"],
            buckets=SECONDS,
            registry=r,
        )
        self.preprocess = Histogram(
            "pickscore_preprocess_seconds",
            "Time to decode and preprocess one image, or tokenize one request's prompts",
            ["stage"],
            buckets=SECONDS,
            registry=r,
        )
        self.inference = Histogram(
            "pickscore_inference_seconds", "Forward pass time of one batch", ["tower"], buckets=SECONDS, registry=r
        )
        self.batch_size = Histogram(
            "pickscore_batch_size", "Items per forward pass", ["tower"], buckets=BATCH, registry=r
        )
        self.images_scored = Counter("pickscore_images_scored", "Images scored", registry=r)
        self.cache_hits = Counter("pickscore_cache_hits", "Embedding cache hits", ["cache"], registry=r)
        self.cache_misses = Counter("pickscore_cache_misses", "Embedding cache misses", ["cache"], registry=r)
        self.cache_bytes = Gauge("pickscore_cache_bytes", "Bytes held by an embedding cache", ["cache"], registry=r)
        self.dropped = Counter(
            "pickscore_dropped_items", "Queued items dropped before compute", ["tower", "reason"], registry=r
        )
        self.batch_failures = Counter(
            "pickscore_batch_failures", "Batches whose forward pass failed", ["tower"], registry=r
        )
        self.queue_depth = Gauge(
            "pickscore_queue_depth", "Items admitted to a tower and not yet computed", ["tower"], registry=r
        )
        self.queue_capacity = Gauge(
            "pickscore_queue_capacity", "Most items a tower admits (max_queue_size)", ["tower"], registry=r
        )
        self.estimated_wait = Gauge(
            "pickscore_estimated_wait_seconds",
            "Time a newly admitted item would wait: admitted work over the tower's measured throughput",
            ["tower"],
            registry=r,
        )
        self.refusals = Counter(
            "pickscore_admission_refusals",
            "Requests refused with RESOURCE_EXHAUSTED before any work: queue_full (--max-queue-size), "
            "queue_wait (--max-queue-wait-s), deadline (wait over the caller's deadline), "
            "client_limit (--max-inflight-per-client)",
            ["reason"],
            registry=r,
        )
        self.tower_hung = Gauge(
            "pickscore_tower_hung",
            "1 once a forward pass outlived --batch-timeout-s (the replica reports NOT_SERVING)",
            ["tower"],
            registry=r,
        )
        self.inflight = Gauge("pickscore_inflight_requests", "Requests being handled", registry=r)
        self.model_info = Gauge(
            "pickscore_model_info",
            "The served model (always 1)",
            ["source", "backend", "device", "version"],
            registry=r,
        )
        for tower in ("image", "text"):  # so every series exists from the first scrape
            self.queue_depth.labels(tower)
            self.batch_size.labels(tower)
            self.inference.labels(tower)
            self.queue_wait.labels(tower)
            self.estimated_wait.labels(tower)
            self.tower_hung.labels(tower)
        for reason in ("queue_full", "queue_wait", "deadline", "client_limit"):
            self.refusals.labels(reason)
        for cache in ("text", "image"):
            self.cache_hits.labels(cache)
            self.cache_misses.labels(cache)
        r.register(GpuCollector())

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
