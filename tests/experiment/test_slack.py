"""The weekly report's webhook message: Block Kit within Slack's limits, the headline figures, the link, the
simulated-traffic warning, escaping, and no query or answer text."""

from __future__ import annotations

import json

import pytest

from experiment.report import weekly_message
from experiment.weekly import week_over_week
from tests.experiment.test_weekly import WEEK_ENDING, review_rows, two_weeks

URL = "https://reports.example/abloop/weekly-2025-06-08.html"


@pytest.fixture
def bundle(sqlite_db):
    review_rows(sqlite_db, two_weeks(sqlite_db, users=(60, 80)))
    return week_over_week(sqlite_db, WEEK_ENDING)


def _texts(message: dict) -> list[str]:
    """Every text in the blocks, wherever Block Kit keeps it."""
    out = []
    for block in message["blocks"]:
        for part in [block.get("text"), *block.get("fields", []), *block.get("elements", [])]:
            if isinstance(part, dict):
                out.append(part.get("text") if isinstance(part.get("text"), str) else part["text"]["text"])
    return out


def test_the_message_has_the_headline_figures_per_arm_and_a_button_to_the_report(bundle):
    message = weekly_message(bundle, URL)
    json.dumps(message, allow_nan=False)
    kinds = [block["type"] for block in message["blocks"]]
    assert kinds == ["header", "section", "section", "context", "context", "actions"]
    assert message["blocks"][0]["text"] == {"type": "plain_text", "text": "Weekly report · week ending 2025-06-08"}
    # One simulated user among real ones (review_rows): flagged before any figure.
    assert message["blocks"][1]["text"]["text"].startswith(":warning: *Part of the traffic and feedback in these two "
                                                           "weeks was SIMULATED (sim- users): 1 of ")
    fields = message["blocks"][2]["fields"]
    assert len(fields) == 9 and all(f["type"] == "mrkdwn" and len(f["text"]) < 2000 for f in fields)
    overall = bundle["groups"]["overall"]
    requests = overall["this"]["requests"]
    assert fields[0]["text"].startswith(f"*requests*\n{requests:,} (+")
    thumbs = fields[2]["text"]
    assert thumbs.startswith("*thumbs-up per request*\n") and "95% [" in thumbs  # a rate: its change's interval
    assert "95%" not in fields[6]["text"]  # latency p95: a change, no interval
    arm_lines = [e["text"] for e in message["blocks"][3]["elements"]]
    assert [line.split(":")[0] for line in arm_lines] == ["control", "candidate"]
    assert "Queries to review in the report: 2 lowest-rated, 2 lowest answer score, 3 no retrieval hits" in _texts(
        message)
    [button] = message["blocks"][-1]["elements"]
    assert button["type"] == "button" and button["url"] == URL
    assert message["text"].startswith(
        f"Weekly report · week ending 2025-06-08 (SIMULATED traffic): requests {requests:,} (+")
    for miss in ("How do I sort a list?", "What is a tuple?", "an answer"):  # nothing users wrote leaves the report
        assert miss not in json.dumps(message)


def test_a_file_path_is_shown_not_linked_and_simulated_traffic_is_flagged_first(bundle):
    bundle["simulated"]["both"].update(any=True, all=True, simulated_users=7)
    message = weekly_message(bundle, "/srv/abloop/reports/weekly-2025-06-08.html")
    assert [block["type"] for block in message["blocks"]][:2] == ["header", "section"]
    warning = message["blocks"][1]["text"]["text"]
    assert warning.startswith(":warning: *Traffic and feedback in these two weeks were SIMULATED")
    assert "(SIMULATED traffic)" in message["text"]
    assert all(block["type"] != "actions" for block in message["blocks"])
    assert message["blocks"][-1]["elements"][0]["text"] == "Report: `/srv/abloop/reports/weekly-2025-06-08.html`"


def test_control_characters_are_escaped_and_the_header_fits(sqlite_db):
    bundle = week_over_week(sqlite_db, WEEK_ENDING)  # an empty store still makes a message
    bundle["week"]["ending"] = "<!channel> & " + "x" * 200
    message = weekly_message(bundle, "reports/<weekly>.html")
    assert len(message["blocks"][0]["text"]["text"]) == 150
    assert "<!channel>" not in message["text"] and "&lt;!channel&gt; &amp;" in message["text"]
    assert message["blocks"][-1]["elements"][0]["text"] == "Report: `reports/&lt;weekly&gt;.html`"
    assert all("–" in f["text"] for f in message["blocks"][1]["fields"][2:])  # no data: no figure, no change
