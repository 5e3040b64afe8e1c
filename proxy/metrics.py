"""Prometheus series for the proxy. One registry per app, so several apps can live in one process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from retrieval.metadata import OUTCOMES as METADATA_OUTCOMES

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The routes proxy/ratelimit.py limits (the search router's).
RATE_LIMITED_ROUTES = ("/api/v1/search", "/api/v1/feedback")
# POST /api/v1/process_url: ok, refused (unsafe URL), fetch_error, empty (no text), error (anything else).
PROCESS_URL_OUTCOMES = ("ok", "refused", "fetch_error", "empty", "error")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "abloop_search_requests", "Search requests by assigned arm, served arm and status.",
            ["arm", "served_arm", "status"], registry=r,
        )
        self.fallbacks = Counter(
            "abloop_search_fallbacks", "Requests served by another arm than the assigned one.", ["arm"], registry=r
        )
        self.upstream_errors = Counter(
            "abloop_upstream_errors", "Failed calls to an arm's upstream (incl. skipped by an open circuit).",
            ["arm"], registry=r,
        )
        self.latency = Histogram(
            "abloop_search_latency_seconds", "End-to-end search latency by assigned arm.", ["arm"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.llm_latency = Histogram(
            "abloop_llm_latency_seconds", "Upstream LLM latency by served arm.", ["served_arm"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.retrieval_latency = Histogram(
            "abloop_retrieval_latency_seconds", "Embedding + vector search latency.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "abloop_tokens", "LLM tokens by assigned arm and direction (in/out).", ["arm", "direction"], registry=r
        )
        self.feedback = Counter(
            "abloop_feedback", "Feedback received by kind (rating, thumbs_up, thumbs_down, correction).",
            ["kind"], registry=r,
        )
        self.process_url = Counter(
            "abloop_process_url", "URL ingestion requests by outcome (ok, refused, fetch_error, empty, error).",
            ["outcome"], registry=r,
        )
        self.process_url_latency = Histogram(
            "abloop_process_url_seconds", "URL ingestion latency: fetch, metadata, chunk, embed, save.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.metadata_extraction = Counter(
            "abloop_metadata_extraction", "LLM metadata extractions by outcome (ok, invalid answer, error).",
            ["outcome"], registry=r,
        )
        self.rate_limited = Counter(
            "abloop_rate_limited", "Requests refused with 429 by the per-user rate limit, by route.", ["route"],
            registry=r,
        )
        self.rate_limit_errors = Counter(
            "abloop_rate_limit_errors", "Requests served without a rate-limit check because Redis was unreachable.",
            registry=r,
        )
        # Every outcome is exported from the start, at 0, so rates and alerts see the series.
        for route in RATE_LIMITED_ROUTES:
            self.rate_limited.labels(route)
        for outcome in PROCESS_URL_OUTCOMES:
            self.process_url.labels(outcome)
        for outcome in METADATA_OUTCOMES:
            self.metadata_extraction.labels(outcome)

    def watch(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read at scrape time (writer queue depth, spool size, circuit state)."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def watch_label(self, name: str, documentation: str, label: str, read: Callable[[], str | None]) -> None:
        """An info-style gauge read at scrape time: value 1, the current value of `read` as its label."""
        self.registry.register(_LabelGauge(name, documentation, label, read))


class _LabelGauge:
    def __init__(self, name: str, documentation: str, label: str, read: Callable[[], str | None]) -> None:
        self._name, self._documentation, self._label, self._read = name, documentation, label, read

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self._name, self._documentation, labels=[self._label])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, self._documentation, labels=[self._label])
        value = self._read()
        if value is not None:
            family.add_metric([value], 1.0)
        yield family
