"""Prometheus series for the proxy. One registry per app, so several apps can live in one process.

Several workers (`abloop proxy --workers N`) run with prometheus_client's multiprocess mode: their
parent sets PROMETHEUS_MULTIPROC_DIR before starting them, every worker writes its counters and
histograms to its own files there, and /metrics, whichever worker answers it, sums them all. A
worker's counters outlive it (totals never go back), as in gunicorn + prometheus_client.

Gauges read at scrape time (`watch`) cannot be read in another process, so with several workers each
worker publishes them to its files every PUBLISH_EVERY_S (and the scraped worker just before the
scrape), and each gauge says how its workers' values combine (`across_workers`). Live gauges
("live…" modes) count only running workers: a worker removes its own when it stops, and a scrape
removes those of a worker that died without stopping (killed; uvicorn, which starts a replacement,
has no hook for it), recognised by its pid no longer running.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
from collections.abc import Callable, Iterator
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from retrieval.metadata import OUTCOMES as METADATA_OUTCOMES

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The routes proxy/ratelimit.py limits (the search router's).
RATE_LIMITED_ROUTES = ("/api/v1/search", "/api/v1/feedback")
# POST /api/v1/process_url: ok, refused (unsafe URL), fetch_error, empty (no text), error (anything else).
PROCESS_URL_OUTCOMES = ("ok", "refused", "fetch_error", "empty", "error")
# How often each worker publishes its scrape-time gauges with several workers: how stale they can be.
PUBLISH_EVERY_S = 1.0

# How a gauge's per-worker values make the server's (prometheus_client's multiprocess modes, without
# the ones that add a `pid` label): "livesum" for what each worker has of its own (its queue),
# "livemax" for what all see alike (the share, a directory's size), "sum" for totals kept after a
# worker exits.
AcrossWorkers = Literal["livesum", "livemax", "livemin", "sum", "max", "min"]

log = logging.getLogger("abloop.proxy.metrics")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Read as prometheus_client reads it, once, before any metric is made.
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self._publishers: list[Callable[[], None]] = []
        self._info_names: set[str] = set()
        self._publishing: asyncio.Task[None] | None = None
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
        self.watch("abloop_workers", "Worker processes serving (abloop proxy --workers).", lambda: 1,
                   across_workers="livesum")

    def watch(self, name: str, documentation: str, read: Callable[[], float], *,
              across_workers: AcrossWorkers = "livemax") -> None:
        """A gauge read at scrape time (writer queue depth, spool size, circuit state).

        With several workers it is published instead (see the module's docstring).
        """
        gauge = Gauge(name, documentation, registry=self.registry, multiprocess_mode=across_workers)
        if self.multiprocess_dir is None:
            gauge.set_function(read)
        else:
            self._publishers.append(lambda: gauge.set(read()))

    def watch_label(self, name: str, documentation: str, label: str, read: Callable[[], str | None]) -> None:
        """An info-style gauge read at scrape time: value 1, the current value of `read` as its label.

        With several workers: 1 for each value some running worker has, as the largest of theirs.
        """
        if self.multiprocess_dir is None:
            self.registry.register(_LabelGauge(name, documentation, label, read))
            return
        gauge = Gauge(name, documentation, [label], registry=self.registry, multiprocess_mode="livemax")
        shown: list[str] = []

        def publish() -> None:
            value = read()
            if shown == ([value] if value is not None else []):
                return
            # A series cannot be taken out of the shared files: the old value goes to 0, and the scrape
            # leaves out 0s, as if it were gone.
            for old in shown:
                gauge.labels(old).set(0)
            shown[:] = [value] if value is not None else []
            for new in shown:
                gauge.labels(new).set(1)

        self._info_names.add(name)
        self._publishers.append(publish)

    def publish(self) -> None:
        """Write this worker's scrape-time gauges to the shared files (several workers only)."""
        for publish in self._publishers:
            publish()

    def start(self) -> None:
        """Publish every PUBLISH_EVERY_S until `stop` (several workers only). Call in the app's event loop."""
        if self.multiprocess_dir is not None and self._publishing is None:
            self._publishing = asyncio.get_running_loop().create_task(self._publish_every(PUBLISH_EVERY_S))

    async def stop(self) -> None:
        """Stop publishing and take this worker out of the live gauges."""
        if self._publishing is not None:
            self._publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publishing
            self._publishing = None
        if self.multiprocess_dir is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(os.getpid(), self.multiprocess_dir)

    def scrape(self) -> bytes:
        """The Prometheus text of /metrics: this app's registry, or with several workers the whole server's."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        self.publish()
        _forget_dead_workers(self.multiprocess_dir)
        registry = CollectorRegistry()
        registry.register(_AllWorkers(self.multiprocess_dir, self._info_names))
        return generate_latest(registry)

    async def _publish_every(self, seconds: float) -> None:
        while True:
            try:
                self.publish()
            except Exception:  # a gauge that cannot be read must not stop the others being published
                log.exception("metrics: publishing the scrape-time gauges failed")
            await asyncio.sleep(seconds)


class _AllWorkers:
    """Every worker's series from the multiprocess files, less the 0s of info gauges (`watch_label`)."""

    def __init__(self, directory: str, info_names: set[str]) -> None:
        self._directory, self._info_names = directory, info_names

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        for family in MultiProcessCollector(None, self._directory).collect():
            if family.name in self._info_names:
                family.samples = [sample for sample in family.samples if sample.value]
            yield family


def _forget_dead_workers(directory: str) -> None:
    """Remove the live gauges of workers that exited without stopping (killed): their pid is not running."""
    from prometheus_client.multiprocess import mark_process_dead

    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid_text = os.path.basename(path).removesuffix(".db").rpartition("_")[2]
        if not pid_text.isdigit() or _running(int(pid_text)):
            continue
        with contextlib.suppress(FileNotFoundError):  # another worker's scrape removed it first
            mark_process_dead(int(pid_text), directory)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        return True
    return True


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
