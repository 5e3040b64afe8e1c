"""docs/grafana/abloop.json: valid, importable, and every series it queries is one a running proxy exports.

Renaming a metric in proxy/metrics.py (or proxy/app.py) without updating the dashboard fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxy.conftest import make_settings, running_proxy

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "abloop.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# What the dashboard is for: a panel for each of these (the brief the operators asked for).
REQUIRED = {
    "abloop_search_requests_total",  # per-arm request rate, errors
    "abloop_search_latency_seconds_bucket",  # latency quantiles
    "abloop_search_fallbacks_total",
    "abloop_feedback_total",
    "abloop_open_circuits",
    "abloop_index_info",
    "abloop_index_chunks",
    "abloop_index_load_seconds",
    "abloop_process_url_total",
    "abloop_process_url_seconds_bucket",
    "abloop_metadata_extraction_total",
}
_SERIES_SUFFIXES = {"counter": ("",), "gauge": ("",), "untyped": ("",), "summary": ("", "_sum", "_count"),
                    "histogram": ("_bucket", "_sum", "_count")}
_FUNCTIONS = {
    "sum", "avg", "min", "max", "count", "count_values", "stddev", "stdvar", "topk", "bottomk", "quantile", "group",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets", "histogram_quantile",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "last_over_time",
    "quantile_over_time", "abs", "ceil", "floor", "round", "clamp", "clamp_min", "clamp_max", "vector", "scalar",
    "time", "timestamp", "absent", "absent_over_time", "label_replace", "label_join", "sort", "sort_desc",
}
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_DURATION = re.compile(r"(?<![A-Za-z0-9_:])(\d+(ms|[smhdwy]))+\b")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_:])\d+(\.\d*)?([eE][+-]?\d+)?")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_OPERATORS_ONLY = re.compile(r"^[\s()+\-*/%^<>=!,]*$")
_KEYWORDS = {"bool", "offset", "and", "or", "unless", "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The series an expression selects. Raises ValueError where it is not PromQL this far."""
    _check_balanced(expr)
    text = _STRING.sub('""', expr)
    for pattern in (_MATCHERS, _RANGE):
        text = pattern.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text).replace('""', " ")
    text = _NUMBER.sub(" ", _DURATION.sub(" ", text))
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if text[match.end():].lstrip().startswith("("):
            if word not in _FUNCTIONS:
                raise ValueError(f"unknown function {word!r} in {expr!r}")
        elif word.lower() not in _KEYWORDS:
            names.add(word)
    rest = _IDENTIFIER.sub(" ", text)
    if not _OPERATORS_ONLY.match(rest):
        raise ValueError(f"unexpected characters {rest.strip()!r} in {expr!r}")
    if not names:
        raise ValueError(f"no metric in {expr!r}")
    return names


def _check_balanced(expr: str) -> None:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for char in _STRING.sub('""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            raise ValueError(f"unbalanced {char!r} in {expr!r}")
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r} in {expr!r}")


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, control_upstream) -> set[str]:
    """Every series name a running proxy exports, from its /metrics TYPE lines (labelled families included)."""
    import httpx

    settings = make_settings(tmp_path_factory.mktemp("proxy"), llm_api_base=control_upstream[1])
    with running_proxy(settings) as (url, _app):
        text = httpx.get(f"{url}/metrics", timeout=30).text
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE):
        names.update(name + suffix for suffix in _SERIES_SUFFIXES[kind])
    return names


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in _panels(dashboard["panels"])
            for target in panel.get("targets", [])]


def test_dashboard_is_importable_grafana_json(dashboard):
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] and dashboard["title"]
    (source,) = dashboard["__inputs"]
    assert source["name"] == "DS_PROMETHEUS" and source["type"] == "datasource"
    assert source["pluginId"] == "prometheus"
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] >= 1, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE and panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(target["datasource"] == DATASOURCE for target in panel["targets"]), panel["title"]


def test_every_query_parses_and_quantiles_use_buckets(dashboard):
    for title, expr in _exprs(dashboard):
        names = metric_names(expr)
        if "histogram_quantile" in expr:
            assert all(name.endswith("_bucket") for name in names) and "le" in expr, title


def test_every_metric_on_the_dashboard_is_exported_by_the_proxy(dashboard, exported):
    used = {name for _title, expr in _exprs(dashboard) for name in metric_names(expr)}
    assert used - exported == set(), f"on the dashboard but not exported: {sorted(used - exported)}"
    assert used >= REQUIRED, f"no panel for {sorted(REQUIRED - used)}"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (arm) (rate(abloop_search_requests_total{status="error", arm=~"c.*"}[$__rate_interval]))',
         {"abloop_search_requests_total"}),
        ("histogram_quantile(0.95, sum by (arm, le) (rate(abloop_search_latency_seconds_bucket[5m])))",
         {"abloop_search_latency_seconds_bucket"}),
        ("sum(rate(a_total[1m])) / on (job) group_left sum(rate(b_total[1m])) > bool 1e3", {"a_total", "b_total"}),
        ("max(abloop_candidate_share) offset 1h", {"abloop_candidate_share"}),
    ],
)
def test_metric_names_reads_promql(expr, names):
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    "expr", ["sum(rate(x_total[5m])", "sum by (arm) (rat(x_total[5m]))", "max(x) ; drop", "0.5 + 1", "{} )("]
)
def test_metric_names_refuses_what_is_not_promql(expr):
    with pytest.raises(ValueError):
        metric_names(expr)
