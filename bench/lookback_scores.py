"""What reading answer scores in CUPED's lookback adds to a look: `collect._pre_period` with none, 2% and 20% of
a million lookback requests scored, and the score query alone (PostgreSQL, `ANALYZE`d, best of 3).

The scoring flow grades a sample of each experiment's answers (200 per arm at each hourly look by default), so the
lookback of the experiment after it holds that sample.

    .venv/bin/python bench/lookback_scores.py                 # 1M lookback requests; --events N
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert, select, text  # noqa: E402

from bench.evaluate_scale import DAYS, _database, _drop, _fill  # noqa: E402
from experiment import collect  # noqa: E402
from store import experiments  # noqa: E402
from store.config import Settings  # noqa: E402
from store.db import Database  # noqa: E402
from store.models import AnswerScore, SearchEvent, new_id  # noqa: E402

SHARES = (0.0, 0.02, 0.2)


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def _score(db: Database, event_ids: list[str], share: float, rng: random.Random) -> int:
    """Replace the stored scores by grounding scores on `share` of the events; returns how many."""
    rows = [{"id": new_id(), "event_id": event_id, "method": "grounding", "score": rng.random()}
            for event_id in event_ids if rng.random() < share]
    with db.session() as session:
        session.execute(text("DELETE FROM answer_scores"))
        for start in range(0, len(rows), 20_000):
            session.execute(insert(AnswerScore), rows[start:start + 20_000])
    with db.session() as session:
        session.execute(text("ANALYZE"))
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # killed: still drop the schema (the finally below)
    db, schema = _database(False, Path("."))
    try:
        db.migrate()
        experiment = experiments.ensure_running(db, Settings(
            _env_file=None, database_url=db.url, llm_api_base_new_model="http://candidate.test/v1"))
        _fill(db, experiment, args.events, before=True, seed=1)
        with db.session() as session:
            event_ids = list(session.scalars(select(SearchEvent.id)))
        started, lookback = experiment.started_at, timedelta(days=DAYS)
        _requests, _feedback, score_query = collect._lookback_queries(started, lookback)

        def read_scores() -> None:
            with db.session() as session:
                session.execute(score_query).all()

        print("| lookback requests | scored | _pre_period s | of which the score query s |")
        print("|---:|---:|---:|---:|")
        rng = random.Random(2)
        for share in SHARES:
            scored = _score(db, event_ids, share, rng)
            pre_s = _best(lambda: collect._pre_period(db, started, lookback))
            print(f"| {len(event_ids):,} | {scored:,} ({share:.0%}) | {pre_s:.2f} | {_best(read_scores):.2f} |",
                  flush=True)
    finally:
        db.dispose()
        _drop(schema)


if __name__ == "__main__":
    main()
