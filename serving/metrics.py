"""Request counts, errors and latency per signature, in Prometheus's text
format (served by `serving.rest` at `PATH`, as TF Serving serves its own
under a monitoring config)."""

import bisect
import collections
import threading

PATH = "/monitoring/prometheus/metrics"

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Latency histogram bounds, in seconds."""


def _labels(pairs):
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in pairs)
    return "{" + ",".join(escaped) + "}"


class Metrics:
    """Thread-safe counters and a latency histogram, keyed by model,
    signature and entry point (``grpc`` or ``rest``)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests = collections.Counter()  # (model, signature, entrypoint, status) -> n
        self._buckets = {}  # (model, signature, entrypoint) -> [count per bucket, +Inf last]
        self._sums = collections.Counter()

    def record(self, model, signature, entrypoint, status, seconds):
        """One finished request; ``status``: its gRPC code name (``OK`` or
        the error's)."""
        key = (model, signature or "serving_default", entrypoint)
        with self._lock:
            self._requests[key + (status,)] += 1
            counts = self._buckets.setdefault(key, [0] * (len(BUCKETS) + 1))
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sums[key] += seconds

    def render(self):
        """The Prometheus text exposition of everything recorded."""
        names = ("model_name", "signature_name", "entrypoint")
        lines = ["# HELP deep_retrieval_requests_total Predict requests by final status.",
                 "# TYPE deep_retrieval_requests_total counter"]
        with self._lock:
            requests = sorted(self._requests.items())
            buckets = {k: list(v) for k, v in sorted(self._buckets.items())}
            sums = dict(self._sums)
        errors = collections.Counter()
        for (model, signature, entrypoint, status), n in requests:
            lines.append("deep_retrieval_requests_total"
                         + _labels(zip(names + ("status",), (model, signature, entrypoint, status))) + f" {n}")
            if status != "OK":
                errors[(model, signature, entrypoint)] += n
        lines += ["# HELP deep_retrieval_request_errors_total Predict requests that failed.",
                  "# TYPE deep_retrieval_request_errors_total counter"]
        for key in buckets:
            lines.append("deep_retrieval_request_errors_total" + _labels(zip(names, key)) + f" {errors[key]}")
        lines += ["# HELP deep_retrieval_request_latency_seconds Predict latency, from request to answer.",
                  "# TYPE deep_retrieval_request_latency_seconds histogram"]
        for key, counts in buckets.items():
            running = 0
            for bound, count in zip(BUCKETS + ("+Inf",), counts):
                running += count
                lines.append("deep_retrieval_request_latency_seconds_bucket"
                             + _labels(list(zip(names, key)) + [("le", bound)]) + f" {running}")
            lines.append("deep_retrieval_request_latency_seconds_sum" + _labels(zip(names, key)) + f" {sums[key]:.6f}")
            lines.append("deep_retrieval_request_latency_seconds_count" + _labels(zip(names, key)) + f" {running}")
        return "\n".join(lines) + "\n"
