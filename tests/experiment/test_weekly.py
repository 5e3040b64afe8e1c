"""The weekly report: week-over-week figures against a direct computation (and gbstats), the review lists, prompt
templates, simulated users, the HTML page on the experiment report's renderer, its markdown, and the CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest
from gbstats.frequentist.tests import FrequentistConfig, TwoSidedTTest
from scipy import stats as sps
from sqlalchemy import insert, select

from abloop.cli import main
from experiment.report import SIMULATED_PREFIX, render_html, render_weekly_html, weekly_to_markdown
from experiment.report.gather import gather
from experiment.stats import Estimate, ratio_estimate, relative_change
from experiment.weekly import RATES, parse_week_ending, week_over_week, weeks_ending
from store.db import Database
from store.models import AnswerScore, Feedback, PromptTemplate, SearchEvent, new_id
from tests.experiment import traffic
from tests.experiment.test_report import _REMOTE, SCRIPT
from tests.experiment.test_stats import clustered, ratio_statistic
from tests.experiment.traffic import ArmBehaviour

WEEK_ENDING = date(2025, 6, 8)  # a Sunday: this week is Monday 2 to Sunday 8 June
WEEKS = weeks_ending(WEEK_ENDING)
LAST = ArmBehaviour(up=0.45, rating_mean=3.2, error=0.02, fallback=0.02, latency_ms=100.0)
THIS_CONTROL = ArmBehaviour(up=0.45, rating_mean=3.2, error=0.02, latency_ms=100.0)
THIS_CANDIDATE = ArmBehaviour(up=0.75, rating_mean=3.8, error=0.01, fallback=0.03, latency_ms=140.0, feedback=0.9)


def two_weeks(db: Database, prefix: str = "user", users: tuple[int, int] = (300, 400)) -> str:
    """Two weeks of traffic on one experiment; the first `users[0]` users come back in the second week."""
    running = traffic.start(db, share=0.5)
    for (week_start, count), seed, control, candidate in (((WEEKS.last_start, users[0]), 1, LAST, LAST),
                                                          ((WEEKS.this_start, users[1]), 2, THIS_CONTROL,
                                                           THIS_CANDIDATE)):
        # Spread over the week (the by-day figures), clear of its edges.
        traffic.write(db, running, users=count, control=control, candidate=candidate, requests_per_user=2,
                      propensity_sd=0.1, seed=seed, ts=week_start + timedelta(hours=1), prefix=prefix,
                      step=(timedelta(days=7) - timedelta(hours=2)) / (2 * count))
    return running.id


def search_event(experiment_id: str | None, ts: datetime, user: str | None, query: str, **fields) -> dict:
    row = {"id": new_id(), "ts": ts, "user_id": user, "experiment_id": experiment_id, "arm": "control",
           "served_arm": "control", "query": query, "messages": [], "retrieved": {"ids": ["doc-1"], "scores": [0.8]},
           "answer": "an answer", "status": "ok", "timings": {"total": 90.0}, "tokens_in": 10, "tokens_out": 5}
    return {**row, **fields}


def review_rows(db: Database, experiment_id: str) -> dict[str, str]:
    """This week's misses and templates: low ratings (one by a simulated user), a low answer score, no hits."""
    with db.session() as session:
        templates = {}
        for version in (1, 2):
            template = PromptTemplate(name="search", version=version, system_prompt="s", template="{query}")
            session.add(template)
            session.flush()
            templates[version] = template.id
    at = WEEKS.this_start + timedelta(days=3)
    rows = {
        "sort": search_event(experiment_id, at, "user-a", "How do I sort a list?", answer=f"Use sorted(). {SCRIPT}",
                       prompt_template_id=templates[1], prompt_template_version=1),
        "sort_sim": search_event(experiment_id, at, f"{SIMULATED_PREFIX}0001", "  how do I SORT a list? ",
                           prompt_template_id=templates[1], prompt_template_version=1),
        "tuple": search_event(experiment_id, at, "user-c", "What is a tuple?", retrieved={"ids": []},
                        prompt_template_id=templates[2], prompt_template_version=2, tokens_in=30),
        "anonymous": search_event(experiment_id, at, None, "anonymous question", retrieved={}),
        "fine": search_event(experiment_id, at, "user-e", "What does zip do?", prompt_template_id=templates[2],
                       prompt_template_version=2),
        "failed": search_event(experiment_id, at, "user-f", "broken", retrieved={}, status="error", answer=None),
        "old": search_event(experiment_id, WEEKS.last_start - timedelta(seconds=1), "user-a", "too old", retrieved={}),
        "next": search_event(experiment_id, WEEKS.end, "user-a", "next week already", retrieved={}),
    }
    feedback = [
        {"id": new_id(), "event_id": rows["sort"]["id"], "ts": at, "thumbs": "down", "rating": 1,
         "corrected_answer": "list.sort() <b>sorts</b> in place"},
        {"id": new_id(), "event_id": rows["sort_sim"]["id"], "ts": at, "thumbs": None, "rating": 2},
        {"id": new_id(), "event_id": rows["fine"]["id"], "ts": at, "thumbs": "up", "rating": 5},
        {"id": new_id(), "event_id": rows["tuple"]["id"], "ts": at, "thumbs": "up", "rating": None},
    ]
    scores = [{"id": new_id(), "event_id": rows["tuple"]["id"], "method": "grounding", "score": 0.1},
              {"id": new_id(), "event_id": rows["fine"]["id"], "method": "grounding", "score": 0.9},
              {"id": new_id(), "event_id": rows["sort"]["id"], "method": "judge", "score": 0.3}]
    with db.session() as session:
        session.execute(insert(SearchEvent), list(rows.values()))
        session.execute(insert(Feedback), feedback)
        session.execute(insert(AnswerScore), scores)
    return templates


def per_user(db: Database, start: datetime, end: datetime, arm: str | None = None) -> dict[str, np.ndarray]:
    """Per-user sums read straight from the tables (not through experiment.metrics): the direct computation."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    with db.session() as session:
        events = session.execute(select(SearchEvent.id, SearchEvent.user_id, SearchEvent.arm, SearchEvent.status)
                                 .where(SearchEvent.ts >= start, SearchEvent.ts < end)).all()
        feedback = session.execute(select(Feedback.event_id, Feedback.thumbs, Feedback.rating)).all()
    owner = {}
    for event_id, user, event_arm, status in events:
        if user is None or (arm is not None and event_arm != arm):
            continue
        owner[event_id] = user
        sums[user]["requests"] += 1
        sums[user]["errors"] += status == "error"
    answered = set()
    for event_id, thumbs, rating in feedback:
        if event_id in owner:
            user = owner[event_id]
            sums[user]["thumbs_up"] += thumbs == "up"
            sums[user]["feedback"] += event_id not in answered
            answered.add(event_id)
            if rating is not None:
                sums[user]["rating_sum"] += rating
                sums[user]["ratings"] += 1
    users = sorted(sums)
    return {key: np.array([sums[u][key] for u in users], dtype=float)
            for key in ("requests", "errors", "thumbs_up", "feedback", "rating_sum", "ratings")}


def delta_ratio(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """sum(num) / sum(den) and the delta-method variance of that ratio, written out."""
    n, mx, my = len(num), num.mean(), den.mean()
    cov = np.cov(num, den, ddof=1)
    return mx / my, (cov[0, 0] / my**2 - 2 * mx * cov[0, 1] / my**3 + mx**2 * cov[1, 1] / my**4) / n


def test_relative_change_is_the_delta_method_and_gbstats_relative_lift():
    rng = np.random.default_rng(21)
    num_a, den_a = clustered(rng, 400)
    num_b, den_b = clustered(rng, 350, rate_shape=(1.4, 2.0))
    before, after = ratio_estimate(num_a, den_a), ratio_estimate(num_b, den_b)
    change = relative_change(before, after, alpha=0.1)
    (r_a, var_a), (r_b, var_b) = delta_ratio(num_a, den_a), delta_ratio(num_b, den_b)
    assert change["relative"] == pytest.approx(r_b / r_a - 1, rel=1e-12)
    variance = var_b / r_a**2 + r_b**2 * var_a / r_a**4
    assert change["std_error"] == pytest.approx(math.sqrt(variance), rel=1e-9)
    dof = (var_a + var_b) ** 2 / (var_a**2 / 399 + var_b**2 / 349)
    half = sps.t.ppf(0.95, dof) * math.sqrt(variance)
    assert change["ci"] == pytest.approx([r_b / r_a - 1 - half, r_b / r_a - 1 + half], rel=1e-9)

    reference = TwoSidedTTest(ratio_statistic(num_a, den_a), ratio_statistic(num_b, den_b),
                              FrequentistConfig(difference_type="relative", alpha=0.1))
    assert change["relative"] == pytest.approx(reference.point_estimate, rel=1e-12)
    assert change["std_error"] ** 2 == pytest.approx(reference.variance, rel=1e-9)
    assert change["dof"] == pytest.approx(reference.dof, rel=1e-9)
    assert change["ci"] == pytest.approx(reference.confidence_interval, rel=1e-9)
    assert 0.001 < reference.p_value < 0.9 and change["p_value"] == pytest.approx(reference.p_value, rel=1e-9)
    assert change["users"] == [400, 350]
    json.dumps(change, allow_nan=False)


def test_relative_change_where_it_is_undefined_or_exact():
    one = Estimate(0.5, 0.01, 100)
    assert relative_change(Estimate(0.0, 0.01, 100), one) is None  # nothing last week: no percentage
    assert relative_change(Estimate(0.5, math.nan, 1), one) is None
    assert relative_change(one, Estimate(math.nan, math.nan, 0)) is None
    assert relative_change(one, Estimate(0.0, 0.0, 100)) is None  # no error this week: the formula says "exactly"
    exact = relative_change(Estimate(0.5, 0.0, 10), Estimate(0.6, 0.0, 10))
    assert exact["relative"] == pytest.approx(0.2) and exact["ci"] == pytest.approx([0.2, 0.2])
    assert exact["p_value"] == 0.0 and exact["dof"] is None


def test_weeks_are_whole_utc_days_ending_yesterday_by_default():
    monday_morning = datetime(2025, 6, 9, 7, 0, tzinfo=UTC)
    assert weeks_ending(now=monday_morning) == WEEKS
    assert WEEKS.this_start == datetime(2025, 6, 2, tzinfo=UTC) and WEEKS.end == datetime(2025, 6, 9, tzinfo=UTC)
    assert WEEKS.last_start == datetime(2025, 5, 26, tzinfo=UTC) and WEEKS.ending == WEEK_ENDING
    assert WEEKS.which(WEEKS.end) is None and WEEKS.which(WEEKS.this_start) == "this"
    assert WEEKS.which(WEEKS.this_start - timedelta(microseconds=1)) == "last"
    assert parse_week_ending("2025-06-08") == WEEK_ENDING and parse_week_ending(None) is None
    with pytest.raises(ValueError, match="week_ending must be a date YYYY-MM-DD"):
        parse_week_ending("last sunday")


def test_week_over_week_matches_a_direct_computation(db):
    experiment_id = two_weeks(db)
    review_rows(db, experiment_id)
    bundle = week_over_week(db, WEEK_ENDING)
    json.dumps(bundle, allow_nan=False)
    assert bundle["week"]["ending"] == "2025-06-08"
    assert bundle["anonymous_requests"] == {"last": 0, "this": 1}
    assert [e["id"] for e in bundle["experiments"]] == [experiment_id]
    assert bundle["experiments"][0]["events"]["this"] == 800 + 6  # the review rows but "old" and "next" (outside)

    for group, arm in (("overall", None), ("control", "control"), ("candidate", "candidate")):
        weeks = {}
        for week, start, end in (("last", WEEKS.last_start, WEEKS.this_start), ("this", WEEKS.this_start, WEEKS.end)):
            direct = per_user(db, start, end, arm)
            figures = bundle["groups"][group][week]
            assert figures["users"] == len(direct["requests"]) and figures["requests"] == direct["requests"].sum()
            assert figures["errors"] == direct["errors"].sum()
            for name, num, den in (("thumbs_up_per_request", "thumbs_up", "requests"),
                                   ("mean_rating", "rating_sum", "ratings"), ("feedback_rate", "feedback", "requests"),
                                   ("error_rate", "errors", "requests")):
                value, variance = delta_ratio(direct[num], direct[den])
                assert figures[name]["value"] == pytest.approx(value, rel=1e-12), (group, week, name)
                assert figures[name]["std_error"] == pytest.approx(math.sqrt(variance), rel=1e-9), (group, week, name)
            weeks[week] = direct
        change = bundle["groups"][group]["change"]
        assert change["requests"]["relative"] == pytest.approx(weeks["this"]["requests"].sum()
                                                               / weeks["last"]["requests"].sum() - 1)
        reference = TwoSidedTTest(ratio_statistic(weeks["last"]["thumbs_up"], weeks["last"]["requests"]),
                                  ratio_statistic(weeks["this"]["thumbs_up"], weeks["this"]["requests"]),
                                  FrequentistConfig(difference_type="relative"))
        assert change["thumbs_up_per_request"]["relative"] == pytest.approx(reference.point_estimate, rel=1e-9)
        assert change["thumbs_up_per_request"]["ci"] == pytest.approx(reference.confidence_interval, rel=1e-9)
        assert set(RATES) <= set(change) and change["latency_p95_ms"].get("ci") is None

    candidate = bundle["groups"]["candidate"]["change"]
    assert candidate["thumbs_up_per_request"]["ci"][0] > 0  # the candidate got much better this week
    control = bundle["groups"]["control"]["change"]["thumbs_up_per_request"]
    assert control["ci"][0] < 0 < control["ci"][1]  # control did not change
    assert candidate["latency_p95_ms"]["relative"] > 0.2  # 140 ms answers against 100 ms ones
    assert bundle["groups"]["candidate"]["this"]["fallbacks"] > 0 and bundle["groups"]["candidate"]["this"][
        "answer_score"]["value"] is None  # traffic without answer scores has none
    days = bundle["days"]["this"]
    assert [d["date"] for d in days] == [f"2025-06-0{n}" for n in range(2, 9)]
    assert sum(d["requests"] for d in days) == bundle["groups"]["overall"]["this"]["requests"]
    assert all(d["requests"] > 0 for d in days)


def test_miss_queries_templates_and_simulated_users_are_reported(sqlite_db):
    experiment_id = two_weeks(sqlite_db, users=(40, 40))
    templates = review_rows(sqlite_db, experiment_id)
    bundle = week_over_week(sqlite_db, WEEK_ENDING)
    misses = bundle["misses"]

    assert [m["query"] for m in misses["lowest_rated"]] == ["q", "How do I sort a list?"]  # the worst, most often
    rated = misses["lowest_rated"][1]  # the same question twice, spelled differently; the worst feedback shown
    assert rated["events"] == 2 and rated["simulated_events"] == 1
    assert rated["worst"] == 0.0 and rated["thumbs"] == "down" and "sorts" in rated["corrected_answer"]
    assert SCRIPT in rated["answer"]  # the bundle keeps the text; the renderers escape it
    assert [(m["query"], m["method"], m["worst"]) for m in misses["lowest_score"]] == [
        ("What is a tuple?", "grounding", 0.1), ("How do I sort a list?", "judge", 0.3)]
    no_hits = {m["query"]: m["events"] for m in misses["no_hits"]}
    assert no_hits == {"q": 80 - _errors(sqlite_db), "What is a tuple?": 1, "anonymous question": 1}
    assert list(no_hits)[0] == "q"  # most frequent first; errors, last week's and next week's never count

    by_template = {(t["template_id"], t["version"]): t for t in bundle["templates"]}
    first, second = by_template[(templates[1], 1)], by_template[(templates[2], 2)]
    assert first["name"] == "search" and first["requests"] == 2 and first["users"] == 2
    assert second["requests"] == 2 and second["tokens_in_per_request"] == 20
    assert second["thumbs_up_per_request"]["value"] == 1.0 and first["thumbs_up_per_request"]["value"] == 0.0
    untemplated = by_template[(None, None)]
    assert untemplated["requests"] == 80 + 1 and bundle["templates"][0] is untemplated  # busiest first

    simulated = bundle["simulated"]
    assert simulated["this"]["simulated_users"] == 1 and simulated["this"]["simulated_events"] == 1
    assert simulated["this"]["any"] and not simulated["this"]["all"] and not simulated["last"]["any"]
    assert simulated["both"]["events"] == simulated["last"]["events"] + simulated["this"]["events"]


def _errors(db: Database) -> int:
    with db.session() as session:
        return len(session.execute(select(SearchEvent.id).where(
            SearchEvent.status == "error", SearchEvent.query == "q", SearchEvent.ts >= WEEKS.this_start,
            SearchEvent.ts < WEEKS.end)).all())


def test_the_weekly_page_uses_the_report_renderer_escapes_and_fetches_nothing(sqlite_db):
    experiment_id = two_weeks(sqlite_db, prefix="sim-user", users=(60, 80))
    review_rows(sqlite_db, experiment_id)
    bundle = week_over_week(sqlite_db, WEEK_ENDING)
    page = render_weekly_html(bundle)
    assert render_weekly_html(json.loads(json.dumps(bundle))) == page
    assert re.findall(r"<h2>(.*?)</h2>", page) == ["This week", "Week over week", "By day", "Miss queries to review",
                                                   "Prompt templates", "What the arms were", "Method notes"]
    style = re.compile(r"<style>.*?</style>", re.S)
    assert style.findall(page) == style.findall(render_html(gather(sqlite_db, points=2)))  # one stylesheet
    assert page.count('<svg class="chart"') == 1 and page.count("<polyline") == 2 and page.count("<polygon") >= 2
    assert page.count('<svg class="ci-bar"') >= 6  # the changes of the rates that have intervals
    assert "<script" not in page.lower() and "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    assert "<b>sorts</b>" not in page and "&lt;b&gt;sorts&lt;/b&gt;" in page
    assert not _REMOTE.findall(page) and "<img" not in page and "<link" not in page
    # Almost all traffic is simulated: the banner says so, and the one simulated review query is labelled.
    assert "Part of the traffic and feedback in these two weeks was SIMULATED" in page
    assert "SIMULATED user" in page and "simulated traffic" in page
    assert "2025-06-02 – 2025-06-08" in page and "2025-05-26 – 2025-06-01" in page
    assert "search v1" in page and "search v2" in page and "independent samples" in page

    text = weekly_to_markdown(bundle, "https://reports.example/weekly-2025-06-08.html")
    assert text.startswith("# Weekly report · week ending 2025-06-08")
    assert "## All traffic" in text and "## Control arm" in text and "### No retrieval hits" in text
    assert "https://reports.example/weekly-2025-06-08.html" in text and "SIMULATED" in text
    assert "<script" not in text and "&lt;script>alert" in text
    assert any(not t.get("template_id") for t in bundle["templates"])  # requests rendered without a template
    assert "| (no template) |" in text and "| (no temp |" not in text


def test_an_empty_store_renders_every_section_empty(sqlite_db, tmp_path):
    bundle = week_over_week(sqlite_db, WEEK_ENDING)
    assert bundle["groups"]["overall"]["this"]["users"] == 0 and bundle["experiments"] == []
    assert bundle["groups"]["overall"]["change"]["thumbs_up_per_request"]["relative"] is None
    page = render_weekly_html(bundle)
    assert "None this week." in page and "No request this week." in page and "SIMULATED" not in page
    assert "No feedback in either week" in page and "<svg class=\"chart\"" not in page
    assert "None this week." in weekly_to_markdown(bundle)


def test_abloop_report_weekly_writes_the_page(sqlite_db, tmp_path, monkeypatch, capsys):
    experiment_id = two_weeks(sqlite_db, users=(20, 20))
    review_rows(sqlite_db, experiment_id)
    monkeypatch.setenv("DATABASE_URL", sqlite_db.url)
    main(["report", "--weekly", "--week-ending", "2025-06-08", "--out", str(tmp_path / "reports")])
    path = tmp_path / "reports" / "weekly-2025-06-08.html"
    assert json.loads(capsys.readouterr().out) == {"report": str(path)}
    page = path.read_text(encoding="utf-8")
    assert (tmp_path / "reports" / "weekly-latest.html").read_text(encoding="utf-8") == page
    assert "Weekly report · week ending 2025-06-08" in page and "How do I sort a list?" in page
    with pytest.raises(SystemExit):
        main(["report", "--weekly", "--week-ending", "last-sunday"])
    with pytest.raises(SystemExit, match="--week-ending goes with --weekly"):
        main(["report", "--week-ending", "2025-06-08"])


def test_importing_the_weekly_modules_is_light():
    code = ("import sys, experiment, experiment.weekly, experiment.report.slack\n"
            "heavy = [m for m in ('numpy', 'scipy', 'torch', 'faiss', 'fastapi', 'prefect') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
