"""Prometheus metrics (docs/architecture.md, "Metrics"): names, types and the HTTP endpoint.

Every process that does work (a harvest actor, a train rank) serves its own registry on the first
free port from the configured ``metrics.port`` on its host, so the processes of one pod (the ranks
on an 8-GPU pod, the actors packed onto one) take ``port``, ``port + 1``, … and a pod's declared
metrics ports are exactly as many as the processes it can hold; which process is which is in the
labels (``rank``, ``actor``), and every series carries the run's name (``run``), so two runs on one
cluster never overlay. ``port = 0`` turns metrics off and every update becomes a no-op, so the
training loop never branches on whether metrics are on. Each process uses its own registry, so
several ranks in one test process do not collide. No torch here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .progress import say

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# every metric the code exports: the Grafana dashboard test checks its queries against this
TRAIN_METRICS = {
    "crosscoder_train_tokens_total": "tokens trained on",
    "crosscoder_train_step_seconds": "wall time of one optimizer step",
    "crosscoder_train_data_wait_seconds_total": "time the trainer waited for data",
    "crosscoder_train_loss": "loss terms",
    "crosscoder_train_fve": "fraction of variance explained, per source",
    "crosscoder_train_l0": "mean active latents per token",
    "crosscoder_train_inference_l0": "mean active latents per token with the inference thresholds (batchtopk)",
    "crosscoder_train_dead_latents_ratio": "fraction of latents dead",
    "crosscoder_train_steps_total": "optimizer steps taken",
}


HARVEST_METRICS = {
    "crosscoder_harvest_tokens_total": "tokens whose activations were written",
    "crosscoder_harvest_shards_total": "shards committed",
    "crosscoder_harvest_shard_seconds": "wall time to harvest and commit one shard",
}


PORTS_TRIED = 64  # processes on one host that can serve metrics from one base port


def serve(registry: CollectorRegistry, base: int, host: str):
    """Serve ``registry`` on the first free port in ``base .. base + PORTS_TRIED - 1`` of ``host``;
    returns (server, port)."""
    for port in range(base, base + PORTS_TRIED):
        try:
            server, _ = start_http_server(port, addr=host, registry=registry)
            taken = "" if port == base else f" ({base} taken)" if port == base + 1 else f" ({base}..{port - 1} taken)"
            say(f"metrics: http://{host}:{port}/metrics{taken}", error=True)
            return server, port
        except OSError:  # taken by another process of this host (another rank or actor)
            continue
    raise OSError(f"metrics: no free port in {base}..{base + PORTS_TRIED - 1} on {host} (metrics.port)")


class HarvestMetrics:
    def __init__(self, port: int = 0, actor: int = 0, host: str = "0.0.0.0", run: str = ""):
        self.enabled = port > 0
        self.port = 0
        if not self.enabled:
            return
        r = self.registry = CollectorRegistry()
        labels = {"actor": str(actor), "run": run}
        self._tokens = Counter("crosscoder_harvest_tokens", HARVEST_METRICS["crosscoder_harvest_tokens_total"],
                               list(labels), registry=r).labels(**labels)
        self._shards = Counter("crosscoder_harvest_shards", HARVEST_METRICS["crosscoder_harvest_shards_total"],
                               list(labels), registry=r).labels(**labels)
        self._seconds = Histogram("crosscoder_harvest_shard_seconds",
                                  HARVEST_METRICS["crosscoder_harvest_shard_seconds"], list(labels),
                                  buckets=STEP_BUCKETS + (120, 300, 600), registry=r).labels(**labels)
        self.server, self.port = serve(r, port, host)

    def shard(self, tokens: int, seconds: float) -> None:
        if self.enabled:
            self._tokens.inc(tokens)
            self._shards.inc()
            self._seconds.observe(seconds)

    def close(self) -> None:
        if self.enabled:
            self.server.shutdown()
            self.server.server_close()


class TrainMetrics:
    def __init__(self, port: int = 0, rank: int = 0, labels: dict | None = None, host: str = "0.0.0.0",
                 run: str = ""):
        self.enabled = port > 0
        self.port = 0
        if not self.enabled:
            return
        r = self.registry = CollectorRegistry()
        base = {"rank": str(rank), "run": run} | (labels or {})
        names = list(base)

        def metric(kind, name: str, extra: tuple = (), **kwargs):
            doc = TRAIN_METRICS[name + "_total" if kind is Counter else name]  # counters gain _total when exported
            return kind(name, doc, names + list(extra), registry=r, **kwargs)

        self._tokens = metric(Counter, "crosscoder_train_tokens").labels(**base)
        self._steps = metric(Counter, "crosscoder_train_steps").labels(**base)
        self._step_seconds = metric(Histogram, "crosscoder_train_step_seconds", buckets=STEP_BUCKETS).labels(**base)
        self._wait = metric(Counter, "crosscoder_train_data_wait_seconds").labels(**base)
        self._loss = metric(Gauge, "crosscoder_train_loss", ("term",))
        self._fve = metric(Gauge, "crosscoder_train_fve", ("source",))
        self._l0 = metric(Gauge, "crosscoder_train_l0").labels(**base)
        self._inference_l0 = metric(Gauge, "crosscoder_train_inference_l0").labels(**base)
        self._dead = metric(Gauge, "crosscoder_train_dead_latents_ratio").labels(**base)
        self._base = base
        self.server, self.port = serve(r, port, host)

    def step(self, metrics: dict, tokens: int, step_seconds: float, wait_seconds: float) -> None:
        if not self.enabled:
            return
        self._tokens.inc(tokens)
        self._steps.inc()
        self._step_seconds.observe(step_seconds)
        self._wait.inc(wait_seconds)
        for term, value in metrics["loss"].items():
            self._loss.labels(**self._base, term=term).set(value)
        for source, value in metrics["fve"].items():
            self._fve.labels(**self._base, source=source).set(value)
        self._l0.set(metrics["l0"])
        if "inference_l0" in metrics:
            self._inference_l0.set(metrics["inference_l0"])
        self._dead.set(metrics["dead_fraction"])

    def close(self) -> None:
        if self.enabled:
            self.server.shutdown()
            self.server.server_close()
