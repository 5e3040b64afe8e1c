"""experiment.stats at its edges: argument checks, zero-variance branches, defaults and the numbers beside the
interval (p-values, chance to win) that test_stats.py does not pin. Each test here kills mutants that survived
test_stats.py and the rest of tests/experiment (mutmut 3.8.1 on experiment/stats.py, docs/BENCHMARKS.md,
"Mutation testing of the statistics")."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gbstats.frequentist.tests import SequentialConfig, SequentialTwoSidedTTest
from gbstats.models.statistics import SampleMeanStatistic
from scipy import integrate
from scipy import stats as sps

from experiment.stats import (
    Comparison,
    Estimate,
    _json_ready,
    beta_chance_to_win,
    compare_ratio,
    linearised,
    quantile_estimate,
    ratio_estimate,
    relative_change,
    sample_ratio,
    sequential_interval,
    stratified,
    two_proportions,
    welch,
)


def _ones(n: int) -> np.ndarray:
    return np.ones(n)


def _mean_stat(values: np.ndarray) -> SampleMeanStatistic:
    return SampleMeanStatistic(n=len(values), sum=float(values.sum()), sum_squares=float((values**2).sum()))


# ---------------------------------------------------------------------------------------------- sequential


@pytest.mark.parametrize(("n_total", "alpha", "tuning", "named"), [
    (0, 0.05, 5000.0, "n_total"), (10, 0.0, 5000.0, "alpha"), (10, 1.0, 5000.0, "alpha"), (10, 0.05, 0.0, "tuning"),
])
def test_sequential_interval_refuses_bad_arguments_by_name(n_total, alpha, tuning, named):
    with pytest.raises(ValueError, match=named):
        sequential_interval(0.1, 1.0, n_total, alpha, tuning)


def test_sequential_interval_accepts_the_smallest_valid_arguments():
    for n_total, tuning in ((1, 5000.0), (10, 0.5)):
        (low, high), p_value = sequential_interval(0.1, 1.0, n_total, 0.05, tuning)
        assert low < 0.1 < high and 0 < p_value <= 1


def test_sequential_p_value_equals_gbstats_where_the_e_value_is_small_and_is_one_below_it():
    rng = np.random.default_rng(21)
    a = rng.normal(0, 1, 400)
    config = SequentialConfig(difference_type="absolute", sequential_tuning_parameter=5000)
    seen = []
    for shift in (0.02, 0.12, 0.2):  # log e-value below 0, between 0 and 1, above 1
        b = a[::-1] + shift + rng.normal(0, 0.05, 400)
        result = compare_ratio(a, _ones(400), b, _ones(400))
        reference = SequentialTwoSidedTTest(_mean_stat(a), _mean_stat(b), config)
        assert result.sequential_p_value == pytest.approx(min(reference.p_value, 1.0), rel=1e-9)
        seen.append(result.sequential_p_value)
    assert seen[0] == 1.0 and math.exp(-1) < seen[1] < 1 and seen[2] < math.exp(-1)


@pytest.mark.parametrize(("difference", "variance"), [(0.1, math.nan), (math.nan, 1.0)])
def test_sequential_interval_refuses_nan_rather_than_read_it_as_certainty(difference, variance):
    with pytest.raises(ValueError, match="numbers"):
        sequential_interval(difference, variance, 100, 0.05, 5000.0)


def test_sequential_interval_without_variance_is_certain_either_way():
    assert sequential_interval(0.5, 0.0, 10, 0.05, 5000.0) == ((0.5, 0.5), 0.0)
    assert sequential_interval(0.0, 0.0, 10, 0.05, 5000.0) == ((0.0, 0.0), 1.0)


# ---------------------------------------------------------------------------------------------- compare_ratio


def test_compare_ratio_defaults_are_gbstats_defaults():
    rng = np.random.default_rng(22)
    a, b = rng.normal(1, 1, 200), rng.normal(1.2, 1, 220)
    result = compare_ratio(a, _ones(200), b, _ones(220))
    reference = SequentialTwoSidedTTest(_mean_stat(a), _mean_stat(b), SequentialConfig(difference_type="absolute"))
    assert result.sequential_ci == pytest.approx(tuple(reference.confidence_interval), rel=1e-9)
    assert result == compare_ratio(a, _ones(200), b, _ones(220), alpha=0.05, tuning=5000.0)


def test_compare_ratio_none_when_the_candidate_ratio_is_undefined():
    assert compare_ratio([1.0, 2.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]) is None


@pytest.mark.parametrize("which", ["control", "candidate"])
def test_compare_ratio_refuses_pre_values_of_the_wrong_length_in_either_arm(which):
    pre = {"control_pre": np.zeros(3), "candidate_pre": np.zeros(4)}
    pre[f"{which}_pre"] = np.zeros(5)
    with pytest.raises(ValueError, match="one entry per user"):
        compare_ratio(np.arange(3.0), _ones(3), np.arange(4.0), _ones(4), **pre)
    with pytest.raises(ValueError, match="both arms"):
        compare_ratio(np.arange(3.0), _ones(3), np.arange(4.0), _ones(4), control_pre=np.zeros(3))


@pytest.mark.parametrize(("candidate", "p_value", "chance"), [(1.5, 0.0, 1.0), (0.5, 0.0, 0.0), (1.0, 1.0, 0.5)])
def test_compare_ratio_without_spread_knows_the_difference_exactly(candidate, p_value, chance):
    result = compare_ratio([1.0, 1.0], [1.0, 1.0], [candidate] * 3, [1.0] * 3)
    assert result.fixed_ci == (candidate - 1.0, candidate - 1.0)
    assert result.fixed_p_value == p_value and result.sequential_p_value == p_value
    assert result.chance_to_win == chance and math.isnan(result.dof)


def test_compare_ratio_needs_two_users_with_a_denominator_in_each_arm():
    """200 users an arm, one of whom gave all 60 thumbs: every linearised value is 0 up to rounding, and the
    interval was a point (a certain promote for 30/60 against 33/60). gbstats' own variance is 0 there too."""
    from gbstats.models.statistics import RatioStatistic

    def arm(up: float) -> tuple[np.ndarray, np.ndarray]:
        num, den = np.zeros(200), np.zeros(200)
        num[0], den[0] = up, 60.0
        return num, den

    assert compare_ratio(*arm(30.0), *arm(33.0)) is None
    one = RatioStatistic(n=200, m_statistic=SampleMeanStatistic(n=200, sum=30.0, sum_squares=900.0),
                         d_statistic=SampleMeanStatistic(n=200, sum=60.0, sum_squares=3600.0),
                         m_d_sum_of_products=1800.0)
    assert abs(one.variance) < 1e-15
    (num_a, den_a), (num_b, den_b) = arm(30.0), arm(33.0)
    num_a[1], den_a[1], num_b[1], den_b[1] = 2.0, 4.0, 1.0, 2.0  # a second responder in each: comparable again
    assert compare_ratio(num_a, den_a, num_b, den_b).std_error > 0.001


def test_an_arm_without_spread_beside_one_with_it_takes_the_pooled_variance():
    """100 users with no feedback at all beside 4,900 of whom 3% gave 40 each: the 100 zeros have no spread, yet
    their rate is far from known. Their variance is the two arms' pooled one, not 0."""
    control_den = np.ones(4900)
    control_num = np.zeros(4900)
    control_num[:147] = 40.0
    control_den[:147] = 40.0
    silent_num, silent_den = np.zeros(100), np.ones(100)
    result = compare_ratio(control_num, control_den, silent_num, silent_den)
    pooled = np.var(linearised(np.concatenate([control_num, silent_num]), np.concatenate([control_den, silent_den])),
                    ddof=1)
    own = np.var(linearised(control_num, control_den), ddof=1)
    assert result.std_error == pytest.approx(math.sqrt(own / 4900 + pooled / 100), rel=1e-12)
    assert result.std_error > 2 * math.sqrt(own / 4900)  # what the 100 zeros would have claimed alone
    swapped = compare_ratio(silent_num, silent_den, control_num, control_den)  # the silent arm as control
    assert swapped.std_error == pytest.approx(result.std_error, rel=1e-12)
    # With CUPED too: the adjusted silent arm keeps at least the pooled variance, and the reduction reported
    # compares like with like.
    rng = np.random.default_rng(11)
    adjusted = compare_ratio(control_num, control_den, silent_num, silent_den,
                             control_pre=control_num / control_den + rng.normal(0, 0.1, 4900),
                             candidate_pre=rng.normal(0.5, 0.1, 100))
    assert adjusted.cuped is not None and adjusted.std_error**2 >= pooled / 100
    both_flat = compare_ratio(np.zeros(50), np.ones(50), np.ones(50), np.ones(50))
    assert both_flat.std_error == 0.0  # both arms without spread: the difference is known


def test_cuped_needs_only_two_users_with_history():
    rng = np.random.default_rng(23)
    a, b = rng.normal(1, 1, 50), rng.normal(1, 1, 50)
    pre_a, pre_b = np.full(50, np.nan), np.full(50, np.nan)
    pre_a[0], pre_b[0] = a[0] - 1, b[0] + 1
    result = compare_ratio(a, _ones(50), b, _ones(50), control_pre=pre_a, candidate_pre=pre_b)
    assert result.cuped is not None and result.cuped["users_with_pre"] == [1, 1]



def test_cuped_with_history_unrelated_to_the_metric_is_not_applied():
    post = [1.0, 1.0, 0.0, 0.0]
    plain = compare_ratio(post, _ones(4), post, _ones(4))
    unrelated = compare_ratio(post, _ones(4), post, _ones(4), control_pre=[0, 1, 1, 0], candidate_pre=[0, 1, 0, 1])
    assert unrelated.cuped is None and unrelated == plain  # covariance exactly 0: theta 0, nothing to adjust
    related = compare_ratio(post, _ones(4), post, _ones(4), control_pre=[1, 1, 0, 0], candidate_pre=[0, 1, 0, 1])
    assert related.cuped is not None and related.cuped["theta"] > 0


# ---------------------------------------------------------------------------------------------- stratified


def _strata(seed: int, shift: float = 0.05) -> list[Comparison]:
    rng = np.random.default_rng(seed)
    parts = []
    for n_a, n_b, p in ((900, 100, 0.3), (500, 500, 0.6)):
        a, b = rng.binomial(1, p, n_a).astype(float), rng.binomial(1, p + shift, n_b).astype(float)
        parts.append(compare_ratio(a, _ones(n_a), b, _ones(n_b), control_pre=rng.normal(0, 1, n_a) + a,
                                   candidate_pre=rng.normal(0, 1, n_b) + b))
    return parts


def test_stratified_p_values_and_chance_to_win_follow_from_the_combined_estimate():
    parts = _strata(24)
    combined = stratified(parts, control=0.4, candidate=0.5, alpha=0.1, tuning=2000.0)
    d, se = combined.difference, combined.std_error
    assert 0.001 < combined.fixed_p_value < 0.9
    assert combined.fixed_p_value == pytest.approx(2 * sps.norm.sf(abs(d) / se), rel=1e-12)
    assert combined.fixed_ci == pytest.approx((d - sps.norm.ppf(0.95) * se, d + sps.norm.ppf(0.95) * se), rel=1e-12)
    assert combined.chance_to_win == pytest.approx(sps.norm.cdf(d / se), rel=1e-12)
    ci, p_value = sequential_interval(d, se**2, 2000, 0.1, 2000.0)
    assert combined.sequential_ci == pytest.approx(ci, rel=1e-12)
    assert combined.sequential_p_value == pytest.approx(p_value, rel=1e-12)
    assert combined.relative == pytest.approx(d / 0.4) and math.isnan(combined.dof)
    assert combined.cuped == {"strata_adjusted": 2, "variance_reduction": pytest.approx(
        np.mean([c.cuped["variance_reduction"] for c in parts]))}
    assert stratified(parts, control=0.4, candidate=0.5) == stratified(parts, control=0.4, candidate=0.5,
                                                                          alpha=0.05, tuning=5000.0)
    assert stratified(parts, control=0.0, candidate=0.5).relative is None


@pytest.mark.parametrize(("candidate", "p_value", "chance"), [(1.5, 0.0, 1.0), (0.5, 0.0, 0.0), (1.0, 1.0, 0.5)])
def test_stratified_without_spread_knows_the_difference_exactly(candidate, p_value, chance):
    part = compare_ratio([1.0, 1.0], [1.0, 1.0], [candidate] * 2, [1.0] * 2)
    combined = stratified([part, part], control=1.0, candidate=candidate)
    assert combined.fixed_ci == (candidate - 1.0, candidate - 1.0)
    assert combined.fixed_p_value == p_value and combined.chance_to_win == chance and combined.cuped is None


def test_stratified_weighs_strata_by_the_sizes_given():
    rng = np.random.default_rng(5)
    parts = [compare_ratio(rng.normal(m, 1, 200), _ones(200), rng.normal(m + shift, 1, 200), _ones(200))
             for m, shift in ((1.0, 0.3), (1.0, 0.0))]
    by_users = stratified(parts, control=1.0, candidate=1.0)
    by_arrivals = stratified(parts, control=1.0, candidate=1.0, sizes=[600, 400])
    assert by_users.difference == pytest.approx(0.5 * parts[0].difference + 0.5 * parts[1].difference)
    assert by_arrivals.difference == pytest.approx(0.6 * parts[0].difference + 0.4 * parts[1].difference)
    assert by_arrivals.std_error == pytest.approx(math.hypot(0.6 * parts[0].std_error, 0.4 * parts[1].std_error))
    with pytest.raises(ValueError, match="one size per stratum"):
        stratified(parts, control=1.0, candidate=1.0, sizes=[1])


def test_stratified_needs_a_stratum():
    with pytest.raises(ValueError, match="at least one stratum"):
        stratified([], control=0.0, candidate=0.0)


# ---------------------------------------------------------------------------------------------- relative_change


def test_relative_change_needs_two_users_on_each_side():
    assert relative_change(Estimate(1.0, 0.01, 2), Estimate(1.2, 0.01, 2)) is not None
    assert relative_change(Estimate(1.0, 0.01, 1), Estimate(1.2, 0.01, 50)) is None
    assert relative_change(Estimate(1.0, 0.01, 50), Estimate(1.2, 0.01, 1)) is None


def test_relative_change_without_spread_is_exact_and_keeps_its_keys():
    doubled = relative_change(Estimate(1.0, 0.0, 5), Estimate(2.0, 0.0, 5))
    assert doubled["relative"] == 1.0 and doubled["p_value"] == 0.0 and doubled["ci"] == [1.0, 1.0]
    same = relative_change(Estimate(1.0, 0.0, 5), Estimate(1.0, 0.0, 5))
    assert same["p_value"] == 1.0 and same["before"] == 1.0 and same["after"] == 1.0 and same["dof"] is None


# ---------------------------------------------------------------------------------------------- sample ratio


def test_sample_ratio_normalises_shares_before_judging_them():
    assert sample_ratio([630, 370], [60, 40]) == pytest.approx(sps.chisquare([630, 370], [600, 400]).pvalue, rel=1e-12)
    assert sample_ratio([630, 370], [60, 40]) == sample_ratio([630, 370], [0.6, 0.4])
    assert sample_ratio([5, 5, 0], [0.5, 0.5, 0.0]) is None  # an arm expected to be empty
    assert sample_ratio([5, 5], [1.0, -1.0]) is None


# ---------------------------------------------------------------------------------------------- quantiles


@pytest.mark.parametrize(("q", "alpha"), [(0.0, 0.05), (1.0, 0.05), (0.5, 0.0), (0.5, 1.0)])
def test_quantile_estimate_refuses_q_and_alpha_outside_0_1(q, alpha):
    with pytest.raises(ValueError, match="0 < q < 1"):
        quantile_estimate(np.arange(100.0), q, alpha)


def test_quantile_estimate_sample_size_bounds_on_both_tails():
    rng = np.random.default_rng(25)
    values = rng.lognormal(0, 1, 200)
    # n <= z^2 q / (1 - q) = 380 for q = 0.99, and n <= z^2 (1 - q) / q for q = 0.01: ranks outside the sample.
    assert quantile_estimate(values, 0.99) is None and quantile_estimate(values, 0.01) is None
    assert quantile_estimate(values[:8], 0.5) is not None  # 8 > z^2 = 3.84
    assert quantile_estimate(values[:3], 0.5) is None


def test_quantile_estimate_clamps_ranks_and_scales_with_the_data():
    rng = np.random.default_rng(26)
    values = rng.lognormal(0, 1, 60)
    q = 0.1  # n q - z sqrt(n q (1 - q)) = 6 - 4.55: the lower rank is 1
    estimate = quantile_estimate(values, q)
    ordered = np.sort(values)
    half = (ordered[math.ceil(60 * q + 1.959963984540054 * math.sqrt(60 * q * (1 - q))) - 1] - ordered[0])
    assert estimate.variance == pytest.approx(59 * (half / (2 * 1.959963984540054)) ** 2 / 60, rel=1e-9)
    small = quantile_estimate(values / 1000, q)  # an interval narrower than 1 is still an interval
    assert small.value == pytest.approx(estimate.value / 1000) and small.variance == pytest.approx(
        estimate.variance / 1e6)


def test_quantile_estimate_zero_width_is_refused_below_1000_values_only():
    assert quantile_estimate(np.ones(999), 0.5) is None
    assert quantile_estimate(np.ones(1000), 0.5) == Estimate(1.0, 0.0, 1000)


# ---------------------------------------------------------------------------------------------- reference blocks


def _beta_probability_by_quadrature(alpha_a, beta_a, alpha_b, beta_b):
    post_a, post_b = sps.beta(alpha_a, beta_a), sps.beta(alpha_b, beta_b)
    low = min(post_a.ppf(1e-13), post_b.ppf(1e-13))
    high = max(post_a.isf(1e-13), post_b.isf(1e-13))
    exact, _ = integrate.quad(lambda p: post_b.pdf(p) * post_a.cdf(p), low, high, epsabs=1e-14, epsrel=1e-12)
    return exact


def test_two_proportions_chance_to_win_is_the_beta_posterior_probability():
    x_a, n_a, x_b, n_b = 10, 50, 14, 50
    result = two_proportions(x_a, n_a, x_b, n_b, 0.05)
    exact = _beta_probability_by_quadrature(1 + x_a, 1 + n_a - x_a, 1 + x_b, 1 + n_b - x_b)
    assert 0.7 < exact < 0.9
    assert result["chance_to_win"] == pytest.approx(exact, abs=1e-10)  # computed, not sampled
    assert result["control"] == 0.2 and result["candidate"] == 0.28


@pytest.mark.parametrize("params", [
    (11, 41, 15, 37),  # the sum runs over alpha_a (the smallest)
    (41, 11, 37, 15),  # ... over beta_a
    (15, 37, 11, 41),  # ... over alpha_b
    (37, 15, 41, 11),  # ... over beta_b
    (1, 1, 1, 1), (2, 1, 1, 2), (3, 5, 30, 2), (1, 300, 2, 299), (5001, 45001, 5201, 44801),
])
def test_beta_chance_to_win_matches_quadrature_on_every_branch(params):
    assert beta_chance_to_win(*params) == pytest.approx(_beta_probability_by_quadrature(*params), abs=1e-10)


def test_beta_chance_to_win_is_symmetric_and_refuses_improper_priors():
    assert beta_chance_to_win(2, 1, 1, 2) == pytest.approx(1 / 6, abs=1e-15)  # densities 2p and 2(1 - p): 1/6 by hand
    assert beta_chance_to_win(7, 9, 7, 9) == pytest.approx(0.5, abs=1e-12)
    assert beta_chance_to_win(7, 9, 12, 4) + beta_chance_to_win(12, 4, 7, 9) == pytest.approx(1.0, abs=1e-12)
    for improper in [(0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0)]:
        with pytest.raises(ValueError, match="integers >= 1"):
            beta_chance_to_win(*improper)


def test_beta_chance_to_win_with_a_million_users_is_the_normal_limit():
    # 900,000 of 1,000,000 against 899,000: the posteriors are normal to within far less than the gap tested here
    alpha_a, beta_a, alpha_b, beta_b = 900_001, 100_001, 899_001, 101_001
    mean_a, mean_b = alpha_a / (alpha_a + beta_a), alpha_b / (alpha_b + beta_b)
    var_a = mean_a * (1 - mean_a) / (alpha_a + beta_a + 1)
    var_b = mean_b * (1 - mean_b) / (alpha_b + beta_b + 1)
    normal = sps.norm.cdf((mean_b - mean_a) / math.sqrt(var_a + var_b))
    assert 1e-3 < normal < 0.1
    assert beta_chance_to_win(alpha_a, beta_a, alpha_b, beta_b) == pytest.approx(normal, rel=1e-3)


def test_two_proportions_edges():
    assert two_proportions(1, 2, 0, 0, 0.05) is None
    nothing = two_proportions(0, 10, 0, 10, 0.05)
    assert nothing["p_value"] == 1.0 and nothing["lift"] == 0.0


def test_welch_without_spread_keeps_every_key():
    assert welch([1.0, 1.0], [3.0, 3.0], 0.05) == {"control": 1.0, "candidate": 3.0, "lift": 2.0, "ci": [2.0, 2.0],
                                                 "p_value": 0.0}
    assert welch([2.0, 2.0], [2.0, 2.0], 0.05)["p_value"] == 1.0
    spread = welch([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], 0.05)
    assert spread["control"] == 2.0 and spread["candidate"] == 4.0 and spread["lift"] == 2.0


# ---------------------------------------------------------------------------------------------- small pieces


def test_std_error_of_zero_and_of_impossible_variances():
    assert Estimate(1.0, 0.0, 5).std_error() == 0.0
    assert math.isnan(Estimate(1.0, -1.0, 5).std_error())


def test_json_ready_turns_numpy_scalars_into_python_ones():
    ready = _json_ready({"flag": np.bool_(True), "n": np.int64(3), "x": np.float32(0.5), "bad": np.float64("nan")})
    assert ready == {"flag": True, "n": 3, "x": 0.5, "bad": None}
    assert type(ready["flag"]) is bool and type(ready["n"]) is int


def test_ratio_estimate_of_one_and_two_users_and_of_a_denominator_of_one():
    one = ratio_estimate([1.0], [2.0])
    assert one.value == 0.5 and one.users == 1 and math.isnan(one.variance)
    two = ratio_estimate([1.0, 3.0], [1.0, 1.0])
    assert two.value == 2.0 and two.variance == pytest.approx(np.var([1.0, 3.0], ddof=1) / 2)
    unit = ratio_estimate([0.5, 0.0], [1.0, 0.0])  # sum(den) == 1: a defined ratio
    assert unit.value == 0.5 and not np.isnan(linearised([0.5, 0.0], [1.0, 0.0])).any()
