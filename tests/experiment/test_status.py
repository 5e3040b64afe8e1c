"""What an operator reads: `abloop evaluate`'s table (render_analysis) and `abloop status` (describe, render)."""

from __future__ import annotations

import re

import pytest

import experiment
from experiment import lifecycle
from experiment.metrics import METRICS
from experiment.status import arm_label, describe, render, render_analysis
from store.models import Experiment
from tests.experiment import traffic
from tests.experiment.traffic import ArmBehaviour


def _row(table: str, label: str) -> list[str]:
    """The cells of the table row `label`: control, candidate, then the interval's ends if shown."""
    (line,) = [line for line in table.splitlines() if line.startswith(f"  {label} ") or line == f"  {label}"]
    return re.findall(r"[^\s\[\],]+", line[len(label) + 2:])


@pytest.fixture
def evaluated(sqlite_db):
    """A finished look at an experiment whose candidate is better but errs more (a guardrail is breached)."""
    running = traffic.start(sqlite_db)
    traffic.write(sqlite_db, running, users=1500, control=ArmBehaviour(up=0.45),
                  candidate=ArmBehaviour(up=0.62, error=0.05))
    return experiment.evaluate(sqlite_db, running.id).to_dict()


def test_every_compared_metric_has_a_row_with_both_arms_and_its_interval(evaluated):
    table = render_analysis(evaluated)
    for name, comparison in evaluated["metrics"].items():
        label = f"{name} (primary)" if name == evaluated["primary_metric"] else name
        cells = _row(table, label)
        if comparison is None:
            assert cells == ["-", "-"], name
            continue
        expected = [comparison["control"], comparison["candidate"], *comparison["ci"]]
        assert [float(cell) for cell in cells] == pytest.approx(expected, rel=1e-3, abs=1e-12), name
    assert set(METRICS) <= set(evaluated["metrics"])  # judge_score and tokens per request included
    for name in ("users", "requests"):
        assert _row(table, name) == [str(evaluated["arms"][arm][name]) for arm in ("control", "candidate")]


def test_the_primary_metric_its_phases_guardrails_and_decision_are_spelled_out(evaluated):
    table = render_analysis(evaluated)
    lines = table.splitlines()
    assert lines[0] == (f"experiment {evaluated['experiment_id']} (candidate share 50%, primary metric "
                        "satisfaction)")
    primary = evaluated["metrics"]["satisfaction"]
    assert (f"  satisfaction: candidate - control = {primary['difference']:+.4g} ({primary['relative']:+.1%}), "
            f"always-valid p = {primary['p_value']:.4g}, chance to win >99.9%") in lines
    assert not any("CUPED" in line for line in lines)  # no traffic before the experiment: nothing to adjust by
    with_history = {**evaluated, "metrics": {**evaluated["metrics"], "satisfaction": {**primary, "cuped": {
        "theta": 0.5, "users_with_pre": [10, 12], "variance_reduction": 0.23456}}}}
    assert ("  satisfaction: CUPED on the users' pre-period values cut its variance by 23.5%"
            in render_analysis(with_history).splitlines())
    (phase,) = evaluated["phases"]
    assert (f"  phase 1: share 50%, users {phase['users'][0]} control / {phase['users'][1]} candidate, "
            f"sample-ratio p={phase['p_value']:.4g}") in lines
    assert lines[-2] == f"  guardrails breached: {evaluated['guardrails']['breached'][0]}"
    assert "error_rate" in lines[-2]
    assert lines[-1] == f"decision: roll_back - {evaluated['decision']['reason']}"


def test_a_mismatch_users_in_both_arms_and_a_rollout_are_shown(evaluated):
    evaluated["phases"][0]["mismatch"] = True
    evaluated["assignment"] = {"users_in_both_arms": 4, "requests_excluded": 0, "users_left_out": 7}
    evaluated["decision"]["rollout"] = {"did": "wait", "step": 0}
    evaluated["guardrails"]["breached"] = []
    lines = render_analysis(evaluated).splitlines()
    assert lines[-5].startswith("  phase 1: ") and lines[-5].endswith("  MISMATCH")
    assert lines[-4] == "  users left out: 7 whose bucket a share change moved; users seen in both arms: 4"
    assert lines[-3] == "  guardrails breached: none"
    assert lines[-1] == "rollout: {'did': 'wait', 'step': 0}"


@pytest.mark.parametrize(("chance", "shown"), [(0.5, "50.0%"), (0.9994, "99.9%"), (0.9995, ">99.9%"),
                                               (0.0004, "<0.1%"), (0.0005, "0.1%")])
def test_a_chance_to_win_is_never_printed_as_certain(evaluated, chance, shown):
    evaluated["metrics"]["satisfaction"]["chance_to_win"] = chance
    assert f"chance to win {shown}\n" in render_analysis(evaluated)


def test_another_primary_metric_is_the_one_marked(sqlite_db):
    traffic.start(sqlite_db)
    running = lifecycle.start_candidate(sqlite_db, base_url="http://candidate.test/v1", model="candidate-v2",
                                        primary_metric="thumbs_up_rate")
    traffic.write(sqlite_db, running, users=400)
    analysis = experiment.evaluate(sqlite_db, running.id).to_dict()
    table = render_analysis(analysis)
    assert [line for line in table.splitlines() if "(primary)" in line][0].startswith("  thumbs_up_rate (primary)")
    assert "  thumbs_up_rate: candidate - control" in table


def test_no_experiment_is_one_line(sqlite_db):
    analysis = experiment.evaluate(sqlite_db).to_dict()
    assert render_analysis(analysis) == (f"decision: {analysis['decision']['action']} - "
                                         f"{analysis['decision']['reason']}")
    assert render(describe(sqlite_db)).splitlines()[-1] == "no running experiment"


def test_status_shows_the_arms_the_rollout_the_decision_and_every_transition(sqlite_db, evaluated):
    running_id = evaluated["experiment_id"]
    lifecycle.set_rollout(sqlite_db, running_id, {"steps": [0.1, 0.5], "min_users_per_step": 300,
                                                  "min_hours_per_step": 2, "auto_promote": False})
    status = describe(sqlite_db, running_id)
    status["index_version"] = "v7"
    lines = render(status).splitlines()
    assert lines[0].endswith("index: v7  events: 1500  feedback: " + str(status["feedback"]))
    assert lines[1] == f"experiment {running_id} (running), primary metric satisfaction"
    assert lines[3].startswith("  candidate: ") and lines[3].endswith("@ http://candidate.test/v1")
    assert lines[4].startswith("  share 10%, phase 2 of 2 since ")
    assert lines[5] == ("  rollout 10% -> 50%: step 1 of 2 (min 300 users and 2.0 h per step, "
                        "promote on approval)")
    assert lines[6] == f"  last decision: roll_back - {evaluated['decision']['reason']}"  # evaluate recorded it
    assert lines[7] == "  transitions:"
    assert [line.split()[1:5] for line in lines[8:]] == [["start", "-", "->", "50%"],
                                                         ["rollout_step", "50%", "->", "10%"]]
    assert status["experiment"]["phase"] == {"index": 2, "of": 2, "share": 0.1,
                                             "since": status["experiment"]["transitions"][1]["ts"]}
    assert "PAUSED" not in render(status)
    lifecycle.set_share(sqlite_db, running_id, 0.3)  # by hand, mid-rollout
    paused = render(describe(sqlite_db, running_id)).splitlines()
    assert paused[5].startswith("  rollout 10% -> 50%: step 1 of 2 ")
    assert paused[6] == "  rollout PAUSED: the share was set by hand to 30%; PUT a new rollout to resume"


@pytest.mark.parametrize(("described", "arm", "label"), [
    (None, "candidate", "no candidate"),
    (None, "control", "(model not named)"),
    ({"model": None, "prompt_template_id": None}, "candidate", "(model not named)"),
    ({"model": "m-v2", "prompt_template_id": None}, "control", "m-v2"),
    ({"model": "m-v2", "prompt_template_id": "0123456789abcdef"}, "candidate", "m-v2 with prompt template 01234567"),
])
def test_an_arm_is_named_by_its_model_and_its_own_prompt_template(described, arm, label):
    assert arm_label(described, arm) == label


def test_status_describes_each_arm_and_counts_only_this_experiments_events(sqlite_db):
    from store import prompts

    first = traffic.start(sqlite_db)
    traffic.write(sqlite_db, first, users=30)
    with sqlite_db.session() as session:  # control serves an adapter promoted earlier: the next experiment keeps it
        session.get(Experiment, first.id).control_adapter_id = "adapter-3"
    template = prompts.new_version(sqlite_db, name=prompts.DEFAULT_NAME, system_prompt="Answer in one line.",
                                   template=prompts.DEFAULT_TEMPLATE, few_shot=[], activate=False)
    second = lifecycle.start_candidate(sqlite_db, base_url="http://candidate.test/v2", model="candidate-v2",
                                       adapter_id="adapter-7", prompt_template_id=template.id, share=0.2)
    traffic.write(sqlite_db, second, users=12, prefix="later")
    now = describe(sqlite_db)["experiment"]
    assert now["id"] == second.id and now["ended_at"] is None and now["started_at"] == second.started_at.isoformat()
    assert now["search_events"] == 12 and describe(sqlite_db)["search_events"] == 42
    assert now["control"] == {"base_url": first.control_base_url, "model": first.control_model,
                              "adapter_id": "adapter-3", "prompt_template_id": None}
    assert now["candidate"] == {"base_url": "http://candidate.test/v2", "model": "candidate-v2",
                                "adapter_id": "adapter-7", "prompt_template_id": template.id}
    before = describe(sqlite_db, first.id)["experiment"]
    assert before["status"] == "stopped" and before["ended_at"] is not None and before["search_events"] == 30
    lines = render(describe(sqlite_db)).splitlines()
    assert lines[3] == f"  candidate: candidate-v2 with prompt template {template.id[:8]} @ http://candidate.test/v2"


def test_status_without_a_candidate_or_a_reason_and_with_auto_promote(sqlite_db):
    running = traffic.start(sqlite_db)
    lifecycle.set_rollout(sqlite_db, running.id, {"steps": [0.5], "min_users_per_step": 10,
                                                  "min_hours_per_step": 0, "auto_promote": True})
    status = describe(sqlite_db)
    status["experiment"]["control"]["model"] = None
    status["experiment"]["candidate"] = None
    status["experiment"]["decision"] = {"action": "wait"}
    lines = render(status).splitlines()
    assert lines[2] == f"  control:   (model not named) @ {running.control_base_url}"
    assert lines[3] == "  candidate: none"
    assert lines[5].endswith(", auto-promote)")
    assert lines[6] == "  last decision: wait - "


def test_an_experiment_without_a_candidate_has_no_candidate_arm(sqlite_db):
    """An experiment without LLM_API_BASE_NEW_MODEL: control only, and no candidate dict."""
    from store import experiments
    from store.config import Settings

    experiments.ensure_running(sqlite_db, Settings(_env_file=None, database_url=sqlite_db.url))
    assert describe(sqlite_db)["experiment"]["candidate"] is None
    assert render(describe(sqlite_db)).splitlines()[3] == "  candidate: none"


def test_the_database_password_is_never_shown(pg_url):
    """`abloop status` prints the store's URL: PostgreSQL's trust auth here ignores the password we add."""
    from store.db import Database

    secret_url = pg_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret-pw@", 1)
    assert secret_url != pg_url
    database = Database(secret_url)
    try:
        database.migrate()
        status = describe(database)
        assert "s3cret-pw" not in render(status) and "***" in status["database"]
    finally:
        database.dispose()


def test_counts_table_headers_and_two_breached_guardrails_read_as_written(evaluated):
    evaluated["arms"]["control"]["users"] = 123456  # a count stays a whole number, never 1.235e+05
    evaluated["guardrails"]["breached"] = ["error_rate up", "latency_p95_ms up"]
    evaluated["metrics"]["satisfaction"]["relative"] = None  # no lift when control's mean is 0
    lines = render_analysis(evaluated).splitlines()
    assert lines[1] == f"  {'':<32}{'control':>12}{'candidate':>12}  always-valid 95% interval of the difference"
    assert _row("\n".join(lines), "users")[0] == "123456"
    assert "  guardrails breached: error_rate up; latency_p95_ms up" in lines
    primary = evaluated["metrics"]["satisfaction"]
    assert f"  satisfaction: candidate - control = {primary['difference']:+.4g}, always-valid p" in "\n".join(lines)
