"""GET /metrics in Prometheus text format (prometheus-client), per model and, where it makes sense, per owner.

Owns the daemon's metric definitions: gauges read from the kernels at scrape time (queue depth, running
processes, KV blocks used / cached / swapped, per-owner processes and blocks), and counters and histograms
fed after every kernel step (tokens generated, time to first token, inter-token latency). Never changes
kernel state.
"""

from __future__ import annotations

import threading

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from llmos.server.app import Principal, admin

router = APIRouter(tags=["system"])

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class KernelCollector:
    """Gauges computed from every loaded kernel when /metrics is scraped."""

    def __init__(self, state) -> None:
        self.state = state

    def collect(self):
        g = {
            "waiting": GaugeMetricFamily("llmos_queue_depth", "Processes waiting to be scheduled", labels=["model"]),
            "running": GaugeMetricFamily("llmos_running_processes", "Processes in the running batch", labels=["model"]),
            "blocks": GaugeMetricFamily("llmos_kv_blocks", "KV blocks by state (used, cached, free, swapped)",
                                        labels=["model", "state"]),
            "owner_procs": GaugeMetricFamily("llmos_owner_processes", "Live processes per owner",
                                             labels=["model", "owner"]),
            "owner_blocks": GaugeMetricFamily("llmos_owner_kv_blocks", "Resident KV blocks per owner",
                                              labels=["model", "owner"]),
            "hit_rate": GaugeMetricFamily("llmos_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache",
                                          labels=["model"]),
            "loaded": GaugeMetricFamily("llmos_model_loaded_bytes", "Bytes held by a loaded model", labels=["model"]),
        }
        for r in list(self.state.models.resident.values()):
            k, name = r.kernel, r.name
            mem = k.memory()
            g["waiting"].add_metric([name], k.scheduler.num_waiting)
            g["running"].add_metric([name], k.scheduler.num_running)
            used_swap = mem["swap_blocks"] - mem["free_swap_blocks"]
            for st, v in (("used", mem["used_blocks"]), ("cached", mem["cached_blocks"]),
                          ("free", mem["free_blocks"] - mem["cached_blocks"]), ("swapped", used_swap)):
                g["blocks"].add_metric([name, st], v)
            for owner, o in mem["owners"].items():
                g["owner_procs"].add_metric([name, owner], o["processes"])
                g["owner_blocks"].add_metric([name, owner], o["resident_blocks"])
            g["hit_rate"].add_metric([name], mem["prefix_cache"]["hit_rate"])
            g["loaded"].add_metric([name], r.nbytes)
        yield from g.values()


class StepMetrics:
    """Counters and histograms fed from each engine after every step: tokens generated, time to first token
    and inter-token latency (seconds), per model and owner."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tokens = Counter("llmos_generated_tokens", "Output tokens generated", ["model", "owner"],
                              registry=registry)
        self.ttft = Histogram("llmos_time_to_first_token_seconds", "Time from spawn to the first output token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("llmos_inter_token_latency_seconds", "Time between consecutive output tokens",
                             ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.finished = Counter("llmos_processes_ended", "Processes that ended, by reason", ["model", "reason"],
                                registry=registry)
        self._seen: dict[tuple[str, int], int] = {}  # (model, pid) -> token times already observed
        self._done: set[tuple[str, int]] = set()  # reported as ended
        self._seq: dict[str, int] = {}  # model -> the kernel change number seen last (Kernel.changes_since)
        self._lock = threading.Lock()

    def hook(self, model: str):
        def on_step(kernel, tokens: int) -> None:
            with self._lock, kernel.lock:
                self._seq[model], changed = kernel.changes_since(self._seq.get(model, 0))
                for pid in changed:
                    p = kernel.processes.get(pid)
                    key = (model, pid)
                    if p is None or key in self._done:
                        continue
                    times = kernel.streams[pid].token_times
                    seen = self._seen.get(key, 0)
                    new = times[seen:]
                    if new:
                        if seen == 0 and p.first_token_time is not None:
                            self.ttft.labels(model).observe(max(0.0, p.first_token_time - p.arrival_time))
                        for a, b in zip(times[max(0, seen - 1):], times[max(1, seen):]):
                            self.itl.labels(model).observe(b - a)
                        self.tokens.labels(model, p.owner).inc(len(new))
                    if p.is_finished:
                        self.finished.labels(model, p.finish_reason or "unknown").inc()
                        self._seen.pop(key, None)
                        self._done.add(key)
                        if len(self._done) > 4 * kernel.config.keep_finished + 1024:  # forget reaped ones
                            self._done = {d for d in self._done if d[0] != model or d[1] in kernel.processes}
                    else:
                        self._seen[key] = len(times)
        return on_step


def setup(state) -> None:
    registry = CollectorRegistry()
    registry.register(KernelCollector(state))
    steps = StepMetrics(registry)
    state.metrics_registry = registry
    state.models.on_load.append(lambda r: r.engine.step_hooks.append(steps.hook(r.name)))


@router.get("/metrics")
async def metrics(request: Request, who: Principal = Depends(admin)) -> Response:
    """Prometheus metrics: queue depth, running processes, KV blocks used/cached/free/swapped, per-owner
    processes and blocks, prefix-cache hit rate, tokens generated, TTFT and inter-token latency histograms.
    They name users, so with users configured only an admin's key may read them (Prometheus: `authorization`
    with a bearer token in the scrape config)."""
    registry = request.app.state.llmos.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
