"""The decision rule alone: each step of its precedence, each boundary, and the guardrail margins."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from experiment.decision import (
    KEEP_RUNNING,
    NOT_ENOUGH_DATA,
    PROMOTE,
    ROLL_BACK,
    Guardrail,
    Policy,
    decide,
    guardrail_breached,
)

POLICY = Policy(min_users_per_arm=100, min_signals_per_arm=50)


def _primary(low: float, high: float) -> dict:
    return {"control": 0.5, "candidate": 0.5 + (low + high) / 2, "difference": (low + high) / 2, "ci": [low, high]}


def _decide(**changes):
    arguments = dict(has_candidate=True, srm_mismatch=[], users=(100, 100), signals=(50, 50), responders=(20, 20),
                     breached=[],
                     primary=_primary(0.01, 0.2), primary_name="satisfaction", policy=POLICY)
    return decide(**(arguments | changes))


def test_with_enough_data_the_always_valid_interval_decides():
    promote = _decide(primary=_primary(0.01, 0.2))
    assert promote.action == PROMOTE and promote.reason.startswith("candidate is better: satisfaction 0.5 -> ")
    assert "always-valid 95% interval [+0.01, +0.2]" in promote.reason
    worse = _decide(primary=_primary(-0.2, -0.01))
    assert worse.action == ROLL_BACK and worse.reason.startswith("candidate is worse: satisfaction")
    unsure = _decide(primary=_primary(-0.1, 0.1))
    assert unsure.action == KEEP_RUNNING and unsure.reason.startswith("no significant difference yet: satisfaction")


@pytest.mark.parametrize(("low", "high"), [(0.0, 0.2), (-0.2, 0.0), (0.0, 0.0)])
def test_an_interval_that_touches_zero_is_not_significant(low, high):
    assert _decide(primary=_primary(low, high)).action == KEEP_RUNNING


def test_the_level_in_the_reason_is_the_policys():
    assert "always-valid 90% interval" in _decide(policy=Policy(alpha=0.1)).reason


def test_precedence_no_candidate_then_guardrails_then_split_then_users_then_signals():
    nothing = _decide(has_candidate=False, srm_mismatch=["phase 1"], users=(0, 0), breached=["error_rate"])
    assert nothing == type(nothing)(NOT_ENOUGH_DATA, "no candidate arm: nothing to compare")

    split = _decide(srm_mismatch=["phase 1 (p=1e-05)", "phase 2 (p=2e-06)"], users=(0, 0), breached=["error_rate"])
    assert split.action == KEEP_RUNNING
    assert split.reason == ("sample ratio mismatch in phase 1 (p=1e-05); phase 2 (p=2e-06): the split is broken, "
                            "fix assignment before trusting any comparison")

    # A breach rolls back even under a broken split: it may be faked by it, but the safe error is to stop.
    breach_and_split = _decide(srm_mismatch=["phase 2 (p=2e-06)"], breached=["error_rate 0 -> 0.3"])
    assert breach_and_split.action == ROLL_BACK
    assert breach_and_split.reason == ("guardrail breached: error_rate 0 -> 0.3 (and a sample ratio mismatch in "
                                       "phase 2 (p=2e-06): the split is broken too)")

    few = _decide(users=(99, 500), breached=["error_rate"])
    assert few.action == NOT_ENOUGH_DATA and few.reason == "users per arm [99, 500]; need 100 in each"

    guardrail = _decide(breached=["error_rate +0.05 > 0.02", "fallback_rate"], signals=(0, 0), primary=None)
    assert guardrail.action == ROLL_BACK
    assert guardrail.reason == "guardrail breached: error_rate +0.05 > 0.02; fallback_rate"

    quiet = _decide(signals=(49.0, 80.0))
    assert quiet.action == NOT_ENOUGH_DATA
    assert quiet.reason == ("satisfaction observations per arm [49, 80] from [20, 20] users; "
                            "need 50 from 20 users in each")
    # Plenty of signals from too few users: one heavy responder is not a sample.
    few_responders = _decide(signals=(500.0, 500.0), responders=(19, 40))
    assert few_responders.action == NOT_ENOUGH_DATA
    assert few_responders.reason == ("satisfaction observations per arm [500, 500] from [19, 40] users; "
                                     "need 50 from 20 users in each")


def test_the_minimums_are_inclusive():
    assert _decide(users=(100, 100), signals=(50, 50)).action == PROMOTE
    assert _decide(users=(100, 99)).action == NOT_ENOUGH_DATA
    assert _decide(signals=(50, 49.5)).action == NOT_ENOUGH_DATA
    assert _decide(responders=(20, 19)).action == NOT_ENOUGH_DATA


def test_no_primary_comparison_is_not_enough_data_even_with_signals():
    decision = _decide(primary=None, signals=(500, 500))
    assert decision.action == NOT_ENOUGH_DATA and decision.reason.startswith("satisfaction observations per arm")


@pytest.mark.parametrize(("higher_is_better", "ci", "breached"), [
    (True, (-0.2, -0.021), True),  # worse by more than the margin, surely
    (True, (-0.2, -0.02), False),  # the interval reaches the margin itself
    (True, (-0.2, 0.1), False),  # could be worse, not shown
    (False, (0.021, 0.2), True),  # an error rate up by more than the margin
    (False, (0.02, 0.2), False),
    (False, (-0.1, 0.2), False),
])
def test_an_absolute_guardrail_is_breached_only_when_the_whole_interval_is_past_the_margin(higher_is_better, ci,
                                                                                           breached):
    guardrail = Guardrail("error_rate", 0.02)
    assert guardrail_breached(guardrail, control=0.3, ci=ci, higher_is_better=higher_is_better) == (breached, 0.02)


def test_a_relative_guardrails_margin_is_a_fraction_of_control():
    latency = Guardrail("latency_p95_ms", 0.5, relative=True)
    assert guardrail_breached(latency, control=-800.0, ci=(401.0, 900.0), higher_is_better=False) == (True, 400.0)
    assert guardrail_breached(latency, control=800.0, ci=(399.0, 900.0), higher_is_better=False) == (False, 400.0)


def test_the_policy_from_settings_and_as_a_dict():
    settings = SimpleNamespace(experiment_min_users_per_arm=7, experiment_min_signals_per_arm=3,
                               experiment_min_responders_per_arm=4, experiment_sequential_tuning=900.0)
    policy = Policy.from_settings(settings)
    assert (policy.min_users_per_arm, policy.min_signals_per_arm, policy.min_responders_per_arm,
            policy.sequential_tuning) == (7, 3, 4, 900.0)
    assert policy.alpha == 0.05 and policy.cuped is True
    as_dict = policy.to_dict()
    assert as_dict["min_users_per_arm"] == 7 and as_dict["guardrails"][0] == {"metric": "error_rate", "margin": 0.02,
                                                                              "relative": False}
    assert _decide().to_dict() == {"action": PROMOTE, "reason": _decide().reason}
