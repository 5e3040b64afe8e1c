"""Prometheus series for the proxy. One registry per app, so several apps can live in one process."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


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

    def watch(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read at scrape time (writer queue depth, spool size, circuit state)."""
        Gauge(name, documentation, registry=self.registry).set_function(read)
