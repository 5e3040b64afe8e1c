"""The experiment lifecycle in the store."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

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
    changed = experiments.set_share(db, seeded.id, 0.6)
    assert (changed.id, changed.salt, changed.candidate_share) == (seeded.id, seeded.salt, 0.6)
    stored = experiments.get(db, seeded.id)
    assert (stored.salt, stored.candidate_share, stored.status) == (seeded.salt, 0.6, "running")


def test_start_candidate_starts_a_new_experiment(db: Database) -> None:
    old = experiments.ensure_running(db, _settings())
    fresh = experiments.start_candidate(db, base_url="http://new.test/v1", model="lora-v2", adapter_id="ad-1")
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
    fresh = experiments.conclude(db, old.id, outcome="promoted", decision={"decision": "promote"})
    assert (fresh.control_base_url, fresh.control_model) == ("http://candidate.test/v1", "candidate-model")
    assert fresh.candidate_base_url is None and fresh.candidate_share == 0.0
    assert fresh.salt != old.salt
    ended = experiments.get(db, old.id)
    assert ended.status == "promoted" and ended.decision == {"decision": "promote"}
    assert experiments.get_running(db).id == fresh.id
    with pytest.raises(experiments.ExperimentNotRunning):
        experiments.conclude(db, old.id, outcome="promoted")
    with pytest.raises(experiments.ExperimentNotRunning):  # the successor has no candidate
        experiments.conclude(db, fresh.id, outcome="promoted")


def test_conclude_rolled_back_keeps_control(db: Database) -> None:
    old = experiments.ensure_running(db, _settings())
    fresh = experiments.conclude(db, old.id, outcome="rolled_back")
    assert (fresh.control_base_url, fresh.control_model) == (old.control_base_url, old.control_model)
    assert fresh.candidate_share == 0.0 and fresh.candidate_base_url is None
    assert experiments.get(db, old.id).status == "rolled_back"
    with pytest.raises(ValueError):
        experiments.conclude(db, fresh.id, outcome="maybe")
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
