"""Acting on verdicts through the HTTP API with stub upstreams: ramps, rollouts, promote, rollback.

Simulated users (`sim-` ids) search through the real proxy, read the answer they got and give
feedback by a rule that judges the answer's text; nothing looks at the arm label.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import httpx
import pytest

import experiment
from abloop.cli import main
from experiment.analysis import Analysis
from serving.stub import running_stub
from store import experiments
from tests.proxy.conftest import make_settings, on_app_loop, running_proxy

Rule = Callable[[str, random.Random], dict]


def likes_candidate_answers(answer: str, rng: random.Random) -> dict:
    return {"thumbs": "up" if rng.random() < (0.75 if "candidate" in answer else 0.45) else "down"}


def rates_candidate_answers_lower(answer: str, rng: random.Random) -> dict:
    mean = 2.6 if "candidate" in answer else 3.6
    return {"rating": min(max(round(rng.gauss(mean, 1.0)), 1), 5)}


def indifferent(answer: str, rng: random.Random) -> dict:
    return {"thumbs": "up" if rng.random() < 0.5 else "down"}


@pytest.fixture
def arms():
    with running_stub(model="control-model", answer="control says hi") as (_c, control), \
            running_stub(model="candidate-model", answer="candidate says hi") as (_d, candidate):
        yield control, candidate


@pytest.fixture
def proxy(tmp_path, arms):
    control, candidate = arms
    settings = make_settings(tmp_path, llm_api_base=control, llm_model="control-model",
                             llm_api_base_new_model=candidate, llm_model_new="candidate-model", candidate_share=0.0)
    with running_proxy(settings) as (url, app):
        yield url, app


def _simulate(client: httpx.Client, url: str, users: range, rule: Rule, seed: int) -> dict[str, int]:
    """One search and one piece of feedback per simulated user; returns searches per served model."""
    rng = random.Random(seed)
    served: dict[str, int] = {}
    for n in users:
        found = client.post(f"{url}/api/v1/search", json={"query": "how do I sort a list?", "user_id": f"sim-{n}"})
        assert found.status_code == 200, found.text
        body = found.json()
        served[body["model"]] = served.get(body["model"], 0) + 1
        # X-User-Id: feedback is rate limited per user, else per address (every simulated user's is 127.0.0.1).
        given = client.post(f"{url}/api/v1/feedback", json={"request_id": body["request_id"],
                                                            **rule(body["answer"], rng)},
                            headers={"X-User-Id": f"sim-{n}"})
        assert given.status_code == 201, given.text
    return served


def _evaluate(app) -> Analysis:
    """What the hourly evaluate_arms run does, after the proxy's write queue is flushed."""
    state = app.state.abloop
    on_app_loop(app, state.writer.flush())
    analysis = experiment.evaluate(state.db)
    # Replicas pick up a change within experiment_refresh_s; refresh now rather than sleep for it.
    on_app_loop(app, state.live.refresh())
    return analysis


def _put(client, url, admin_headers, body) -> dict:
    response = client.put(f"{url}/api/v1/admin/experiment", json=body, headers=admin_headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_ramp_from_10_to_50_percent_is_no_sample_ratio_mismatch(proxy, client, admin_headers):
    url, app = proxy
    first = _put(client, url, admin_headers, {"candidate_share": 0.1})
    _simulate(client, url, range(0, 600), indifferent, seed=1)
    ramped = _put(client, url, admin_headers, {"candidate_share": 0.5})
    assert (ramped["id"], ramped["salt"]) == (first["id"], first["salt"])
    _simulate(client, url, range(0, 1200), indifferent, seed=2)  # returning users and new ones
    analysis = _evaluate(app)
    assert [p["share"] for p in analysis.phases][-2:] == [0.1, 0.5]
    assert not analysis.srm["mismatch"], analysis.srm
    assert analysis.assignment["users_in_both_arms"] > 100  # the movers, counted by first assignment
    assert analysis.action not in ("promote", "roll_back")


def test_an_aa_rollout_reaches_no_verdict(proxy, client, admin_headers, arms):
    url, app = proxy
    control, _candidate = arms
    # A/A: the candidate arm is the control server itself.
    _put(client, url, admin_headers, {"candidate": {"base_url": control, "model": "control-model"},
                                      "rollout": {"steps": [0.1, 0.5], "min_users_per_step": 400,
                                                  "min_hours_per_step": 0}})
    seen = []
    for batch in range(4):
        _simulate(client, url, range(500 * batch, 500 * (batch + 1)), indifferent, seed=batch)
        analysis = _evaluate(app)
        seen.append((analysis.action, analysis.decision.get("rollout", {}).get("did")))
    assert all(action not in ("promote", "roll_back") for action, _ in seen), seen
    assert ("keep_running", "advanced") in seen or any(did == "advanced" for _, did in seen), seen
    running = client.get(f"{url}/api/v1/admin/experiment", headers=admin_headers).json()
    assert running["candidate_share"] == 0.5 and running["status"] == "running"


def test_a_better_candidate_is_promoted_by_the_rollout_and_then_serves_everyone(proxy, client, admin_headers,
                                                                                 arms):
    url, app = proxy
    _control, candidate = arms
    started = _put(client, url, admin_headers, {"candidate": {"base_url": candidate, "model": "candidate-model"},
                                                "rollout": {"steps": [0.2, 0.5], "min_users_per_step": 300,
                                                            "min_hours_per_step": 0}})
    assert started["candidate_share"] == 0.2 and started["rollout"]["step"] == 0
    actions = []
    for batch in range(8):
        _simulate(client, url, range(600 * batch, 600 * (batch + 1)), likes_candidate_answers, seed=batch)
        analysis = _evaluate(app)
        actions.append(analysis.decision.get("rollout", {}).get("did"))
        if actions[-1] == "promoted":
            break
    assert actions[-1] == "promoted", actions
    assert "advanced" in actions
    assert experiments.get(app.state.abloop.db, started["id"]).status == "promoted"
    now = client.get(f"{url}/api/v1/admin/experiment", headers=admin_headers).json()
    assert now["arms"]["control"]["model"] == "candidate-model" and now["arms"]["candidate"] is None
    served = _simulate(client, url, range(0, 200), indifferent, seed=99)
    assert served == {"candidate-model": 200}


def test_ratings_alone_roll_back_a_worse_candidate_and_control_serves_everyone(proxy, client, admin_headers, arms):
    url, app = proxy
    _control, candidate = arms
    started = _put(client, url, admin_headers, {"candidate": {"base_url": candidate, "model": "candidate-model"},
                                                "rollout": {"steps": [0.5], "min_users_per_step": 0,
                                                            "min_hours_per_step": 0}})
    did = None
    for batch in range(6):
        _simulate(client, url, range(400 * batch, 400 * (batch + 1)), rates_candidate_answers_lower, seed=batch)
        did = _evaluate(app).decision.get("rollout", {}).get("did")
        if did == "rolled_back":
            break
    assert did == "rolled_back"
    ended = experiments.get(app.state.abloop.db, started["id"])
    assert ended.status == "rolled_back" and "worse" in ended.decision["reason"]
    assert _simulate(client, url, range(0, 200), indifferent, seed=98) == {"control-model": 200}

    again = client.post(f"{url}/api/v1/admin/rollback", json={"experiment_id": started["id"]}, headers=admin_headers)
    assert again.status_code == 409 and "rolled_back" in again.json()["detail"]
    unknown = client.post(f"{url}/api/v1/admin/rollback", json={"experiment_id": "nope"}, headers=admin_headers)
    assert unknown.status_code == 404


def test_rollback_through_the_api_and_the_cli(proxy, client, admin_headers, arms, monkeypatch):
    url, app = proxy
    _control, candidate = arms
    started = _put(client, url, admin_headers, {"candidate": {"base_url": candidate, "model": "candidate-model"},
                                                "candidate_share": 1.0})
    assert _simulate(client, url, range(0, 20), indifferent, seed=3) == {"candidate-model": 20}
    rolled = client.post(f"{url}/api/v1/admin/rollback", json={"experiment_id": started["id"], "reason": "on call"},
                         headers=admin_headers)
    assert rolled.status_code == 200 and rolled.json()["id"] != started["id"]
    assert _simulate(client, url, range(0, 20), indifferent, seed=4) == {"control-model": 20}
    [*_, last] = experiments.list_events(app.state.abloop.db, started["id"])
    assert (last.kind, last.reason) == ("rolled_back", "on call")

    monkeypatch.setenv("DATABASE_URL", app.state.abloop.settings.database_url)
    with pytest.raises(SystemExit) as refused:
        main(["rollback", "--experiment", started["id"]])
    assert "not rolled back" in str(refused.value.code) and "rolled_back" in str(refused.value.code)


@pytest.mark.parametrize("body", [
    {"rollout": {"steps": [0.5, 0.2]}},
    {"rollout": {"steps": []}},
    {"rollout": {"steps": [0.1]}, "candidate_share": 0.3},
    {"primary_metric": "clicks", "candidate": {"base_url": "http://x.test/v1", "model": "m"}},
])
def test_bad_rollout_bodies_are_422_naming_the_field(proxy, client, admin_headers, body):
    url, _app = proxy
    response = client.put(f"{url}/api/v1/admin/experiment", json=body, headers=admin_headers)
    assert response.status_code == 422, response.text
    text = response.text
    assert any(field in text for field in ("steps", "candidate_share", "primary_metric")), text
