"""Test traffic written the way the proxy writes it: users assigned by the real bucket rule, each
with their own propensity, several requests each, and feedback on some of them."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import insert

from experiment.assignment import assign_arm
from store import experiments
from store.config import Settings
from store.db import Database
from store.models import Experiment, Feedback, SearchEvent, new_id, utcnow


@dataclass(frozen=True)
class ArmBehaviour:
    """How users respond to one arm's answers."""

    up: float | None = 0.5  # P(thumbs up | thumbs given); None: no thumbs
    feedback: float = 1.0  # P(any feedback on a request)
    rating_mean: float | None = None  # ratings ~ round(N(mean, 1)) clipped to 1..5; None: no ratings
    error: float = 0.0
    fallback: float = 0.0
    latency_ms: float = 100.0


SAME = ArmBehaviour()


def start(db: Database, share: float = 0.5, salt: str = "fixed-test-salt") -> Experiment:
    """A running experiment with a candidate arm at `share`.

    The salt is fixed so that which user lands in which arm, and so every figure a test reads,
    is the same on every run (a fresh random salt made tolerances fail a few runs in a hundred).
    """
    running = experiments.ensure_running(db, Settings(_env_file=None, database_url=db.url,
                                                      llm_api_base_new_model="http://candidate.test/v1",
                                                      candidate_share=share))
    with db.session() as session:
        session.get(Experiment, running.id).salt = salt
    running.salt = salt
    return running


def write(
    db: Database,
    experiment: Experiment,
    *,
    users: int,
    control: ArmBehaviour = SAME,
    candidate: ArmBehaviour = SAME,
    requests_per_user: int = 1,
    propensity_sd: float = 0.0,
    seed: int = 0,
    first_user: int = 0,
    share: float | None = None,
    ts: datetime | None = None,
    prefix: str = "test-user",
    step: timedelta = timedelta(microseconds=10),
    only: Callable[[str], bool] | None = None,
) -> None:
    """`users` users, assigned by the experiment's salt and `share` (default: the stored share).

    Requests are `step` apart from `ts` on, in user order (a larger step spreads them over days). `only`: the
    users of the range who come (e.g. those who return), by user id.
    """
    rng = random.Random(seed)
    share = experiment.candidate_share if share is None else share
    moment = ts or utcnow()
    events, feedback = [], []
    for n in range(first_user, first_user + users):
        user = f"{prefix}-{n}"
        if only is not None and not only(user):
            continue
        arm = assign_arm(experiment.salt, user, share, has_candidate=True)
        behaviour = candidate if arm == "candidate" else control
        nudge = rng.gauss(0, propensity_sd) if propensity_sd else 0.0
        for _ in range(requests_per_user):
            event_id = new_id()
            failed = rng.random() < behaviour.error
            fell_back = not failed and rng.random() < behaviour.fallback
            moment += step
            events.append({
                "id": event_id, "ts": moment, "user_id": user, "experiment_id": experiment.id, "arm": arm,
                "served_arm": None if failed else ("control" if fell_back else arm), "query": "q",
                "messages": [], "retrieved": {}, "status": "error" if failed else ("fallback" if fell_back else "ok"),
                "timings": {"total": behaviour.latency_ms * (0.5 + rng.random())}, "tokens_in": 10, "tokens_out": 5,
            })
            if failed or rng.random() >= behaviour.feedback:
                continue
            row = {"id": new_id(), "event_id": event_id, "ts": moment, "thumbs": None, "rating": None}
            if behaviour.up is not None:
                row["thumbs"] = "up" if rng.random() < min(max(behaviour.up + nudge, 0.0), 1.0) else "down"
            if behaviour.rating_mean is not None:
                row["rating"] = min(max(round(rng.gauss(behaviour.rating_mean + 4 * nudge, 1.0)), 1), 5)
            feedback.append(row)
    with db.session() as session:
        if events:
            session.execute(insert(SearchEvent), events)
        if feedback:
            session.execute(insert(Feedback), feedback)
