"""weekly_report: this week against last week, per assigned arm and overall (experiment.weekly).

Always written as an HTML report (the same renderer as the experiment report; `abloop report --weekly` writes the
same file without Prefect) and published as Prefect artifacts; posted to a Slack-compatible incoming webhook when one
is configured: SLACK_WEBHOOK_URL, else the Prefect Secret block `slack-webhook-url`. REPORT_BASE_URL, where the
reports directory is served, makes the message's link absolute; otherwise it names the file.

The webhook URL is the secret itself (whoever has it can post to the channel): it is read inside the posting task,
never passed as a parameter (Prefect records parameters), and it appears in no log line or error message. Posting
is the one task that talks to the network, so it alone retries, and only on errors worth retrying.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.observability import observed

SECRET_BLOCK = "slack-webhook-url"
_TIMEOUT_S = 10.0


class WebhookError(RuntimeError):
    """The webhook refused or could not be reached; the message never contains its URL."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@task(retries=2, retry_delay_seconds=10)
def gather_week(database_url: str, week_ending: str | None) -> dict:
    from experiment.weekly import parse_week_ending, week_over_week
    from store.db import Database

    db = Database(database_url)
    try:
        return week_over_week(db, parse_week_ending(week_ending))
    finally:
        db.dispose()


@task
def write_html(bundle: dict, out_dir: str) -> str:
    from experiment.report import write_weekly_html

    return str(write_weekly_html(bundle, Path(out_dir)))


@task
def publish(bundle: dict, link: str) -> None:
    """The report's content as a markdown artifact, and the figures of every group as a table."""
    from experiment.report import weekly_to_markdown

    create_markdown_artifact(weekly_to_markdown(bundle, link), key="weekly-report",
                             description=f"Week ending {bundle['week']['ending']}, against the week before")
    rows = [{"group": name, "week": week, **{key: (value.get("value") if isinstance(value, dict) else value)
                                             for key, value in group[week].items()}}
            for name, group in bundle["groups"].items() for week in ("last", "this")]
    create_table_artifact(rows, key="weekly-figures", description="Per group and week; users are the unit")


def _transient(_task: Any, _run: Any, state: Any) -> bool:
    """Retry a post that may go through later (network, 429, 5xx), not one the webhook refused."""
    try:
        state.result()
    except WebhookError as error:
        return error.transient
    except Exception:  # e.g. the Prefect API while reading the Secret block
        return True
    return False


@task(retries=3, retry_delay_seconds=[2, 15, 60], retry_condition_fn=_transient, cache_policy=NO_CACHE)
def post_message(message: dict) -> dict:
    url = _webhook_url()
    if url is None:
        return {"posted": False, "reason": f"no webhook configured (SLACK_WEBHOOK_URL or Secret block {SECRET_BLOCK})"}
    _send(url, message)
    return {"posted": True, "reason": "posted"}


@observed
@flow(name="weekly_report")
def weekly_report(week_ending: str | None = None, post: bool = True, out_dir: str = "reports") -> dict:
    from experiment.report import weekly_message
    from experiment.weekly import parse_week_ending
    from store.config import Settings

    settings = Settings()
    log = get_run_logger()
    parse_week_ending(week_ending)  # a bad date fails the run before anything is read
    bundle = gather_week(settings.database_url, week_ending)
    report = write_html(bundle, out_dir)
    link = _report_link(report, settings.report_base_url)
    publish(bundle, link)
    delivery = post_message(weekly_message(bundle, link)) if post else {"posted": False, "reason": "post=False"}
    log.info(f"weekly report for the week ending {bundle['week']['ending']}: {link}; {delivery['reason']}")
    return {"week_ending": bundle["week"]["ending"], "report": report, "link": link, **delivery,
            "simulated": bundle["simulated"]["both"]["any"]}


def _report_link(report: str, base_url: str | None) -> str:
    """The report's URL under REPORT_BASE_URL, else its absolute path."""
    if base_url:
        return f"{base_url.rstrip('/')}/{Path(report).name}"
    return str(Path(report).resolve())


def _webhook_url() -> str | None:
    from prefect.blocks.system import Secret

    from store.config import Settings

    configured = Settings().slack_webhook_url
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value()
    try:
        return str(Secret.load(SECRET_BLOCK).get()) or None
    except ValueError:  # no such block: posting is simply not configured
        return None


def _send(url: str, message: dict) -> None:
    import httpx

    try:
        with _unlogged(url):
            response = httpx.post(url, json=message, timeout=_TIMEOUT_S)
    except httpx.HTTPError as error:
        raise WebhookError(f"webhook unreachable ({type(error).__name__})", transient=True) from None
    if not response.is_success:
        status = response.status_code
        raise WebhookError(f"webhook answered HTTP {status}", transient=status == 429 or status >= 500)


class _HideSecret(logging.Filter):
    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        return self.secret not in record.getMessage()


@contextmanager
def _unlogged(secret: str):
    """httpx logs every request with its URL, which here is the secret: drop those lines while posting."""
    hide = _HideSecret(secret)
    loggers = [logging.getLogger(name) for name in ("httpx", "httpcore")]
    for logger in loggers:
        logger.addFilter(hide)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(hide)
