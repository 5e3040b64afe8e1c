"""The OpenAPI document lists the statuses DESIGN's HTTP contract gives each endpoint, with their bodies."""

from __future__ import annotations

import pytest

from proxy.app import create_app
from store.config import Settings

ADMIN = {"401", "403"}
# DESIGN.md, "The HTTP contract": what each operation may answer besides its success.
CONTRACT = {
    ("post", "/api/v1/search"): {"200", "413", "422", "429", "502", "504"},
    ("post", "/api/v1/feedback"): {"201", "404", "413", "422", "429"},
    ("get", "/api/v1/admin/experiment"): {"200"} | ADMIN,
    ("put", "/api/v1/admin/experiment"): {"200", "409", "413", "422"} | ADMIN,
    ("post", "/api/v1/admin/promote"): {"200", "404", "409", "413", "422"} | ADMIN,
    ("post", "/api/v1/admin/rollback"): {"200", "404", "409", "413", "422"} | ADMIN,
    ("post", "/api/v1/process_url"): {"200", "400", "413", "422", "502"} | ADMIN,
    ("post", "/api/v1/admin/reload-index"): {"200", "409"} | ADMIN,
    ("get", "/api/v1/prompts/templates"): {"200"} | ADMIN,
    ("get", "/api/v1/prompts/templates/{template_id}"): {"200", "404", "422"} | ADMIN,
    ("get", "/api/v1/prompts/templates/{template_id}/tuning-candidates"): {"200", "404", "422"} | ADMIN,
    ("post", "/api/v1/prompts/templates/{template_id}/auto-tune"): {"200", "201", "404", "413", "422"} | ADMIN,
    ("post", "/api/v1/prompts/templates/auto-tune-all"): {"200", "413", "422"} | ADMIN,
    ("get", "/api/v1/rules"): {"200", "422"} | ADMIN,
    ("post", "/api/v1/rules/{rule_id}/approve"): {"200", "404", "409", "422"} | ADMIN,
    ("post", "/api/v1/rules/{rule_id}/reject"): {"200", "404", "409", "422"} | ADMIN,
    ("get", "/healthz"): {"200"},
    ("get", "/readyz"): {"200", "503"},
    ("get", "/metrics"): {"200"},
}


@pytest.fixture(scope="module")
def spec() -> dict:
    return create_app(Settings(admin_token="t")).openapi()


def _operations(spec: dict) -> dict[tuple[str, str], dict]:
    return {(method, path): op for path, ops in spec["paths"].items() for method, op in ops.items()}


def test_every_operation_is_in_the_contract(spec):
    assert set(_operations(spec)) == set(CONTRACT)


@pytest.mark.parametrize(("method", "path"), sorted(CONTRACT))
def test_each_operation_lists_its_statuses(spec, method, path):
    responses = _operations(spec)[(method, path)]["responses"]
    assert CONTRACT[(method, path)] <= set(responses), sorted(responses)


def test_errors_share_one_body_that_names_the_problem(spec):
    error_body = spec["components"]["schemas"]["ErrorBody"]
    assert set(error_body["properties"]) == {"message", "detail"}
    for (method, path), operation in _operations(spec).items():
        for code, response in operation["responses"].items():
            if code.startswith(("4", "5")) and path != "/readyz":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's 422 body is not what we send


def test_429_and_503_document_retry_after(spec):
    operations = _operations(spec)
    for key in (("post", "/api/v1/search"), ("post", "/api/v1/feedback")):
        assert "Retry-After" in operations[key]["responses"]["429"]["headers"]
    assert "Retry-After" in operations[("post", "/api/v1/feedback")]["responses"]["503"]["headers"]


def test_metrics_are_declared_as_plain_text(spec):
    content = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"text/plain"}


def test_each_error_status_is_described_in_words_of_its_own(spec):
    from proxy.schemas import _ERROR_DESCRIPTIONS

    search = _operations(spec)[("post", "/api/v1/search")]["responses"]
    assert search["422"]["description"] == "Invalid input; `message` names each bad field"
    assert search["504"]["description"] == "Every arm timed out"
    for (method, path), operation in _operations(spec).items():
        for code, response in operation["responses"].items():
            if code.isdigit() and int(code) in _ERROR_DESCRIPTIONS and path != "/readyz":
                assert response["description"] == _ERROR_DESCRIPTIONS[int(code)], (method, path, code)
            if code in ("429", "503") and path != "/readyz":
                assert response["headers"]["Retry-After"]["schema"] == {"type": "string"}, (method, path, code)
