"""bench/stats_calibration.py's sampled-score simulation: what it hands the analysis is what collect would."""

import math

import numpy as np

from bench.stats_calibration import SCENARIOS, SampledScores, run_repetition
from experiment.analysis import analyse_collected
from experiment.decision import Policy


def test_sampled_scores_reach_the_analysis_as_the_primary_with_their_covariate():
    simulation = SampledScores(users=400, look_every=200)
    looks = list(simulation.looks(np.random.default_rng(3)))
    assert [look.users for look in looks] == [200, 400]
    collected = looks[-1].collected
    control = collected.arms["control"]
    scored = control.columns["grounding_n"]
    assert 0 < np.count_nonzero(scored) < control.users  # a sample of the users' answers was scored
    assert (scored <= control.columns["requests"]).all() and control.total("thumbs") == 0
    pre = control.pre["answer_score"]
    assert 0 < np.count_nonzero(~np.isnan(pre)) < control.users  # some had scored answers before, not all
    assert np.nanmin(pre) >= 0 and np.nanmax(pre) <= 1
    primary = analyse_collected(collected, Policy()).primary
    assert primary["metric"] == "answer_score" and primary["cuped"]["users_with_pre"][0] > 0
    assert analyse_collected(collected, Policy(cuped=False)).primary["cuped"] is None


def test_every_sampled_score_scenario_runs_its_rows():
    for key in ("6", "6p", "6b", "6a"):
        outcomes, _old_alarm = run_repetition(key, 0)
        assert len(outcomes) == len(SCENARIOS[key].rows) == 4
        assert all(outcome.seconds > 0 and not math.isnan(outcome.seconds) for outcome in outcomes)
