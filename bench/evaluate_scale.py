"""What one evaluation costs as an experiment grows: `collect` (read and assemble) and `analyse_collected`.

`abloop evaluate`, the hourly `evaluate_arms` flow, the rollout and `promote` (which analyses again
before it acts) each pay this once; the report pays it once more for its metric-over-time chart's
twelve points (`timeline`). The peak is Python's and numpy's allocations during one `collect` (tracemalloc).
Rows are written as the proxy writes them (one event a request, feedback on about a third), into a
fresh schema of the real PostgreSQL (or a fresh SQLite file): 14 days of the experiment's traffic, and as
much from the same users in the 14 days before it, which CUPED's lookback reads (`--no-lookback`: none).

    .venv/bin/python bench/evaluate_scale.py                          # PostgreSQL, 50k / 200k / 1M events
    .venv/bin/python bench/evaluate_scale.py --sqlite --events 50000 200000

PostgreSQL at ABLOOP_TEST_POSTGRES_URL, as for the tests (default: the local server's `test` database).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
import tracemalloc
import uuid
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert, text  # noqa: E402

from experiment.analysis import analyse_collected, timeline  # noqa: E402
from experiment.assignment import assign_arm  # noqa: E402
from experiment.collect import collect  # noqa: E402
from experiment.decision import Policy  # noqa: E402
from store import experiments  # noqa: E402
from store.config import Settings  # noqa: E402
from store.db import Database  # noqa: E402
from store.models import Experiment, Feedback, SearchEvent, new_id, utcnow  # noqa: E402

REQUESTS_PER_USER, DAYS, CHUNK = 5, 14, 20_000
PG_URL = os.environ.get("ABLOOP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")  # as the tests


def _fill(db: Database, experiment: Experiment, events: int, *, before: bool = False, seed: int = 0) -> int:
    """`events` requests from events / 5 users over the experiment's 14 days (`before`: the 14 days before it,
    outside any experiment: the CUPED lookback); returns the feedback rows written."""
    rng = random.Random(seed)
    start = experiment.started_at - timedelta(days=DAYS) if before else experiment.started_at
    span = timedelta(days=DAYS).total_seconds()
    users = events // REQUESTS_PER_USER
    written_feedback = 0
    batch_events: list[dict] = []
    batch_feedback: list[dict] = []

    def flush() -> None:
        with db.session() as session:
            if batch_events:
                session.execute(insert(SearchEvent), batch_events)
            if batch_feedback:
                session.execute(insert(Feedback), batch_feedback)
        batch_events.clear()
        batch_feedback.clear()

    for n in range(users):
        user = f"scale-user-{n}"
        arm = assign_arm(experiment.salt, user, experiment.candidate_share, has_candidate=True)
        for _ in range(REQUESTS_PER_USER):
            event_id = new_id()
            moment = start + timedelta(seconds=rng.random() * span)
            status = "error" if rng.random() < 0.01 else "ok"
            batch_events.append({
                "id": event_id, "ts": moment, "user_id": user, "arm": arm, "served_arm": arm,
                "experiment_id": None if before else experiment.id, "query": "q", "messages": [], "retrieved": {},
                "status": status,
                "timings": {"total": 80 + 40 * rng.random()}, "tokens_in": 10, "tokens_out": 5,
            })
            if status == "ok" and rng.random() < 0.3:
                batch_feedback.append({"id": new_id(), "event_id": event_id, "ts": moment + timedelta(seconds=5),
                                       "thumbs": "up" if rng.random() < 0.6 else "down", "rating": None})
                written_feedback += 1
        if len(batch_events) >= CHUNK:
            flush()
    flush()
    return written_feedback


def _database(sqlite: bool, workdir: Path) -> tuple[Database, str | None]:
    if sqlite:
        return Database(f"sqlite:///{workdir / f'scale-{uuid.uuid4().hex[:8]}.db'}"), None
    schema = f"bench_scale_{uuid.uuid4().hex[:8]}"
    admin = Database(PG_URL)
    with admin.session() as session:
        session.execute(text(f"CREATE SCHEMA {schema}"))
    admin.dispose()
    return Database(f"{PG_URL}?options=-csearch_path%3D{schema}"), schema


def _drop(schema: str | None) -> None:
    if schema is None:
        return
    admin = Database(PG_URL)
    with admin.session() as session:
        session.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def _best(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return min(times), result


def _measure(db: Database, events: int, repeats: int, policy: Policy, lookback: bool) -> str:
    """One table row: write `events` requests into a fresh store, then time reading and analysing them."""
    db.migrate()
    experiment = experiments.ensure_running(db, Settings(
        _env_file=None, database_url=db.url, llm_api_base_new_model="http://candidate.test/v1", candidate_share=0.5))
    with db.session() as session:
        stored = session.get(Experiment, experiment.id)
        stored.started_at = utcnow() - timedelta(days=DAYS)
        experiment.started_at = stored.started_at
    began = time.perf_counter()
    feedback = _fill(db, experiment, events)
    if lookback:
        _fill(db, experiment, events, before=True, seed=1)
    written = time.perf_counter() - began
    collect_s, collected = _best(lambda: collect(db, experiment.id), repeats)
    analyse_s, analysis = _best(lambda: analyse_collected(collected, policy), repeats)
    timeline_s, _ = _best(lambda: timeline(db, experiment.id, policy), 1)
    tracemalloc.start()  # after the timings: tracing slows allocation down
    collect(db, experiment.id)
    peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    users = sum(arm.users for arm in collected.arms.values())
    return (f"| {events:,} | {users:,} | {feedback:,} | {written:.1f} | {collect_s:.2f} | {analyse_s:.2f} | "
            f"{collect_s + analyse_s:.2f} | {timeline_s:.1f} | {peak_mb:.0f} | {analysis.decision['action']} | "
            f"{(analysis.primary or {}).get('difference', float('nan')):+.6g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead of PostgreSQL")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-lookback", action="store_true",
                        help="no traffic in the 14 days before the experiment (CUPED's lookback has nothing to read)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # killed: still drop the schema (the finally below)
    policy = Policy()
    print(f"store: {'SQLite' if args.sqlite else 'PostgreSQL'}; best of {args.repeats}; "
          f"{REQUESTS_PER_USER} requests a user over {DAYS} days, thumbs on ~30%; "
          + ("no traffic before it" if args.no_lookback else f"as much again in the {DAYS} days before (CUPED)"))
    print("| events | users | feedback | write s | collect s | analyse s | evaluate s | timeline (12 points) s "
          "| collect's peak MB | decision | satisfaction difference |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as workdir:
        for events in args.events:
            db, schema = _database(args.sqlite, Path(workdir))
            try:
                print(_measure(db, events, args.repeats, policy, not args.no_lookback), flush=True)
            finally:
                db.dispose()
                _drop(schema)


if __name__ == "__main__":
    main()
