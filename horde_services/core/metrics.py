"""Prometheus metrics shared by every service (served on 127.0.0.1:--metrics-port)."""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from horde_services.core.errors import ConfigError

# Horde's own registry, not prometheus_client's default: an application that imports Horde's
# client helpers and exports its own metrics does not publish Horde's with them. /metrics serves
# this one, with the usual process, platform and GC collectors.
REGISTRY = CollectorRegistry(auto_describe=True)
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

RPCS = Counter(
    "horde_rpcs_total",
    "RPCs served, by method and status code",
    ["service", "method", "code"],
    registry=REGISTRY,
)
RPC_SECONDS = Histogram(
    "horde_rpc_seconds",
    "Time to serve an RPC (streaming RPCs: the whole stream)",
    ["service", "method"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 300, 3600),
    registry=REGISTRY,
)
AUTH_FAILURES = Counter(
    "horde_auth_failures_total",
    "Rejected calls, by status code",
    ["service", "code"],
    registry=REGISTRY,
)
JOBS = Counter(
    "horde_jobs_total",
    "Jobs that reached a terminal state",
    ["kind", "state", "reason"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "horde_job_stage_seconds",
    "Time jobs spent in each stage",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
    registry=REGISTRY,
)
RECEIPTS = Counter(
    "horde_stream_receipts_total",
    "Stream receipts checked, by outcome",
    ["outcome"],
    registry=REGISTRY,
)
GATEWAY_SESSIONS = Counter(
    "horde_gateway_sessions_total",
    "Streaming sessions ended, by how: refused (at open), client_closed, client_gone, "
    "cancelled, client_error, client_clock, job_ended, job_not_started, bad_receipt, "
    "certificate_rejected, proxy_lost, proxy_refused, proxy_error, validator_lost, "
    "validator_error, gateway_shutdown, internal",
    ["ending"],
    registry=REGISTRY,
)
GATEWAY_REQUESTS_FAILED = Counter(
    "horde_gateway_requests_failed_total",
    "Streaming requests the job's service gave no answer to (no receipt; the session went on)",
    registry=REGISTRY,
)
GATEWAY_LATENCY = Histogram(
    "horde_gateway_request_seconds",
    "Streaming request latency seen by the gateway",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
    registry=REGISTRY,
)


SYNTHETIC_VERDICTS = Counter(
    "horde_synthetic_verdicts_total",
    "Synthetic challenges judged, by executor class and outcome",
    ["executor_class", "outcome"],
    registry=REGISTRY,
)
MINER_SCORE = Gauge(
    "horde_miner_score",
    "Each miner's score when last computed (every epoch, and on request)",
    ["miner"],
    registry=REGISTRY,
)
MINER_WEIGHT = Gauge(
    "horde_miner_weight",
    "Each miner's weight when last computed (0 while no weights can be set)",
    ["miner"],
    registry=REGISTRY,
)
MINER_EXECUTORS = Gauge(
    "horde_miner_executors",
    "Executors linked to this miner, by class and state (idle, busy, draining)",
    ["executor_class", "state"],
    registry=REGISTRY,
)
MINER_JOBS = Counter(
    "horde_miner_jobs_total",
    "Jobs this miner's executors ended, by state and reason",
    ["state", "reason"],
    registry=REGISTRY,
)
EXECUTOR_JOBS = Counter(
    "horde_executor_jobs_total",
    "Jobs this executor ended, by kind, state and reason",
    ["kind", "state", "reason"],
    registry=REGISTRY,
)
SPOTCHECK_PAIRS = Counter(
    "horde_spotcheck_pairs_total",
    "Streaming request/response pairs replayed on the trusted instance, by outcome",
    ["outcome"],
    registry=REGISTRY,
)
SANCTIONS = Counter(
    "horde_miner_sanctions_total",
    "Weight sanctions imposed on miners, by kind",
    ["kind"],
    registry=REGISTRY,
)


class MetricsPortError(ConfigError, OSError):
    """The metrics port cannot be served (busy, not allowed): a configuration error naming
    `metrics_port` / `--metrics-port`. Also an OSError whose ``strerror`` names them, for a
    caller that catches OSError and prints "cannot serve metrics on HOST:PORT: {strerror}"."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        reason = exc.strerror or str(exc) or type(exc).__name__
        OSError.__init__(
            self, exc.errno, f"{reason} (invalid setting 'metrics_port', or --metrics-port)"
        )
        self.message = (
            f"invalid setting 'metrics_port' (--metrics-port): cannot serve metrics on "
            f"{host}:{port}: {reason}"
        )

    def __str__(self) -> str:
        return self.message


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics; port 0 or None disables it. MetricsPortError when it cannot."""
    if port:
        try:
            start_http_server(port, addr=host, registry=REGISTRY)
        except OSError as exc:
            raise MetricsPortError(host, port, exc) from None
