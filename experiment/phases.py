"""Phases: the stretches of an experiment during which the candidate share stayed the same.

A share change or a rollout step starts a new phase. Users are assigned by the share in force, so
the sample-ratio check must compare each phase's users against that phase's share: comparing all
users against the latest share after a ramp from 10% to 50% reports a broken split that is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from store.models import Experiment, ExperimentEvent

if TYPE_CHECKING:
    import numpy as np

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

# Transitions that set a share; the others (promoted, rolled_back, stopped) end the last phase.
SHARE_KINDS = ("start", "share", "rollout_step")
END_KINDS = ("promoted", "rolled_back", "stopped")


@dataclass(frozen=True)
class Phase:
    index: int
    share: float
    start: datetime
    end: datetime | None
    reason: str


def phases_of(experiment: Experiment, events: Sequence[ExperimentEvent]) -> list[Phase]:
    """The experiment's phases, oldest first, from its recorded transitions.

    An experiment with no recorded start (written before transitions were recorded) has one
    phase from `started_at` with the share it began with.
    """
    bounds: list[tuple[datetime, float, str]] = []
    ended: datetime | None = experiment.ended_at
    started = experiment.started_at
    for event in events:
        if event.kind in SHARE_KINDS and event.to_share is not None:
            if bounds and bounds[-1][1] == event.to_share:
                continue
            # The recorded start is written a moment after `started_at`: the first phase begins with the experiment.
            moment = started if event.kind == "start" and not bounds else event.ts
            bounds.append((moment, float(event.to_share), event.reason or event.kind))
        elif event.kind in END_KINDS:
            ended = event.ts
    if not bounds or bounds[0][0] > started:
        first_share = next((e.from_share for e in events if e.from_share is not None), experiment.candidate_share)
        bounds.insert(0, (started, float(first_share), "start"))
    return [
        Phase(index=n, share=share, start=start, end=bounds[n + 1][0] if n + 1 < len(bounds) else ended, reason=why)
        for n, (start, share, why) in enumerate(bounds)
    ]


def microseconds(moment: datetime) -> int:
    """A time-zone aware moment as whole microseconds since the epoch: exact, as datetimes are."""
    return (moment - _EPOCH) // _MICROSECOND


def locate(phases: Sequence[Phase], moments: np.ndarray) -> np.ndarray:
    """Which phase each moment (`microseconds`) falls in; moments before the first phase count in the first."""
    import numpy as np

    starts = np.array([microseconds(phase.start) for phase in phases], dtype=np.int64)
    return np.maximum(np.searchsorted(starts, moments, side="right") - 1, 0)
