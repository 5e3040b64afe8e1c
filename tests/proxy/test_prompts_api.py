"""Prompt template admin API, and a template version as the candidate arm, through the real proxy app."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from store import prompts
from store.db import Database
from store.models import SearchEvent
from tests.proxy.conftest import make_settings, running_proxy
from tests.proxy.test_search_api import _events

ROUTES = [
    ("GET", "/api/v1/prompts/templates", None),
    ("GET", "/api/v1/prompts/templates/x", None),
    ("GET", "/api/v1/prompts/templates/x/tuning-candidates", None),
    ("POST", "/api/v1/prompts/templates/x/auto-tune", {"dry_run": True}),
    ("POST", "/api/v1/prompts/templates/auto-tune-all", None),
]


class RecordingUpstream:
    """An OpenAI-compatible upstream (httpx.MockTransport) that answers and keeps every request body."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.transport = httpx.MockTransport(self._answer)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        return httpx.Response(200, json={"model": body["model"], "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                                         "choices": [{"message": {"role": "assistant", "content": "use sorted()"}}]})


@pytest.fixture
def upstream() -> RecordingUpstream:
    return RecordingUpstream()


@pytest.fixture
def proxy(tmp_path, upstream):
    settings = make_settings(tmp_path, llm_api_base="http://control.test/v1", llm_model="control-model")
    with running_proxy(settings, upstream=upstream.transport) as (url, app):
        yield url, app


def _db(app) -> Database:
    return app.state.abloop.db


def _rate(client: httpx.Client, url: str, query: str, user_id: str, **feedback) -> str:
    found = client.post(f"{url}/api/v1/search", json={"query": query, "user_id": user_id})
    assert found.status_code == 200, found.text
    given = client.post(f"{url}/api/v1/feedback", json={"request_id": found.json()["request_id"], **feedback})
    assert given.status_code == 201, given.text
    return found.json()["request_id"]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_prompt_routes_need_the_admin_token(proxy, client, method, path, body):
    url, _ = proxy
    assert client.request(method, url + path, json=body).status_code == 401
    assert client.request(method, url + path, json=body, headers={"Authorization": "Bearer no"}).status_code == 403


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("GET", "/tuning-candidates?min_rating=0", None, "min_rating"),
        ("GET", "/tuning-candidates?min_rating=6", None, "min_rating"),
        ("GET", "/tuning-candidates?days=0", None, "days"),
        ("POST", "/auto-tune", {"max_examples": 0}, "max_examples"),
        ("POST", "/auto-tune", {"max_examples": 51}, "max_examples"),
        ("POST", "/auto-tune", {"min_rating": 9}, "min_rating"),
        ("POST", "/auto-tune", {"dry_run": "perhaps"}, "dry_run"),
        ("POST", "/auto-tune", {"max_exampels": 3}, "max_exampels"),
        # Strict like every other body: a value of another JSON type is refused, not coerced.
        ("POST", "/auto-tune", {"max_examples": "5"}, "max_examples"),
        ("POST", "/auto-tune", {"max_examples": 2.5}, "max_examples"),
        ("POST", "/auto-tune", {"dry_run": "yes"}, "dry_run"),
        ("POST", "/auto-tune", {"dry_run": 1}, "dry_run"),
        ("POST", "/auto-tune", {"activate": "false"}, "activate"),
        ("POST", "/auto-tune", {"min_rating": "4"}, "min_rating"),
        ("POST", "/auto-tune", {"days": "7"}, "days"),
        ("POST", "/auto-tune", {"similarity": "0.9"}, "similarity"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(proxy, client, admin_headers, method, path, body, field):
    url, _ = proxy
    template = client.get(f"{url}/api/v1/prompts/templates", headers=admin_headers).json()["templates"][0]
    response = client.request(method, f"{url}/api/v1/prompts/templates/{template['id']}{path}", json=body,
                              headers=admin_headers)
    assert response.status_code == 422 and field in response.json()["message"]


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b'{"max_examples": "5"}', "max_examples"),
        (b'{"dry_run": "yes"}', "dry_run"),
        (b'{"max_exampels": 3}', "max_exampels"),
        (b'{"max_examples": 0}', "max_examples"),
        (b'{"days": NaN}', "days"),
        (b'{"similarity": Infinity}', "similarity"),
    ],
)
def test_auto_tune_bodies_are_strict_on_both_routes(proxy, client, admin_headers, content, field):
    url, _ = proxy
    template = client.get(f"{url}/api/v1/prompts/templates", headers=admin_headers).json()["templates"][0]
    headers = {**admin_headers, "Content-Type": "application/json"}
    for path in (f"/templates/{template['id']}/auto-tune", "/templates/auto-tune-all"):
        response = client.post(f"{url}/api/v1/prompts{path}", content=content, headers=headers)
        assert response.status_code == 422, (path, response.text)
        assert field in response.json()["message"], (path, response.text)


def test_auto_tune_without_a_body_uses_the_defaults(proxy, client, admin_headers):
    url, app = proxy
    _rate(client, url, "How do I sort a list in Python?", "alice", rating=5)
    _events(app)
    v1 = prompts.active(_db(app))
    base = f"{url}/api/v1/prompts/templates/{v1.id}/auto-tune"
    # Like auto-tune-all: no body at all means {} (dry_run false, max_examples 5, ...), and so writes.
    written = client.post(base, headers=admin_headers)
    assert written.status_code == 201, written.text
    assert (written.json()["dry_run"], written.json()["created"]["version"]) == (False, 2)
    assert written.json()["counts"]["selected"] == 1
    again = client.post(f"{url}/api/v1/prompts/templates/{written.json()['created']['id']}/auto-tune",
                        json={"dry_run": True, "max_examples": 5.0}, headers=admin_headers)  # 5.0: an integer
    assert again.status_code == 200 and again.json()["changed"] is False, again.text


def test_templates_are_listed_newest_first_with_counts_and_unknown_ids_are_404(proxy, client, admin_headers):
    url, app = proxy
    _rate(client, url, "how do I sort a list?", "alice", rating=5)
    _events(app)  # flushed
    rules = [{"kind": "banned_phrase", "text": "As an AI,"}]
    v2 = prompts.new_version(_db(app), system_prompt="Be brief.", template="{question}",
                             few_shot=[{"question": "q", "answer": "a"}], output_rules=rules, activate=False)
    listed = client.get(f"{url}/api/v1/prompts/templates", headers=admin_headers).json()
    assert listed["count"] == 2
    assert [(t["version"], t["active"]) for t in listed["templates"]] == [(2, False), (1, True)]
    assert listed["templates"][1]["counts"] == {"events": 1, "feedback": 1, "few_shot": 0, "output_rules": 0}
    assert "system_prompt" not in listed["templates"][0]  # a summary; the version itself has it
    one = client.get(f"{url}/api/v1/prompts/templates/{v2.id}", headers=admin_headers).json()
    assert (one["system_prompt"], one["counts"]["few_shot"], one["counts"]["output_rules"]) == ("Be brief.", 1, 1)
    assert one["few_shot"] == [{"question": "q", "answer": "a"}] and one["output_rules"] == rules
    for path in ("", "/tuning-candidates"):
        missing = client.get(f"{url}/api/v1/prompts/templates/nope{path}", headers=admin_headers)
        assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    missing = client.post(f"{url}/api/v1/prompts/templates/nope/auto-tune", json={}, headers=admin_headers)
    assert missing.status_code == 404


def test_auto_tune_previews_then_writes_a_new_version_from_rated_answers(proxy, client, admin_headers):
    url, app = proxy
    sort = _rate(client, url, "How do I sort a list in Python?", "alice", rating=5)
    _rate(client, url, "How can I sort a list in Python?", "bob", rating=4)  # a near-duplicate, rated lower
    _rate(client, url, "How do I read a file line by line?", "carol", thumbs="up")
    _rate(client, url, "What is a frozenset?", "dave", thumbs="down")
    _events(app)
    v1 = prompts.active(_db(app))
    base = f"{url}/api/v1/prompts/templates/{v1.id}"

    candidates = client.get(f"{base}/tuning-candidates?min_rating=4&max_examples=5", headers=admin_headers).json()
    seen = {c["question"]: c for c in candidates["candidates"]}
    assert set(seen) == {"How do I sort a list in Python?", "How can I sort a list in Python?",
                         "How do I read a file line by line?"}
    assert seen["How can I sort a list in Python?"]["duplicate"] is True
    best = seen["How do I sort a list in Python?"]
    assert (best["selected"], best["rating"], best["simulated"]) == (True, 5, False)

    preview = client.post(f"{base}/auto-tune", json={"dry_run": True, "max_examples": 1}, headers=admin_headers)
    assert preview.status_code == 200 and preview.json()["created"] is None
    assert [e["event_id"] for e in preview.json()["preview"]["few_shot"]] == [sort]
    assert prompts.active(_db(app)).id == v1.id

    written = client.post(f"{base}/auto-tune", json={"dry_run": False, "max_examples": 5}, headers=admin_headers)
    assert written.status_code == 201, written.text
    created = written.json()["created"]
    assert (created["version"], created["active"]) == (2, True)
    assert created["counts"] == {"events": 0, "feedback": 0, "few_shot": 2, "output_rules": 0}  # nothing served yet
    assert written.json()["counts"] == {"candidates": 3, "duplicates": 1, "selected": 2, "simulated_selected": 0,
                                        "few_shot": 2, "output_rules": 0}
    # This replica serves the new version at once: the few-shot turns are in the next prompt.
    next_id = client.post(f"{url}/api/v1/search", json={"query": "what is a tuple?", "user_id": "erin"}).json()
    [served] = [e for e in _events(app) if e.id == next_id["request_id"]]
    assert served.prompt_template_id == created["id"]
    assert served.messages[1] == {"role": "user", "content": "How do I sort a list in Python?"}

    results = client.post(f"{url}/api/v1/prompts/templates/auto-tune-all", headers=admin_headers).json()["results"]
    assert [(r["template_id"], r["changed"], r["created"]) for r in results] == [(created["id"], False, None)]


def test_auto_tune_applies_each_option_it_is_given(proxy, client, admin_headers):
    url, app = proxy
    _rate(client, url, "How do I sort a list in Python?", "alice", rating=5)
    _rate(client, url, "How can I sort a list in Python?", "bob", rating=4)  # cosine 0.997 to the first
    old = _rate(client, url, "How do I read a file line by line?", "carol", rating=5)
    _events(app)
    with _db(app).session() as session:  # the file question was asked ten days ago
        session.get(SearchEvent, old).ts = datetime.now(UTC) - timedelta(days=10)
    v1 = prompts.active(_db(app))

    def counts(**options) -> dict[str, int]:
        answer = client.post(f"{url}/api/v1/prompts/templates/{v1.id}/auto-tune", headers=admin_headers,
                             json={"dry_run": True, **options})
        assert answer.status_code == 200, answer.text
        return {key: answer.json()["counts"][key] for key in ("candidates", "duplicates")}

    assert counts() == {"candidates": 2, "duplicates": 1}  # the last 7 days, ratings of 4 and up, cosine 0.9
    assert counts(days=30) == {"candidates": 3, "duplicates": 1}
    assert counts(min_rating=5) == {"candidates": 1, "duplicates": 0}
    assert counts(similarity=0.999) == {"candidates": 2, "duplicates": 0}

    waiting = client.post(f"{url}/api/v1/prompts/templates/{v1.id}/auto-tune", headers=admin_headers,
                          json={"activate": False})
    assert waiting.status_code == 201 and waiting.json()["created"]["active"] is False
    assert prompts.active(_db(app)).id == v1.id  # written, not served: e.g. for a candidate arm


def test_a_template_version_is_the_candidate_arm_and_promotion_activates_it(proxy, client, admin_headers, upstream):
    url, app = proxy
    db = _db(app)
    active = prompts.active(db)
    candidate = prompts.new_version(db, system_prompt="Answer in one sentence.", template="Q: {question}",
                                    output_rules=[{"kind": "required_format", "text": "Answer: {answer}"}],
                                    activate=False)
    unknown = client.put(f"{url}/api/v1/admin/experiment", headers=admin_headers, json={
        "candidate": {"base_url": "http://control.test/v1", "model": "control-model", "prompt_template_id": "nope"}})
    assert unknown.status_code == 422 and "prompt_template_id" in unknown.json()["detail"]

    started = client.put(f"{url}/api/v1/admin/experiment", headers=admin_headers, json={
        "candidate": {"base_url": "http://control.test/v1", "model": "control-model",
                      "prompt_template_id": candidate.id},
        "candidate_share": 1.0})
    assert started.status_code == 200, started.text
    assert started.json()["arms"]["candidate"]["prompt_template_id"] == candidate.id

    on_candidate = client.post(f"{url}/api/v1/search", json={"query": "how do I sort?", "user_id": "alice"}).json()
    on_control = client.post(f"{url}/api/v1/search", json={"query": "how do I sort?"}).json()  # no user: control
    assert on_candidate["arm"] == "candidate" and on_candidate["answer"] == "Answer: use sorted()"
    assert on_control["arm"] == "control" and on_control["answer"] == "use sorted()"
    events = {e.id: e for e in _events(app)}
    cand, ctrl = events[on_candidate["request_id"]], events[on_control["request_id"]]
    assert (cand.prompt_template_id, cand.prompt_template_version) == (candidate.id, 2)
    assert cand.messages[0] == {"role": "system", "content": "Answer in one sentence."}
    assert cand.messages[-1]["content"] == "Q: how do I sort?" and cand.answer == "Answer: use sorted()"
    assert (ctrl.prompt_template_id, ctrl.messages[0]["content"]) == (active.id, active.system_prompt)
    # What the upstream received is what was logged.
    assert [b["messages"] for b in upstream.bodies[-2:]] == [cand.messages, ctrl.messages]

    promoted = client.post(f"{url}/api/v1/admin/promote", headers=admin_headers,
                           json={"experiment_id": started.json()["id"], "force": True})
    assert promoted.status_code == 200, promoted.text
    assert prompts.active(db).id == candidate.id  # control renders with the winning prompt from now on
    after = client.post(f"{url}/api/v1/search", json={"query": "and now?", "user_id": "bob"}).json()
    assert after["arm"] == "control" and after["answer"] == "Answer: use sorted()"
