"""Rules admin API through the real proxy app: listing by status, one decision per rule."""

from __future__ import annotations

import pytest

from store import rules
from tests.proxy.conftest import make_settings, running_proxy

ROUTES = [("GET", "/api/v1/rules"), ("POST", "/api/v1/rules/x/approve"), ("POST", "/api/v1/rules/x/reject")]


@pytest.fixture
def proxy(tmp_path, control_upstream):
    with running_proxy(make_settings(tmp_path, llm_api_base=control_upstream[1])) as (url, app):
        rules.propose(app.state.abloop.db, [("banned_phrase", "As an AI,", ["f2", "f1"]),
                                            ("instruction", 'Begin every answer with "Answer:".', ["f1"])])
        yield url, app


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_rule_routes_need_the_admin_token(proxy, client, method, path):
    url, _ = proxy
    missing = client.request(method, url + path)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert client.request(method, url + path, headers={"Authorization": "Bearer wrong"}).status_code == 403


def test_rules_are_approved_or_rejected_once(proxy, client, admin_headers):
    url, _ = proxy
    listed = client.get(f"{url}/api/v1/rules?status=proposed", headers=admin_headers).json()
    assert listed["count"] == 2
    by_kind = {r["kind"]: r for r in listed["rules"]}
    assert (by_kind["banned_phrase"]["feedback_ids"], by_kind["banned_phrase"]["support"]) == (["f1", "f2"], 2)

    approved = client.post(f"{url}/api/v1/rules/{by_kind['banned_phrase']['id']}/approve", headers=admin_headers)
    assert approved.status_code == 200 and approved.json()["status"] == "approved" and approved.json()["decided_at"]
    rejected = client.post(f"{url}/api/v1/rules/{by_kind['instruction']['id']}/reject", headers=admin_headers)
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"

    again = client.post(f"{url}/api/v1/rules/{by_kind['banned_phrase']['id']}/reject", headers=admin_headers)
    assert again.status_code == 409 and "already approved" in again.json()["detail"]
    unknown = client.post(f"{url}/api/v1/rules/no-such-rule/approve", headers=admin_headers)
    assert unknown.status_code == 404 and "no-such-rule" in unknown.json()["detail"]

    assert client.get(f"{url}/api/v1/rules?status=proposed", headers=admin_headers).json()["count"] == 0
    assert [r["text"] for r in client.get(f"{url}/api/v1/rules?status=approved", headers=admin_headers)
            .json()["rules"]] == ["As an AI,"]
    assert client.get(f"{url}/api/v1/rules", headers=admin_headers).json()["count"] == 2


def test_an_unknown_status_is_a_422_naming_it(proxy, client, admin_headers):
    url, _ = proxy
    response = client.get(f"{url}/api/v1/rules?status=maybe", headers=admin_headers)
    assert response.status_code == 422 and "status" in response.json()["message"]
    too_long = client.post(f"{url}/api/v1/rules/{'x' * 65}/approve", headers=admin_headers)
    assert too_long.status_code == 422 and "rule_id" in too_long.json()["message"]
