"""Phases from an experiment's recorded transitions, and which phase a moment falls in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np

from experiment.phases import Phase, locate, microseconds, phases_of

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


def _at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def _event(kind: str, minutes: float, to_share: float | None = None, from_share: float | None = None,
           reason: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(kind=kind, ts=_at(minutes), to_share=to_share, from_share=from_share, reason=reason)


def _experiment(share: float = 0.5, ended_at: datetime | None = None) -> SimpleNamespace:
    return SimpleNamespace(started_at=T0, ended_at=ended_at, candidate_share=share)


def test_a_ramp_is_one_phase_per_share_and_the_end_closes_the_last():
    events = [
        _event("start", 0.01, to_share=0.1, from_share=0.0, reason="started"),  # a moment after started_at
        _event("rollout_step", 60, to_share=0.5, from_share=0.1, reason="step 2 of 3"),
        _event("share", 70, to_share=0.5, from_share=0.5, reason="the same share again"),  # no new phase
        _event("share", 90, to_share=0.8, from_share=0.5),  # no reason given: the kind stands in
        _event("promoted", 120, to_share=0.0, from_share=0.8, reason="candidate is better"),
    ]
    assert phases_of(_experiment(ended_at=_at(121)), events) == [
        Phase(index=0, share=0.1, start=T0, end=_at(60), reason="started"),
        Phase(index=1, share=0.5, start=_at(60), end=_at(90), reason="step 2 of 3"),
        Phase(index=2, share=0.8, start=_at(90), end=_at(120), reason="share"),
    ]


def test_a_running_experiment_has_an_open_last_phase_and_a_stored_end_is_used_without_an_end_event():
    events = [_event("start", 0, to_share=0.2)]
    [running] = phases_of(_experiment(), events)
    assert running.end is None and running.reason == "start" and running.share == 0.2
    [ended] = phases_of(_experiment(ended_at=_at(30)), events)
    assert ended.end == _at(30)


def test_an_experiment_without_a_recorded_start_begins_with_the_share_it_had():
    # Written before transitions were recorded: the first phase is inferred from started_at.
    events = [_event("share", 45, to_share=0.6, from_share=0.2, reason="ramp")]
    assert phases_of(_experiment(share=0.6), events) == [
        Phase(index=0, share=0.2, start=T0, end=_at(45), reason="start"),
        Phase(index=1, share=0.6, start=_at(45), end=None, reason="ramp"),
    ]
    [only] = phases_of(_experiment(share=0.3), [])  # nothing recorded at all: the stored share throughout
    assert only == Phase(index=0, share=0.3, start=T0, end=None, reason="start")
    without_from = [_event("share", 45, to_share=0.6)]
    assert phases_of(_experiment(share=0.25), without_from)[0].share == 0.25


def test_events_that_end_the_experiment_never_start_a_phase():
    events = [_event("start", 0, to_share=0.5), _event("rolled_back", 30, to_share=0.0, from_share=0.5),
              _event("stopped", 40, to_share=0.0)]
    [only] = phases_of(_experiment(), events)
    assert only.share == 0.5 and only.end == _at(40)


def test_a_moment_is_located_in_its_phase():
    phases = [Phase(0, 0.1, T0, _at(60), "start"), Phase(1, 0.5, _at(60), None, "step")]
    moments = [microseconds(moment) for moment in (_at(-5), T0, _at(59.9), _at(60), _at(600))]
    assert locate(phases, np.array(moments)).tolist() == [0, 0, 0, 1, 1]
    assert microseconds(T0 + timedelta(microseconds=1)) - microseconds(T0) == 1  # exact, not through floats
