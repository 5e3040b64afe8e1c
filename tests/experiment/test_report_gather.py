"""The report's bundle, figure by figure, on a small store written by hand: which experiment it is
about and why, how much of it was simulated, the example answers, the transitions and the gate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import insert

from experiment.report import content, gather
from experiment.report.gather import EXAMPLES, _choose, _examples, _offline_gate, _simulated, _transitions
from store.db import Database
from store.models import Adapter, Experiment, ExperimentEvent, Feedback, SearchEvent
from tests.store.conftest import add_experiment, event_row, feedback_row

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def _experiment(db: Database, *, status: str = "running", candidate: bool = True, started: int = 0,
                adapter_id: str | None = None) -> str:  # fmt: skip
    return add_experiment(db, control_model="base", status=status,
                          candidate_base_url="http://candidate.test/v1" if candidate else None,
                          candidate_model="lora-v1" if candidate else None, candidate_adapter_id=adapter_id,
                          candidate_share=0.5, started_at=T0 + timedelta(hours=started),
                          ended_at=None if status == "running" else T0 + timedelta(hours=started + 1))  # fmt: skip


def _event(experiment_id: str, minute: int, *, user: str | None = "user-1", arm: str = "control",
           served: str | None = "same", query: str = "q", answer: str | None = "an answer", status: str = "ok",
           model: str = "base") -> dict:  # fmt: skip
    return event_row(ts=T0 + timedelta(minutes=minute), user_id=user, experiment_id=experiment_id, arm=arm,
                     served_arm=arm if served == "same" else served, model=model, query=query, answer=answer,
                     status=status)  # fmt: skip


def _feedback(event: dict, minute: int, **fields) -> dict:
    return feedback_row(event["id"], **{"ts": T0 + timedelta(minutes=minute), "thumbs": None, "rating": None, **fields})


def _write(db: Database, events: list[dict], feedback: list[dict] = ()) -> None:
    with db.session() as session:
        session.execute(insert(SearchEvent), events)
        if feedback:
            session.execute(insert(Feedback), list(feedback))


def test_the_experiment_reported_on_and_why(sqlite_db):
    assert _choose(sqlite_db, None) == (None, "no experiment in the store")
    bare = _experiment(sqlite_db, candidate=False, started=5)
    chosen, why = _choose(sqlite_db, None)
    assert (chosen.id, why) == (bare, "the running experiment (it has no candidate arm)")
    ended = _experiment(sqlite_db, status="promoted", started=1)
    _experiment(sqlite_db, status="stopped", candidate=False, started=3)  # ended, but compared nothing
    chosen, why = _choose(sqlite_db, None)
    assert (chosen.id, why) == (ended, "the last ended experiment that compared two arms "
                                       "(the running experiment has no candidate)")  # fmt: skip
    with sqlite_db.session() as session:
        session.get(Experiment, bare).status = "stopped"
    chosen, why = _choose(sqlite_db, None)
    assert (chosen.id, why) == (ended, "the last ended experiment that compared two arms (no experiment is running)")
    for hour in range(7, 30):  # more stopped experiments without a candidate than a page of the list
        _experiment(sqlite_db, status="stopped", candidate=False, started=hour)
    assert _choose(sqlite_db, None)[0].id == ended
    comparing = _experiment(sqlite_db, started=40)
    assert (_choose(sqlite_db, None)[0].id, _choose(sqlite_db, None)[1]) == (comparing, "the running experiment")
    assert (_choose(sqlite_db, bare)[0].id, _choose(sqlite_db, bare)[1]) == (bare, "the experiment asked for")


def test_how_much_was_simulated(sqlite_db):
    mine, other = _experiment(sqlite_db), _experiment(sqlite_db, status="stopped")
    assert _simulated(sqlite_db, mine) == {"events": 0, "simulated_events": 0, "simulated_users": 0, "feedback": 0,
                                           "simulated_feedback": 0, "any": False, "all": False}  # fmt: skip
    sims = [_event(mine, n, user=f"sim-{n % 2}") for n in range(3)]  # 3 events of 2 simulated users
    real = [_event(mine, 5, user="alice"), _event(mine, 6, user=None), _event(other, 7, user="sim-9")]
    _write(sqlite_db, sims + real,
           [_feedback(sims[0], 1, thumbs="up"), _feedback(sims[0], 2, rating=4), _feedback(real[0], 6, thumbs="down"),
            _feedback(real[2], 8, thumbs="up")])  # fmt: skip
    assert _simulated(sqlite_db, mine) == {"events": 5, "simulated_events": 3, "simulated_users": 2, "feedback": 3,
                                           "simulated_feedback": 2, "any": True, "all": False}  # fmt: skip
    assert _simulated(sqlite_db, other)["all"] is _simulated(sqlite_db, other)["any"] is True  # its one event


def test_examples_are_queries_both_arms_answered_newest_first(sqlite_db):
    mine = _experiment(sqlite_db)
    events = []
    for n in range(EXAMPLES + 1):  # one more paired query than the report shows: the oldest is left out
        for arm in ("control", "candidate"):
            events.append(_event(mine, 10 * n + (arm == "candidate"), arm=arm, query=f"query {n}", model=arm,
                                 user=f"sim-{n}-{arm}"))  # fmt: skip
    newest_control = _event(mine, 100, query="query 2", answer="newer control answer", user="bob")
    failed = _event(mine, 101, query="query 2", arm="candidate", status="error", answer="partial")
    unanswered = [_event(mine, 102, query="only control"), _event(mine, 103, query="only control", arm="candidate",
                                                                   served=None)]  # fmt: skip
    empty = _event(mine, 104, query="query 1", arm="candidate", answer="")
    _write(sqlite_db, [*events, newest_control, failed, *unanswered, empty],
           [_feedback(newest_control, 106, thumbs="up", comment="x" * 2000),
            _feedback(newest_control, 105, thumbs="down", rating=2, corrected_answer="fixed")])  # fmt: skip

    shown = _examples(sqlite_db, mine)
    assert shown["mode"] == "pairs"
    # query 2 was answered last (the newer control answer), then 4, 3, 1; query 0 is the fifth.
    assert [row["query"] for row in shown["rows"]] == ["query 2", "query 4", "query 3", "query 1"]
    control, candidate = shown["rows"][0]["arms"]["control"], shown["rows"][0]["arms"]["candidate"]
    assert (control["event_id"], control["answer"], control["simulated"]) == (newest_control["id"],
                                                                              "newer control answer", False)
    assert (candidate["model"], candidate["assigned_arm"], candidate["status"], candidate["simulated"]) == (
        "candidate", "candidate", "ok", True)  # not the failed answer after it
    assert control["ts"] == (T0 + timedelta(minutes=100)).isoformat()
    # Feedback in the order it was given, long text cut as everywhere in the report.
    assert [f["thumbs"] for f in control["feedback"]] == ["down", "up"]
    assert control["feedback"][0] == {"thumbs": "down", "rating": 2, "corrected_answer": "fixed", "comment": None}
    assert control["feedback"][1]["comment"] == content._truncate("x" * 2000) != "x" * 2000
    assert shown["rows"][3]["arms"]["candidate"]["answer"] == "an answer"  # the empty answer after it is skipped


def test_without_pairs_the_latest_answer_of_each_arm(sqlite_db):
    mine = _experiment(sqlite_db)
    assert _examples(sqlite_db, mine) == {"mode": "latest", "rows": []}
    old, new = _event(mine, 1, query="old"), _event(mine, 2, query="new")
    _write(sqlite_db, [old, new])
    shown = _examples(sqlite_db, mine)
    assert shown["mode"] == "latest" and len(shown["rows"]) == 1
    row = shown["rows"][0]
    assert row["query"] is None and row["arms"]["candidate"] is None and row["arms"]["control"]["query"] == "new"


def test_transitions_with_the_users_seen_by_then(sqlite_db):
    mine, other = _experiment(sqlite_db), _experiment(sqlite_db, status="stopped")
    _write(sqlite_db, [_event(mine, 1, user="a"), _event(mine, 2, user="a"), _event(mine, 3, user="b", arm="candidate"),
                       _event(mine, 4, user=None), _event(mine, 5, user="c", arm="none"), _event(other, 6, user="e"),
                       _event(mine, 10, user="f"), _event(mine, 30, user="d")])  # fmt: skip
    with sqlite_db.session() as session:
        for minute, to_share in ((0, 0.1), (10, 0.5)):  # the first before any request; the second with one at its time
            session.add(ExperimentEvent(experiment_id=mine, ts=T0 + timedelta(minutes=minute), kind="share",
                                        from_share=0.1, to_share=to_share, reason="rollout step"))  # fmt: skip
    transitions = _transitions(sqlite_db, mine)
    assert [t["users"] for t in transitions] == [0, 3]  # a, b and f: not c (no arm), e (another experiment), d (later)
    assert transitions[1] == {"ts": (T0 + timedelta(minutes=10)).isoformat(), "kind": "share", "from_share": 0.1,
                              "to_share": 0.5, "reason": "rollout step", "users": 3}  # fmt: skip


def test_the_offline_gate_of_the_candidate_adapter(sqlite_db):
    assert _offline_gate(sqlite_db, None) is None
    assert _offline_gate(sqlite_db, "gone") == {"adapter_id": "gone", "missing": True}
    with sqlite_db.session() as session:
        adapter = Adapter(name="lora-v1", base_model="base", path="/a", dataset_hash="abc", created_at=T0,
                          train_metrics={"train_rows": 3}, eval_metrics={"passed": True})  # fmt: skip
        session.add(adapter)
        session.flush()
        adapter_id = adapter.id
    assert _offline_gate(sqlite_db, adapter_id) == {
        "adapter_id": adapter_id, "name": "lora-v1", "base_model": "base", "dataset_hash": "abc",
        "created_at": T0.isoformat(), "train_metrics": {"train_rows": 3}, "eval_metrics": {"passed": True}}


def test_the_bundle_of_an_experiment_without_a_candidate(sqlite_db):
    bare = _experiment(sqlite_db, candidate=False)
    _write(sqlite_db, [_event(bare, 1, user="sim-1")])
    bundle = gather(sqlite_db)
    assert bundle["selection"] == "the running experiment (it has no candidate arm)"
    assert bundle["experiment"]["id"] == bare and bundle["experiment"]["status"] == "running"
    assert bundle["experiment"]["started_at"] == T0.isoformat() and bundle["experiment"]["ended_at"] is None
    assert bundle["timeline"] == [] and bundle["offline_gate"] is None  # nothing to compare, no adapter
    assert bundle["simulated"]["all"] is True and bundle["examples"]["mode"] == "latest"
    assert gather(Database(sqlite_db.url))["experiment"]["id"] == bare  # the same store read afresh


def test_the_bundle_of_an_empty_store_and_of_the_experiment_asked_for(sqlite_db):
    from experiment.analysis import empty
    from experiment.decision import Policy

    policy = Policy(min_users_per_arm=7)
    bundle = gather(sqlite_db, policy=policy)
    assert datetime.fromisoformat(bundle.pop("generated_at")).tzinfo is not None
    expected = empty("no experiment in the store", policy).to_dict()
    bundle["analysis"].pop("evaluated_at"), expected.pop("evaluated_at")  # the clock's, a moment apart
    assert bundle == {"selection": "no experiment in the store", "experiment": None, "analysis": expected,
                      "timeline": [], "transitions": [], "examples": None, "offline_gate": None,
                      "simulated": None}  # fmt: skip
    ended = _experiment(sqlite_db, status="promoted")
    with sqlite_db.session() as session:
        session.get(Experiment, ended).primary_metric = "thumbs_up_rate"
    _experiment(sqlite_db, started=2)  # running, with a candidate: the default, not the one asked for
    asked = gather(sqlite_db, ended, policy=policy, points=3)
    assert asked["selection"] == "the experiment asked for" and asked["experiment"]["id"] == ended
    assert asked["analysis"]["experiment_id"] == ended and asked["analysis"]["policy"]["min_users_per_arm"] == 7
    described = asked["experiment"]
    assert (described["status"], described["candidate_share"], described["primary_metric"]) == (
        "promoted", 0.5, "thumbs_up_rate")
    assert described["ended_at"] == (T0 + timedelta(hours=1)).isoformat()
