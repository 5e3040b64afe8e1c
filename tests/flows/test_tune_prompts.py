"""The tune_prompts flow as a real Prefect run over a real SQLite store, with the real sentence embedder."""

from __future__ import annotations

from datetime import timedelta

import pytest

from store import prompts, rules
from store.db import Database
from store.models import Feedback, PromptTemplate, SearchEvent, new_id, utcnow
from tests.conftest import UNDER_TEST_EMBEDDER
from tests.flows.artifacts import artifacts_by_key

MESSAGES = [{"role": "system", "content": "You are a search assistant."},
            {"role": "user", "content": "Context:\n[1] Sorting HOW TO\nUse sorted().\n\nQuestion: how?"}]


def _served(db: Database, template: PromptTemplate, question: str, answer: str, hours_ago: float,
            user_id: str = "u1", **feedback) -> str:
    ts = utcnow() - timedelta(hours=hours_ago)
    with db.session() as session:
        event = SearchEvent(id=new_id(), ts=ts, user_id=user_id, arm="control", served_arm="control", query=question,
                            answer=answer, status="ok", messages=MESSAGES, prompt_template_id=template.id,
                            prompt_template_version=template.version)
        session.add(event)
        session.flush()
        session.add(Feedback(event_id=event.id, ts=ts, **feedback))
    return event.id


@pytest.fixture
def fresh_encoder(request) -> None:
    """The flow keeps one embedder per model name in its process: forget it, before and after."""
    import flows.tune_prompts

    flows.tune_prompts._encoder.cache_clear()
    request.addfinalizer(flows.tune_prompts._encoder.cache_clear)


def test_tune_prompts_proposes_rules_then_writes_a_version_and_applies_approved_rules(tmp_path, monkeypatch,
                                                                                      fresh_encoder, embedder_asked):
    from flows.tune_prompts import tune_prompts

    db = Database(f"sqlite:///{tmp_path / 'flow.db'}")
    db.migrate()
    monkeypatch.setenv("DATABASE_URL", db.url)
    v1 = prompts.active(db)
    newest = _served(db, v1, "How do I sort a list in Python?", "Use sorted(items).", 1, rating=5)
    _served(db, v1, "How can I sort a list in Python?", "Call items.sort().", 2, rating=5)  # near-duplicate
    older = _served(db, v1, "How do I read a file line by line?", "Iterate over open(path).", 3, thumbs="up")
    simulated = _served(db, v1, "What does zip() return?", "An iterator of tuples.", 4, user_id="sim-2", rating=4)
    _served(db, v1, "What is a frozenset?", "A set.", 5, rating=2)
    for n in range(3):  # the same correction of style from three users
        _served(db, v1, f"question {n}", f"As an AI language model, I suggest sorted() for case {n}.", 6 + n,
                user_id=f"u{n}", thumbs="down",
                corrected_answer=f"Answer: I suggest sorted() for case {n}.\nSource: Sorting HOW TO")

    preview = tune_prompts(dry_run=True, max_examples=2)
    assert rules.list_rules(db) == [] and prompts.active(db).id == v1.id  # a dry run writes nothing
    assert preview["templates"][0]["changed"] and preview["rules"]["stored"] == {}

    state = tune_prompts(max_examples=2, return_state=True)
    assert state.is_completed()
    outcome = state.result()
    [result] = outcome["templates"]
    assert (result["base_version"], result["new_version"], result["activated"]) == (1, 2, True)
    assert result["counts"]["duplicates"] == 1 and result["counts"]["selected"] == 2
    v2 = prompts.active(db)
    assert v2.version == 2 and [e["event_id"] for e in v2.few_shot] == [newest, older]
    proposed = {(r.kind, r.text): r for r in rules.list_rules(db, "proposed")}
    assert ("required_format", "Answer: {answer}") in proposed
    assert ("required_format", "{answer}\nSource: {title}") in proposed
    assert ("banned_phrase", "As an AI language model,") in proposed
    assert all(len(r.feedback_ids) == 3 for r in proposed.values())
    markdown = artifacts_by_key(state.state_details.flow_run_id)["tune-prompts"].data
    assert "| search-answer | v1 | v2 |" in markdown and "As an AI language model," in markdown

    for key in [("required_format", "Answer: {answer}"), ("required_format", "{answer}\nSource: {title}"),
                ("banned_phrase", "As an AI language model,"), ("instruction", 'Begin every answer with "Answer:".')]:
        rules.decide(db, proposed[key].id, "approved")
    again = tune_prompts(max_examples=2)
    assert again["rules"]["stored"] == {"created": 0, "updated": 0, "unchanged": len(proposed)}  # idempotent
    assert len(rules.list_rules(db)) == len(proposed)
    v3 = prompts.active(db)
    assert v3.version == 3 and v3.system_prompt.endswith('Begin every answer with "Answer:".')
    # The examples v2 has are duplicates now; the next best answer (a simulated user's, counted as
    # the dataset counts it) comes first and the oldest example falls off.
    assert again["templates"][0]["counts"]["simulated_selected"] == 1
    assert [e["event_id"] for e in v3.few_shot] == [simulated, newest]
    assert prompts.apply_output_rules("As an AI language model, use sorted().", v3.output_rules,
                                      ["Sorting HOW TO"]) == "Answer: use sorted().\nSource: Sorting HOW TO"
    assert [v.version for v in prompts.list_versions(db)] == [3, 2, 1]
    assert embedder_asked == [UNDER_TEST_EMBEDDER]  # EMBEDDING_MODEL, loaded once for all three runs
    assert prompts.get(db, v1.id).few_shot == [] and prompts.get(db, v2.id).output_rules == []
