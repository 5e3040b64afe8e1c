"""Admin endpoints: bearer auth, experiment changes, promotion, URL ingestion refusals."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from experiment import lifecycle
from store import experiments
from store.db import Database
from tests.proxy.conftest import ADMIN_TOKEN, fake_web, make_settings, running_proxy

ADMIN_ROUTES = [
    ("GET", "/api/v1/admin/experiment", None),
    ("PUT", "/api/v1/admin/experiment", {"candidate_share": 0.5}),
    ("POST", "/api/v1/admin/promote", {"experiment_id": "x"}),
    ("POST", "/api/v1/process_url", {"url": "https://example.com/"}),
    ("POST", "/api/v1/admin/reload-index", None),
]


@pytest.fixture
def proxy(tmp_path, control_upstream):
    with running_proxy(make_settings(tmp_path, llm_api_base=control_upstream[1])) as (url, app):
        yield url, app


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_admin_routes_refuse_missing_and_wrong_tokens(proxy, client, method, path, body):
    url, _ = proxy
    missing = client.request(method, url + path, json=body)
    wrong = client.request(method, url + path, json=body, headers={"Authorization": "Bearer not-it"})
    not_bearer = client.request(method, url + path, json=body, headers={"Authorization": f"Basic {ADMIN_TOKEN}"})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["detail"] == "missing bearer token in the Authorization header"
    assert (wrong.status_code, wrong.json()["detail"]) == (403, "wrong admin token")
    assert not_bearer.status_code == 401


PUBLIC_OPERATIONS = {("POST", "/api/v1/search"), ("POST", "/api/v1/feedback"), ("GET", "/healthz"),
                     ("GET", "/readyz"), ("GET", "/metrics")}


def test_every_operation_but_search_feedback_and_health_needs_the_token(proxy, client):
    """Read from the app's own OpenAPI document, so a route added later without the admin dependency fails here."""
    url, _ = proxy
    document = client.get(url + "/openapi.json").json()
    operations = [(method.upper(), path) for path, item in document["paths"].items() for method in item]
    assert set(operations) >= PUBLIC_OPERATIONS and len(operations) > len(PUBLIC_OPERATIONS) + len(ADMIN_ROUTES)
    for method, path in sorted(set(operations) - PUBLIC_OPERATIONS):
        concrete = path.replace("{template_id}", "no-such-template").replace("{rule_id}", "no-such-rule")
        missing = client.request(method, url + concrete, json={})
        wrong = client.request(method, url + concrete, json={}, headers={"Authorization": "Bearer not-it"})
        assert (missing.status_code, wrong.status_code) == (401, 403), (method, path)
        assert "{" not in concrete


def test_admin_routes_are_disabled_without_admin_token(tmp_path, client, control_upstream):
    settings = make_settings(tmp_path, llm_api_base=control_upstream[1], admin_token=None)
    with running_proxy(settings) as (url, _app):
        for method, path, body in ADMIN_ROUTES:
            response = client.request(method, url + path, json=body, headers={"Authorization": "Bearer anything"})
            assert response.status_code == 403
            assert response.json()["detail"] == "admin endpoints are disabled: ADMIN_TOKEN is not set"


def test_experiment_view_and_new_candidate_starts_a_new_experiment(proxy, client, admin_headers, candidate_upstream):
    url, _app = proxy
    first = client.get(f"{url}/api/v1/admin/experiment", headers=admin_headers).json()
    assert set(first) >= {"id", "arms", "candidate_share", "salt", "started_at"}
    assert first["arms"]["candidate"] is None and first["arms"]["control"]["model"]

    shared = client.put(f"{url}/api/v1/admin/experiment", json={"candidate_share": 0.25}, headers=admin_headers).json()
    assert shared["id"] == first["id"] and shared["salt"] == first["salt"] and shared["candidate_share"] == 0.25

    new = client.put(
        f"{url}/api/v1/admin/experiment",
        json={"candidate": {"base_url": candidate_upstream[1], "model": "candidate-model"}, "candidate_share": 1.0},
        headers=admin_headers,
    ).json()
    assert new["id"] != first["id"] and new["salt"] != first["salt"]
    assert new["arms"]["candidate"]["model"] == "candidate-model" and new["candidate_share"] == 1.0
    served = client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": "bob"}).json()
    assert served["arm"] == "candidate" and served["answer"] == "candidate says hi"


def test_the_view_shows_each_arms_adapter_and_the_recorded_decision(proxy, client, admin_headers,
                                                                    candidate_upstream):
    import experiment

    url, app = proxy
    started = client.put(f"{url}/api/v1/admin/experiment", headers=admin_headers, json={
        "candidate": {"base_url": candidate_upstream[1], "model": "candidate-model", "adapter_id": "lora-v2"},
        "candidate_share": 0.5}).json()
    assert started["arms"]["candidate"]["adapter_id"] == "lora-v2" and started["arms"]["control"]["adapter_id"] is None
    assert started["decision"] is None and started["ended_at"] is None
    analysis = experiment.evaluate(app.state.abloop.db, started["id"])  # no traffic yet: nothing to decide
    viewed = client.get(f"{url}/api/v1/admin/experiment", headers=admin_headers).json()
    assert viewed["id"] == started["id"]
    assert {key: viewed["decision"][key] for key in ("action", "reason")} == {
        "action": analysis.decision["action"], "reason": analysis.decision["reason"]}
    promoted = client.post(f"{url}/api/v1/admin/promote", headers=admin_headers,
                           json={"experiment_id": started["id"], "force": True}).json()
    assert promoted["arms"]["control"]["adapter_id"] == "lora-v2" and promoted["arms"]["candidate"] is None


def test_a_new_candidate_mid_rollout_starts_the_plan_over(proxy, client, admin_headers, candidate_upstream):
    """PUT with a candidate alone while a rollout ramps: the new one starts at the plan's first step, plan and
    all; it used to take over the ramped share with no plan."""
    from store.models import Experiment

    url, app = proxy
    arm = {"base_url": candidate_upstream[1], "model": "candidate-model"}
    plan = {"steps": [0.1, 0.5], "min_users_per_step": 300, "min_hours_per_step": 0.0, "auto_promote": True}
    first = client.put(f"{url}/api/v1/admin/experiment", headers=admin_headers,
                       json={"candidate": arm, "rollout": plan}).json()
    with app.state.abloop.db.session() as session:  # its evaluations have ramped it to the last step
        ramped = session.get(Experiment, first["id"])
        ramped.candidate_share, ramped.rollout = 0.5, dict(plan, step=1)
    new = client.put(f"{url}/api/v1/admin/experiment", headers=admin_headers,
                     json={"candidate": dict(arm, model="candidate-model-v2")})
    assert new.status_code == 200, new.text
    assert new.json()["id"] != first["id"]
    assert (new.json()["candidate_share"], new.json()["rollout"]) == (0.1, dict(plan, step=0))


@pytest.mark.parametrize(
    ("body", "field"),
    [({}, "candidate_share"), ({"candidate_share": 1.5}, "candidate_share"),
     ({"candidate": {"base_url": "not a url", "model": "m"}}, "base_url")],
)
def test_experiment_update_validation(proxy, client, admin_headers, body, field):
    url, _ = proxy
    response = client.put(f"{url}/api/v1/admin/experiment", json=body, headers=admin_headers)
    assert response.status_code == 422 and field in response.json()["message"]


def test_promote_needs_a_decision_or_force(proxy, client, admin_headers, candidate_upstream):
    url, app = proxy
    experiment = client.put(
        f"{url}/api/v1/admin/experiment",
        json={"candidate": {"base_url": candidate_upstream[1], "model": "candidate-model"}, "candidate_share": 0.5},
        headers=admin_headers,
    ).json()
    unknown = client.post(f"{url}/api/v1/admin/promote", json={"experiment_id": "missing"}, headers=admin_headers)
    undecided = client.post(f"{url}/api/v1/admin/promote", json={"experiment_id": experiment["id"]},
                            headers=admin_headers)
    forced = client.post(f"{url}/api/v1/admin/promote", json={"experiment_id": experiment["id"], "force": True},
                         headers=admin_headers)
    again = client.post(f"{url}/api/v1/admin/promote", json={"experiment_id": experiment["id"], "force": True},
                        headers=admin_headers)
    assert (unknown.status_code, unknown.json()["detail"]) == (404, "unknown experiment_id 'missing'")
    assert undecided.status_code == 409 and "abloop evaluate" in undecided.json()["detail"]
    assert forced.status_code == 200
    after = forced.json()
    assert after["arms"]["control"]["model"] == "candidate-model"
    assert after["arms"]["candidate"] is None and after["candidate_share"] == 0.0
    assert again.status_code == 409
    old = experiments.get(app.state.abloop.db, experiment["id"])
    assert old.status == "promoted" and old.decision["forced"] is True and old.decision["via"] == "admin-api"
    served = client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": "bob"}).json()
    assert served["arm"] == "control" and served["answer"] == "candidate says hi"


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1/",
        "http://127.0.0.1:8000/api/v1/admin/experiment",
        "http://localhost/",
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::ffff:127.0.0.1]/",
        "file:///etc/passwd",
        "ftp://example.com/file",
        "gopher://127.0.0.1:25/",
        "http://a..b.example/",  # not a host name: the resolver's IDNA codec raised, a 500 before
        f"http://{'a' * 64}.example/",
    ],
)
def test_process_url_refuses_unsafe_targets(proxy, client, admin_headers, target):
    url, _ = proxy
    response = client.post(f"{url}/api/v1/process_url", json={"url": target}, headers=admin_headers)
    assert response.status_code == 400, response.text
    assert "refused" in response.json()["detail"]


def test_process_url_refuses_a_redirect_to_a_private_address(tmp_path, client, admin_headers, control_upstream):
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        return httpx.Response(302, headers={"location": "http://intranet.example/secrets"})

    async def resolver(host: str, _port: int) -> list[str]:
        return {"public.example": ["93.184.216.34"], "intranet.example": ["10.1.2.3"]}[host]

    settings = make_settings(tmp_path, llm_api_base=control_upstream[1])
    with running_proxy(settings, dependency_overrides=fake_web(httpx.MockTransport(handler), resolver)) as (url, _):
        response = client.post(f"{url}/api/v1/process_url", json={"url": "http://public.example/page"},
                               headers=admin_headers)
    assert response.status_code == 400
    assert "10.1.2.3" in response.json()["detail"]
    assert len(asked) == 1 and "93.184.216.34" in asked[0]


def test_process_url_fetches_within_ingest_max_bytes_and_ingest_timeout_s(tmp_path, client, admin_headers,
                                                                           control_upstream):
    async def pages(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/slow":
            await asyncio.sleep(5)
        if request.url.path == "/big":
            return httpx.Response(200, text="x" * 2000, headers={"content-type": "text/plain"})
        return httpx.Response(200, text="<html><body></body></html>", headers={"content-type": "text/html"})

    settings = make_settings(tmp_path, llm_api_base=control_upstream[1], ingest_max_bytes=1000, ingest_timeout_s=0.2)
    with running_proxy(settings, dependency_overrides=fake_web(httpx.MockTransport(pages))) as (url, _):
        answers = {path: client.post(f"{url}/api/v1/process_url", json={"url": f"https://docs.example/{path}"},
                                     headers=admin_headers) for path in ("big", "slow", "empty")}
    details = {path: (answer.status_code, answer.json()["detail"]) for path, answer in answers.items()}
    assert details == {
        "big": (502, "url could not be fetched: https://docs.example/big is too large (2000 bytes > 1000)"),
        "slow": (502, "url could not be fetched: timed out after 0.2s fetching https://docs.example/slow"),
        "empty": (422, "url: the page has no extractable text"),
    }


def test_process_url_validation(proxy, client, admin_headers):
    url, _ = proxy
    response = client.post(f"{url}/api/v1/process_url", json={"link": "x"}, headers=admin_headers)
    assert response.status_code == 422 and "url" in response.json()["message"]


def test_a_change_made_by_another_process_reaches_a_running_proxy(tmp_path, client, control_upstream,
                                                                  candidate_upstream):
    """Flows (evaluate_arms, promote) change the experiment in the store, not through this proxy: its refresh
    loop picks the change up within experiment_refresh_s (0.3 s here)."""
    settings = make_settings(tmp_path, llm_api_base=control_upstream[1])
    with running_proxy(settings) as (url, _app):
        assert client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": "ann"}).json()["arm"] == "control"
        elsewhere = Database(settings.database_url)  # a flow's own connection to the store
        try:
            lifecycle.start_candidate(elsewhere, base_url=candidate_upstream[1], model="candidate-model", share=1.0)
        finally:
            elsewhere.dispose()
        deadline, arm, n = time.monotonic() + 15, "control", 0
        while arm == "control" and time.monotonic() < deadline:
            time.sleep(0.1)
            n += 1  # a new user each time (share 1.0 sends every one to the candidate), clear of the rate limit
            served = client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": f"user-{n}"})
            assert served.status_code == 200, served.text
            arm = served.json()["arm"]
    assert arm == "candidate"
