"""The weekly_report flow as real Prefect runs against a real webhook receiver on loopback: the message, the
HTML report, the artifacts, retries on transient errors only, the Secret block, and a URL that never reaches a log."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from prefect import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler

from store.db import Database
from tests.conftest import serve_app
from tests.experiment.test_weekly import review_rows, two_weeks
from tests.flows.artifacts import artifacts_by_key

TOKEN = "B0WEEKLY/xoxb-s3cr3t-token-42"  # the part of a webhook URL that is the secret
BASE = "https://reports.example/abloop"


class Receiver:
    """A Slack-compatible incoming webhook: records each JSON post, answers the queued statuses, then 200 "ok"."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.posts: list[dict] = []
        self.app = FastAPI()

        @self.app.post("/services/{path:path}")
        async def hook(path: str, request: Request) -> PlainTextResponse:
            self.posts.append({"path": path, "body": await request.json()})
            status = self.statuses.pop(0) if self.statuses else 200
            return PlainTextResponse("ok" if status == 200 else "no", status_code=status)


@pytest.fixture
def store(store, monkeypatch) -> Database:
    """Two reviewed weeks, and no webhook or report URL from the environment."""
    review_rows(store, two_weeks(store, users=(30, 40)))
    for name in ("SLACK_WEBHOOK_URL", "REPORT_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return store


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    """A receiver and its base URL (the tests choose the status it answers before the flow posts)."""
    hook = Receiver()
    with serve_app(hook.app) as url:
        yield hook, url


@pytest.fixture
def secret_block() -> Iterator[callable]:
    from prefect.blocks.system import Secret

    from flows.weekly_report import SECRET_BLOCK

    saved = []

    def save(value: str) -> None:
        Secret(value=value).save(SECRET_BLOCK, overwrite=True)
        saved.append(value)

    yield save
    if saved:
        Secret.delete(SECRET_BLOCK)


def _run_logs(run_id: UUID) -> str:
    APILogHandler().flush()  # logs reach the API in the background
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(log.message for log in logs)


def test_the_flow_posts_the_message_writes_the_report_and_never_logs_the_url(store, receiver, tmp_path, monkeypatch,
                                                                             caplog):
    from flows.weekly_report import weekly_report

    hook, url = receiver
    monkeypatch.setenv("SLACK_WEBHOOK_URL", f"{url}/services/{TOKEN}")
    monkeypatch.setenv("REPORT_BASE_URL", BASE + "/")
    caplog.set_level(logging.DEBUG)
    state = weekly_report(week_ending="2025-06-08", out_dir=str(tmp_path / "reports"), return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result["posted"] is True and result["week_ending"] == "2025-06-08" and result["simulated"] is True
    assert result["link"] == f"{BASE}/weekly-2025-06-08.html"

    [post] = hook.posts
    assert post["path"] == TOKEN
    blocks = post["body"]["blocks"]
    assert blocks[0]["text"]["text"] == "Weekly report · week ending 2025-06-08"
    assert blocks[-1]["elements"][0]["url"] == result["link"]
    report = Path(result["report"])
    assert report == tmp_path / "reports" / "weekly-2025-06-08.html"
    page = report.read_text(encoding="utf-8")
    assert "Week over week" in page and "How do I sort a list?" in page

    run_id = state.state_details.flow_run_id
    artifacts = artifacts_by_key(run_id)
    assert {"weekly-report", "weekly-figures"} <= set(artifacts)
    assert "## All traffic" in artifacts["weekly-report"].data and result["link"] in artifacts["weekly-report"].data
    assert len(artifacts["weekly-figures"].data) > 0
    logs = _run_logs(run_id)
    assert "weekly report for the week ending 2025-06-08" in logs and "posted" in logs
    assert TOKEN not in logs and TOKEN not in caplog.text


def test_a_transient_failure_is_retried_and_the_secret_block_is_used_when_the_env_is_unset(store, receiver,
                                                                                          secret_block, tmp_path):
    from flows.weekly_report import weekly_report

    hook, url = receiver
    hook.statuses = [503]
    secret_block(f"{url}/services/{TOKEN}")
    state = weekly_report(week_ending="2025-06-08", out_dir=str(tmp_path), return_state=True)
    assert state.is_completed() and state.result()["posted"] is True
    assert len(hook.posts) == 2 and hook.posts[0]["body"] == hook.posts[1]["body"]
    assert state.result()["link"] == str((tmp_path / "weekly-2025-06-08.html").resolve())  # no REPORT_BASE_URL
    assert TOKEN not in _run_logs(state.state_details.flow_run_id)


def test_a_refused_post_fails_the_run_at_once_without_the_url_and_after_the_report(store, receiver, tmp_path,
                                                                                   monkeypatch):
    from flows.weekly_report import weekly_report

    hook, url = receiver
    hook.statuses = [404]  # a revoked webhook: retrying cannot help
    monkeypatch.setenv("SLACK_WEBHOOK_URL", f"{url}/services/{TOKEN}")
    state = weekly_report(week_ending="2025-06-08", out_dir=str(tmp_path), return_state=True)
    assert state.is_failed() and len(hook.posts) == 1
    error = state.result(raise_on_failure=False)
    assert "webhook answered HTTP 404" in str(error) and TOKEN not in str(error) and TOKEN not in state.message
    assert (tmp_path / "weekly-2025-06-08.html").exists()
    assert "weekly-report" in artifacts_by_key(state.state_details.flow_run_id)
    assert TOKEN not in _run_logs(state.state_details.flow_run_id)


def test_without_a_webhook_or_with_post_false_nothing_is_sent(store, receiver, tmp_path, monkeypatch):
    from flows.weekly_report import weekly_report

    hook, url = receiver
    quiet = weekly_report(week_ending="2025-06-08", out_dir=str(tmp_path))
    assert quiet["posted"] is False and "no webhook configured" in quiet["reason"]
    assert Path(quiet["report"]).exists()

    monkeypatch.setenv("SLACK_WEBHOOK_URL", f"{url}/services/{TOKEN}")
    held = weekly_report(week_ending="2025-06-08", post=False, out_dir=str(tmp_path))
    assert held["posted"] is False and held["reason"] == "post=False" and hook.posts == []


def test_a_bad_week_ending_fails_before_anything_is_read(store, tmp_path):
    from flows.weekly_report import weekly_report

    state = weekly_report(week_ending="08/06/2025", out_dir=str(tmp_path), return_state=True)
    assert state.is_failed() and "week_ending must be a date YYYY-MM-DD" in str(state.result(raise_on_failure=False))
    assert not list(tmp_path.glob("weekly-*.html"))
