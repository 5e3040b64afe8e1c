"""The experiment life cycle (experiment.lifecycle) over the store, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from experiment import lifecycle
from store import experiments
from store.config import Settings
from store.db import Database
from store.models import Experiment


def _settings(**overrides) -> Settings:
    values = {
        "llm_api_base": "http://control.test/v1",
        "llm_model": "control-model",
        "llm_api_base_new_model": "http://candidate.test/v1",
        "llm_model_new": "candidate-model",
        "candidate_share": 0.25,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def _running_count(db: Database) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).where(Experiment.status == experiments.RUNNING))


def test_ensure_running_seeds_from_settings_once(db: Database) -> None:
    first = experiments.ensure_running(db, _settings())
    assert first.status == "running"
    assert (first.control_base_url, first.control_model) == ("http://control.test/v1", "control-model")
    assert (first.candidate_base_url, first.candidate_model) == ("http://candidate.test/v1", "candidate-model")
    assert first.candidate_share == 0.25
    assert first.salt and first.started_at is not None
    # Later calls return the stored experiment, whatever the environment now says.
    again = experiments.ensure_running(db, _settings(candidate_share=0.9, llm_model="other"))
    assert again.id == first.id and again.candidate_share == 0.25
    assert _running_count(db) == 1


def test_ensure_running_without_candidate(db: Database) -> None:
    seeded = experiments.ensure_running(db, _settings(llm_api_base_new_model="", llm_model_new="", candidate_share=0))
    assert seeded.candidate_base_url is None and seeded.candidate_model is None


def test_set_share_keeps_salt_and_id(db: Database) -> None:
    seeded = experiments.ensure_running(db, _settings())
    changed = lifecycle.set_share(db, seeded.id, 0.6)
    assert (changed.id, changed.salt, changed.candidate_share) == (seeded.id, seeded.salt, 0.6)
    stored = experiments.get(db, seeded.id)
    assert (stored.salt, stored.candidate_share, stored.status) == (seeded.salt, 0.6, "running")


def test_start_candidate_starts_a_new_experiment(db: Database) -> None:
    old = experiments.ensure_running(db, _settings())
    fresh = lifecycle.start_candidate(db, base_url="http://new.test/v1", model="lora-v2", adapter_id="ad-1")
    assert fresh.id != old.id and fresh.salt != old.salt
    assert (fresh.control_base_url, fresh.control_model) == (old.control_base_url, old.control_model)
    assert (fresh.candidate_base_url, fresh.candidate_model, fresh.candidate_adapter_id) == (
        "http://new.test/v1",
        "lora-v2",
        "ad-1",
    )
    assert fresh.candidate_share == old.candidate_share
    stopped = experiments.get(db, old.id)
    assert stopped.status == "stopped" and stopped.ended_at is not None
    assert experiments.get_running(db).id == fresh.id
    assert _running_count(db) == 1


def test_conclude_promoted_makes_the_candidate_control(db: Database) -> None:
    old = experiments.ensure_running(db, _settings())
    fresh = lifecycle.conclude(db, old.id, outcome="promoted", decision={"decision": "promote"})
    assert (fresh.control_base_url, fresh.control_model) == ("http://candidate.test/v1", "candidate-model")
    assert fresh.candidate_base_url is None and fresh.candidate_share == 0.0
    assert fresh.salt != old.salt
    ended = experiments.get(db, old.id)
    assert ended.status == "promoted" and ended.decision == {"decision": "promote"}
    assert experiments.get_running(db).id == fresh.id
    with pytest.raises(lifecycle.ExperimentNotRunning):
        lifecycle.conclude(db, old.id, outcome="promoted")
    with pytest.raises(lifecycle.ExperimentNotRunning):  # the successor has no candidate
        lifecycle.conclude(db, fresh.id, outcome="promoted")


def test_conclude_rolled_back_keeps_control(db: Database) -> None:
    old = experiments.ensure_running(db, _settings())
    fresh = lifecycle.conclude(db, old.id, outcome="rolled_back")
    assert (fresh.control_base_url, fresh.control_model) == (old.control_base_url, old.control_model)
    assert fresh.candidate_share == 0.0 and fresh.candidate_base_url is None
    assert experiments.get(db, old.id).status == "rolled_back"
    with pytest.raises(ValueError):
        lifecycle.conclude(db, fresh.id, outcome="maybe")
    with pytest.raises(experiments.ExperimentNotFound):
        experiments.get(db, "no-such-id")


def _race_ensure_running(db: Database, threads_n: int) -> list[str]:
    barrier = threading.Barrier(threads_n)
    results: list[str] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            barrier.wait()
            results.append(experiments.ensure_running(db, _settings()).id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return results


def test_concurrent_ensure_running_leaves_exactly_one(db: Database) -> None:
    for _round in range(2):
        assert len(_race_ensure_running(db, 6)) == 6
        assert _running_count(db) == 1
        survivor = experiments.get_running(db)
        assert survivor is not None
        # Every later call agrees on the survivor.
        assert experiments.ensure_running(db, _settings()).id == survivor.id
        # Next round starts from scratch.
        with db.session() as session:
            for experiment in session.scalars(select(Experiment)):
                experiment.status = "stopped"


def _kinds(db: Database, experiment_id: str) -> list[str]:
    return [event.kind for event in experiments.list_events(db, experiment_id)]


def test_every_transition_is_recorded_with_its_reason(db: Database) -> None:
    seeded = experiments.ensure_running(db, _settings())
    lifecycle.set_share(db, seeded.id, 0.5, reason="ramp to half")
    lifecycle.set_share(db, seeded.id, 0.5)  # no change, no transition
    fresh = lifecycle.promote(db, seeded.id, force=True, via="test")
    events = experiments.list_events(db, seeded.id)
    assert [e.kind for e in events] == ["start", "share", "promoted"]
    assert (events[1].from_share, events[1].to_share, events[1].reason) == (0.25, 0.5, "ramp to half")
    assert events[2].reason == "forced by an operator" and events[2].to_share == 0.0
    assert _kinds(db, fresh.id) == ["start"]
    assert experiments.get(db, seeded.id).decision["forced"] is True


def test_rollback_serves_control_and_refuses_an_ended_experiment(db: Database) -> None:
    seeded = experiments.ensure_running(db, _settings())
    fresh = lifecycle.rollback(db, seeded.id, via="test", reason="answers got worse", analysis={"decision": "x"})
    assert (fresh.control_base_url, fresh.candidate_base_url, fresh.candidate_share) == (
        "http://control.test/v1", None, 0.0)
    ended = experiments.get(db, seeded.id)
    assert ended.status == "rolled_back" and ended.decision["reason"] == "answers got worse"
    [_start, rolled] = experiments.list_events(db, seeded.id)
    assert rolled.kind == "rolled_back" and rolled.analysis == {"decision": "x"}
    with pytest.raises(lifecycle.ExperimentNotRunning, match="rolled_back"):
        lifecycle.rollback(db, seeded.id, via="test")
    with pytest.raises(experiments.ExperimentNotFound):
        lifecycle.rollback(db, "no-such-id", via="test")


def test_a_rollout_plan_moves_to_its_first_step(db: Database) -> None:
    seeded = experiments.ensure_running(db, _settings())
    started = lifecycle.set_rollout(db, seeded.id, {"steps": [0.05, 0.25, 0.5], "min_users_per_step": 10})
    assert started.candidate_share == 0.05
    assert started.rollout == {"steps": [0.05, 0.25, 0.5], "min_users_per_step": 10, "min_hours_per_step": 1.0,
                               "auto_promote": True, "step": 0}
    assert _kinds(db, seeded.id) == ["start", "rollout_step"]
    for bad in ({"steps": []}, {"steps": [0.5, 0.25]}, {"steps": [0.0, 0.5]}, {"steps": [1.5]},
                {"steps": [0.1], "min_users_per_step": -1}):
        with pytest.raises(ValueError):
            lifecycle.set_rollout(db, seeded.id, bad)
    without = lifecycle.conclude(db, seeded.id, outcome="stopped")
    with pytest.raises(lifecycle.ExperimentNotRunning, match="no candidate"):
        lifecycle.set_rollout(db, without.id, {"steps": [0.1]})


def _experiment(db: Database, started_minute: int, *, status: str = "running", experiment_id: str | None = None,
                decision: dict | None = None) -> str:
    from datetime import UTC, datetime

    from tests.store.conftest import add_experiment

    return add_experiment(db, status=status, started_at=datetime(2026, 11, 30, 12, started_minute, tzinfo=UTC),
                          decision=decision, **({"id": experiment_id} if experiment_id else {}))  # fmt: skip


def test_a_replica_race_keeps_the_oldest_running_and_stops_only_newer_running_ones(db: Database) -> None:
    older = _experiment(db, 1)
    keep = _experiment(db, 2)
    newer = _experiment(db, 3)
    ended = _experiment(db, 4, status="promoted", decision={"reason": "won"})
    experiments._stop_others(db, keep=experiments.get(db, keep))
    assert experiments.get(db, older).status == "running"  # older than the one kept: never stopped here
    stopped = experiments.get(db, newer)
    reason = "duplicate experiment created by a concurrent replica start"
    assert (stopped.status, stopped.decision) == ("stopped", {"reason": reason}) and stopped.ended_at is not None
    assert [(e.kind, e.reason) for e in experiments.list_events(db, newer)] == [("stopped", reason)]
    untouched = experiments.get(db, ended)  # already ended: not "stopped" again
    assert (untouched.status, untouched.decision, untouched.ended_at) == ("promoted", {"reason": "won"}, None)
    assert experiments.list_events(db, ended) == [] and experiments.list_events(db, older) == []


@pytest.mark.random_salt
def test_seeding_writes_one_experiment_with_a_start_event_and_a_fresh_salt(db: Database) -> None:
    seeded = experiments.ensure_running(db, _settings())
    experiments.ensure_running(db, _settings())
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Experiment)) == 1  # not one more per call
    (start,) = experiments.list_events(db, seeded.id)
    assert (start.kind, start.from_share, start.to_share) == ("start", None, 0.25)
    assert start.reason == "seeded from the environment" and start.ts is not None
    assert len(seeded.salt) == 16 and int(seeded.salt, 16) >= 0  # 64 random bits, in hex
    assert experiments.new_salt() != experiments.new_salt()


def test_the_oldest_running_experiment_is_the_running_one_ties_broken_by_id(db: Database) -> None:
    assert experiments.get_running(db) is None
    _experiment(db, 5, experiment_id="b-later-id")
    _experiment(db, 5, experiment_id="a-earlier-id")
    _experiment(db, 1, status="stopped")
    assert experiments.get_running(db).id == "a-earlier-id"
    with pytest.raises(experiments.ExperimentNotFound, match="^unknown experiment 'nope'$"):
        experiments.get(db, "nope")


def test_events_come_oldest_first_and_experiments_newest_first(db: Database) -> None:
    from datetime import UTC, datetime

    from store.models import ExperimentEvent

    first, second, third = _experiment(db, 1), _experiment(db, 2), _experiment(db, 3)
    at = datetime(2026, 11, 30, 13, 0, tzinfo=UTC)
    with db.session() as session:  # ids out of time order, and two events of one instant
        session.add_all([ExperimentEvent(id="a", experiment_id=first, ts=at.replace(minute=1), kind="later"),
                         ExperimentEvent(id="y", experiment_id=first, ts=at, kind="same-instant-2"),
                         ExperimentEvent(id="x", experiment_id=first, ts=at, kind="same-instant-1"),
                         ExperimentEvent(id="w", experiment_id=second, ts=at, kind="other experiment")])  # fmt: skip
    assert [e.kind for e in experiments.list_events(db, first)] == ["same-instant-1", "same-instant-2", "later"]
    with db.session() as session:
        event = experiments.add_event(session, session.get(Experiment, third), "note")
    assert (event.reason, event.from_share, event.to_share, event.analysis) == ("", None, None, None)
    assert [e.id for e in experiments.list_experiments(db)] == [third, second, first]
    assert [e.id for e in experiments.list_experiments(db, limit=2)] == [third, second]
