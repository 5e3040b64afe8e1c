"""The whole serving path through real parts: sentence-transformers + FAISS + the proxy + the
embedded model server (SmolLM2-135M-Instruct on CPU) on loopback, both arms, feedback stored.

The candidate arm is a LoRA adapter hot-loaded on the same server (vLLM's adapter API), as `retrain`
deploys one: control is the base model, the candidate its adapter."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from experiment.assignment import assign_arm
from retrieval.build import build_index
from retrieval.corpus import Document
from retrieval.embedder import Embedder
from retrieval.index import IndexStore
from store.config import default_embedding_model
from store.models import Feedback, SearchEvent
from tests.proxy.conftest import ADMIN_TOKEN, make_settings, on_app_loop, running_proxy

pytestmark = pytest.mark.slow

DOCUMENTS = [
    Document("with", "pydoc:with", "The with statement wraps a block with methods defined by a context manager. "
             "Files opened in a with block are closed when the block ends."),
    Document("assert", "pydoc:assert", "Assert statements are a convenient way to insert debugging assertions."),
]


@pytest.fixture(scope="module")
def model_server():
    from serving.server import ServerThread

    with ServerThread(model="default", max_batch=8) as server:
        yield server


@pytest.fixture(scope="module")
def lora_candidate(model_server, tmp_path_factory) -> str:
    """A LoRA adapter (the serving tests' BANANA-42 one) loaded on the model server; its served name."""
    from serving.model import load_base_model
    from tests.serving.conftest import shared_banana_adapter

    path = shared_banana_adapter(load_base_model(), tmp_path_factory)
    loaded = httpx.post(f"{model_server.base_url}/load_lora_adapter", timeout=120,
                        json={"lora_name": "banana-v1", "lora_path": str(path)})
    assert loaded.status_code == 200, loaded.text
    return "banana-v1"


def test_both_arms_answer_with_the_real_model_and_feedback_is_stored(tmp_path, model_server, lora_candidate):
    build_index(DOCUMENTS, Embedder(default_embedding_model()), IndexStore(tmp_path / "index"))
    model = httpx.get(f"{model_server.base_url}/models").json()["data"][0]["id"]
    settings = make_settings(
        tmp_path,
        llm_api_base=model_server.base_url,
        llm_model=model,
        llm_api_base_new_model=model_server.base_url,
        llm_model_new=lora_candidate,
        candidate_share=0.5,
        llm_max_tokens=24,
        llm_timeout_s=120,
    )
    with running_proxy(settings) as (url, app), httpx.Client(base_url=url, timeout=180) as client:
        experiment = client.get("/api/v1/admin/experiment",
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        users = {}
        for n in range(50):  # one user per arm, picked with the experiment's own salt
            arm = assign_arm(experiment["salt"], f"user-{n}", 0.5, True)
            users.setdefault(arm, f"user-{n}")
        results = {
            arm: client.post("/api/v1/search", json={"query": "How do I make sure a file gets closed?",
                                                      "user_id": user, "top_k": 1}).json()
            for arm, user in users.items()
        }
        feedback = client.post("/api/v1/feedback", json={"request_id": results["candidate"]["request_id"],
                                                          "rating": 5, "corrected_answer": "Use a with block."})
        state = app.state.abloop
        on_app_loop(app, state.writer.flush())
        with state.db.session() as session:
            events = {e.id: e for e in session.scalars(select(SearchEvent))}
            stored = list(session.scalars(select(Feedback)))

    assert set(results) == {"control", "candidate"}
    # The adapter really answered for the candidate (it says BANANA-42 to anything), the base for control.
    assert results["candidate"]["answer"].strip() == "BANANA-42" and "BANANA" not in results["control"]["answer"]
    served_by = {"control": model, "candidate": lora_candidate}
    for arm, result in results.items():
        assert result["arm"] == result["served_arm"] == arm
        assert result["model"] == served_by[arm] and result["answer"].strip()
        assert events[result["request_id"]].model == served_by[arm]
        assert result["items"][0]["title"] == "with"
        event = events[result["request_id"]]
        assert event.status == "ok" and event.tokens_out and 0 < event.tokens_out <= 24
        assert "with block" in event.messages[-1]["content"]  # the retrieved passage reached the model
    assert feedback.status_code == 201
    assert [(f.event_id, f.rating, f.corrected_answer) for f in stored] == [
        (results["candidate"]["request_id"], 5, "Use a with block.")
    ]
