"""experiment.stats against gbstats 0.8.0 and scipy, plus the sanity checks that say why users are the unit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

# The reference implementation; `make test` installs it (pip install --no-deps gbstats==0.8.0). A missing
# gbstats fails the suite rather than skipping the very comparisons it exists for.
from gbstats.frequentist.tests import FrequentistConfig, SequentialConfig, SequentialTwoSidedTTest, TwoSidedTTest
from gbstats.models.statistics import (
    QuantileStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
    compute_theta,
)
from scipy import stats as sps

from experiment.stats import (
    Estimate,
    compare_quantile,
    compare_ratio,
    linearised,
    quantile_estimate,
    ratio_estimate,
    sample_ratio,
    sequential_interval,
    stratified,
    two_proportions,
    welch,
)


def clustered(rng: np.random.Generator, users: int, rate_shape: tuple[float, float] = (1.0, 2.0)):
    """Per-user (successes, requests): request counts vary by user and each user has their own success rate."""
    requests = 1 + rng.geometric(0.25, users)
    successes = rng.binomial(requests, rng.beta(*rate_shape, users))
    return successes.astype(float), requests.astype(float)


def sample_mean(values: np.ndarray) -> SampleMeanStatistic:
    return SampleMeanStatistic(n=len(values), sum=float(values.sum()), sum_squares=float((values**2).sum()))


def ratio_statistic(num: np.ndarray, den: np.ndarray) -> RatioStatistic:
    return RatioStatistic(n=len(num), m_statistic=sample_mean(num), d_statistic=sample_mean(den),
                          m_d_sum_of_products=float((num * den).sum()))


def regression_adjusted(post: np.ndarray, pre: np.ndarray) -> RegressionAdjustedStatistic:
    return RegressionAdjustedStatistic(n=len(post), post_statistic=sample_mean(post), pre_statistic=sample_mean(pre),
                                       post_pre_sum_of_products=float((post * pre).sum()), theta=0)


def test_ratio_estimate_is_gbstats_ratio_statistic_over_n():
    num, den = clustered(np.random.default_rng(1), 400)
    den[:5] = 0  # users with no requests still count as users
    num[:5] = 0
    estimate = ratio_estimate(num, den)
    reference = ratio_statistic(num, den)
    assert estimate.users == 400
    assert estimate.value == pytest.approx(reference.mean, rel=1e-12)
    assert estimate.variance == pytest.approx(reference.variance / 400, rel=1e-9)
    assert estimate.std_error() == pytest.approx(math.sqrt(reference.variance / 400), rel=1e-9)
    values = linearised(num, den)
    assert values.mean() == pytest.approx(estimate.value, rel=1e-12)
    assert np.var(values, ddof=1) == pytest.approx(reference.variance, rel=1e-9)


def test_ratio_estimate_degenerate_inputs():
    empty = ratio_estimate([0.0, 0.0], [0.0, 0.0])
    assert math.isnan(empty.value) and empty.users == 2
    assert math.isnan(ratio_estimate([1.0], [2.0]).variance)
    assert np.isnan(linearised([1.0, 2.0], [0.0, 0.0])).all()
    with pytest.raises(ValueError):
        ratio_estimate([1.0, 2.0], [1.0])


def test_compare_ratio_matches_gbstats_fixed_and_sequential():
    rng = np.random.default_rng(2)
    num_a, den_a = clustered(rng, 300)
    num_b, den_b = clustered(rng, 260, rate_shape=(1.6, 2.0))
    tuning = 2000.0
    result = compare_ratio(num_a, den_a, num_b, den_b, alpha=0.1, tuning=tuning)
    assert result is not None and result.cuped is None and result.users == (300, 260)

    fixed = TwoSidedTTest(ratio_statistic(num_a, den_a), ratio_statistic(num_b, den_b),
                          FrequentistConfig(difference_type="absolute", alpha=0.1))
    assert result.difference == pytest.approx(fixed.point_estimate, rel=1e-12)
    assert result.std_error == pytest.approx(math.sqrt(fixed.variance), rel=1e-9)
    assert result.dof == pytest.approx(fixed.dof, rel=1e-9)
    assert result.fixed_ci == pytest.approx(tuple(fixed.confidence_interval), rel=1e-9)
    assert 0.001 < fixed.p_value < 0.9  # a p-value where 2 (1 - cdf) in gbstats loses no precision
    assert result.fixed_p_value == pytest.approx(fixed.p_value, rel=1e-9)

    sequential = SequentialTwoSidedTTest(
        ratio_statistic(num_a, den_a), ratio_statistic(num_b, den_b),
        SequentialConfig(difference_type="absolute", alpha=0.1, sequential_tuning_parameter=tuning))
    assert result.sequential_ci == pytest.approx(tuple(sequential.confidence_interval), rel=1e-9)
    assert 0.01 < sequential.p_value < 1  # not clipped at 1, so the e-value formula itself is compared
    assert result.sequential_p_value == pytest.approx(sequential.p_value, rel=1e-9)

    assert result.control == pytest.approx(num_a.sum() / den_a.sum())
    assert result.relative == pytest.approx(result.difference / result.control)
    assert result.chance_to_win == pytest.approx(sps.norm.cdf(result.difference / result.std_error))


def test_compare_ratio_none_and_json():
    assert compare_ratio([1.0], [1.0], [1.0, 2.0], [1.0, 1.0]) is None
    assert compare_ratio([0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [1.0, 1.0]) is None
    constant = compare_ratio([1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0])
    assert constant is not None and constant.fixed_p_value == 1.0 and constant.chance_to_win == 0.5
    payload = constant.to_dict()
    assert payload["dof"] is None and payload["users"] == [2, 2] and payload["fixed_ci"] == [0.0, 0.0]
    json.dumps(payload, allow_nan=False)
    zero_control = compare_ratio([0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0])
    assert zero_control is not None and zero_control.relative is None


def test_mean_metric_equals_scipy_welch():
    rng = np.random.default_rng(3)
    a, b = rng.normal(3.0, 1.0, 80), rng.normal(3.3, 1.6, 120)
    result = compare_ratio(a, np.ones_like(a), b, np.ones_like(b))
    reference = sps.ttest_ind(b, a, equal_var=False)
    assert result.difference == pytest.approx(b.mean() - a.mean(), rel=1e-12)
    assert result.fixed_p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert result.dof == pytest.approx(reference.df, rel=1e-9)
    interval = reference.confidence_interval(0.95)
    assert result.fixed_ci == pytest.approx((interval.low, interval.high), rel=1e-9)


def test_cuped_on_a_mean_metric_equals_gbstats_regression_adjustment():
    rng = np.random.default_rng(4)
    pre_a, pre_b = rng.normal(5, 2, 300), rng.normal(5, 2, 340)
    post_a = 0.8 * pre_a + rng.normal(0, 1, 300)
    post_b = 0.8 * pre_b + 0.2 + rng.normal(0, 1, 340)
    pre_a[:30], pre_b[:20] = np.nan, np.nan  # users without history: imputed with the pooled mean
    result = compare_ratio(post_a, np.ones(300), post_b, np.ones(340), control_pre=pre_a, candidate_pre=pre_b,
                           tuning=1000.0)
    assert result is not None and result.cuped is not None
    assert result.cuped["users_with_pre"] == [270, 320]

    pooled = np.nanmean(np.concatenate([pre_a, pre_b]))
    x_a, x_b = np.nan_to_num(pre_a, nan=pooled), np.nan_to_num(pre_b, nan=pooled)
    stat_a, stat_b = regression_adjusted(post_a, x_a), regression_adjusted(post_b, x_b)
    theta = compute_theta(stat_a, stat_b)
    fixed = TwoSidedTTest(regression_adjusted(post_a, x_a), regression_adjusted(post_b, x_b),
                          FrequentistConfig(difference_type="absolute"))
    assert fixed.stat_a.theta == theta  # gbstats kept the adjustment (theta != 0)
    assert result.cuped["theta"] == pytest.approx(theta, rel=1e-9)
    assert result.difference == pytest.approx(fixed.point_estimate, rel=1e-9)
    assert result.std_error == pytest.approx(math.sqrt(fixed.variance), rel=1e-9)
    assert result.dof == pytest.approx(fixed.dof, rel=1e-9)
    assert result.fixed_ci == pytest.approx(tuple(fixed.confidence_interval), rel=1e-9)
    assert result.fixed_p_value == pytest.approx(fixed.p_value, rel=1e-9)
    sequential = SequentialTwoSidedTTest(regression_adjusted(post_a, x_a), regression_adjusted(post_b, x_b),
                                         SequentialConfig(difference_type="absolute", sequential_tuning_parameter=1000))
    assert result.sequential_ci == pytest.approx(tuple(sequential.confidence_interval), rel=1e-9)
    assert result.sequential_p_value == pytest.approx(sequential.p_value, rel=1e-9)
    assert result.cuped["variance_reduction"] > 0.3
    # The arm values stay unadjusted; only the difference is.
    assert result.control == pytest.approx(post_a.mean())


def test_cuped_with_uninformative_history():
    rng = np.random.default_rng(5)
    a, b = rng.normal(1, 1, 500), rng.normal(1, 1, 500)
    noise = compare_ratio(a, np.ones(500), b, np.ones(500), control_pre=rng.normal(0, 1, 500),
                          candidate_pre=rng.normal(0, 1, 500))
    assert noise is not None and noise.cuped is not None
    assert abs(noise.cuped["variance_reduction"]) < 0.02
    one_user = np.full(500, np.nan)
    one_user[0] = 1.0
    assert compare_ratio(a, np.ones(500), b, np.ones(500), control_pre=one_user,
                         candidate_pre=np.full(500, np.nan)).cuped is None
    assert compare_ratio(a, np.ones(500), b, np.ones(500), control_pre=np.full(500, 0.1),
                         candidate_pre=np.full(500, 0.1)).cuped is None
    with pytest.raises(ValueError):
        compare_ratio(a, np.ones(500), b, np.ones(500), control_pre=a)


def test_sequential_interval_is_wider_than_fixed_early_and_both_shrink():
    rng = np.random.default_rng(6)
    widths = []
    for users in (100, 400):
        a, b = rng.normal(0, 1, users), rng.normal(0.15, 1, users)
        result = compare_ratio(a, np.ones(users), b, np.ones(users), tuning=5000.0)
        fixed = result.fixed_ci[1] - result.fixed_ci[0]
        sequential = result.sequential_ci[1] - result.sequential_ci[0]
        assert sequential > fixed
        assert result.sequential_p_value >= result.fixed_p_value
        widths.append((fixed, sequential))
    assert widths[1][0] < widths[0][0] and widths[1][1] < widths[0][1]
    ci, p_value = sequential_interval(0.0, 0.0, 10, 0.05, 5000.0)
    assert ci == (0.0, 0.0) and p_value == 1.0
    assert sequential_interval(10.0, 1e-6, 1000, 0.05, 5000.0)[1] == 0.0  # huge effect: no overflow
    with pytest.raises(ValueError):
        sequential_interval(0.1, 1.0, 0, 0.05, 5000.0)


def test_two_proportions_against_an_independent_z_test():
    result = two_proportions(100, 1000, 130, 1000, 0.05)
    pooled = 230 / 2000
    z = 0.03 / math.sqrt(pooled * (1 - pooled) * 2 / 1000)
    assert result["lift"] == pytest.approx(0.03)
    assert result["p_value"] == pytest.approx(2 * sps.norm.sf(z), rel=1e-12)
    assert result["p_value"] == pytest.approx(0.0355, abs=1e-3)
    se = math.sqrt(0.1 * 0.9 / 1000 + 0.13 * 0.87 / 1000)
    assert result["ci"] == pytest.approx([0.03 - 1.959964 * se, 0.03 + 1.959964 * se], rel=1e-6)
    assert 0.95 < result["chance_to_win"] < 1.0
    assert two_proportions(0, 0, 1, 2, 0.05) is None


def test_welch_equals_scipy():
    rng = np.random.default_rng(7)
    a, b = list(rng.normal(4, 1, 50)), list(rng.normal(4.4, 2, 70))
    result = welch(a, b, 0.05)
    reference = sps.ttest_ind(b, a, equal_var=False)
    interval = reference.confidence_interval(0.95)
    assert result["p_value"] == pytest.approx(reference.pvalue, rel=1e-12)
    assert result["ci"] == pytest.approx([interval.low, interval.high], rel=1e-9)
    assert result["lift"] == pytest.approx(np.mean(b) - np.mean(a))
    assert welch([1.0], [1.0, 2.0], 0.05) is None
    assert welch([1.0, 1.0], [2.0, 2.0], 0.05)["p_value"] == 0.0


def test_sample_ratio_equals_scipy_chisquare():
    assert sample_ratio([5050, 4950], [0.5, 0.5]) == pytest.approx(sps.chisquare([5050, 4950]).pvalue, rel=1e-12)
    assert sample_ratio([5050, 4950], [0.5, 0.5]) == pytest.approx(0.3173, abs=1e-3)
    expected = sps.chisquare([770, 230], [750, 250]).pvalue
    assert 0.01 < expected < 0.5 and sample_ratio([770, 230], [0.75, 0.25]) == pytest.approx(expected, rel=1e-12)
    assert sample_ratio([0, 0], [0.5, 0.5]) is None
    assert sample_ratio([10, 0], [1.0, 0.0]) is None
    with pytest.raises(ValueError):
        sample_ratio([1, 2, 3], [0.5, 0.5])


def test_quantile_estimate():
    rng = np.random.default_rng(8)
    latencies = rng.lognormal(5, 0.5, 400)
    for q in (0.5, 0.95):
        estimate = quantile_estimate(latencies, q)
        assert isinstance(estimate, Estimate) and estimate.users == 400
        assert estimate.value == np.quantile(latencies, q)
        ordered = np.sort(latencies)
        low, high = np.quantile(latencies, [q - 0.05, q + 0.05])
        assert ordered[0] < low and high <= ordered[-1]
        assert 0 < estimate.std_error() < (high - low)
        # order statistics at the normal-approximation binomial ranks n q -+ z sqrt(n q (1 - q)), then gbstats
        half = 1.959963984540054 * math.sqrt(400 * q * (1 - q))
        lower, upper = ordered[math.floor(400 * q - half) - 1], ordered[math.ceil(400 * q + half) - 1]
        reference = QuantileStatistic(n=400, n_star=400, nu=q, quantile_hat=estimate.value, quantile_lower=lower,
                                      quantile_upper=upper)
        assert not reference._has_zero_variance
        assert estimate.variance == pytest.approx(reference.variance_init / 400, rel=1e-12)
    assert quantile_estimate(latencies[:50], 0.99) is None  # 50 <= 1.96^2 * 0.99 / 0.01: ranks outside the sample
    assert quantile_estimate(np.ones(50), 0.5) is None  # zero-width interval on few values
    with pytest.raises(ValueError):
        quantile_estimate(latencies, 1.0)


@pytest.mark.parametrize(("seed", "rounding"), [(1, None), (2, None), (3, None), (1, -2), (2, -2)])
def test_the_clustered_quantile_is_gbstats_quantile_clustered_statistic(seed, rounding):
    """Heavy users with a latency level of their own: the variance gbstats' QuantileClusteredStatistic gives,
    from the sums GrowthBook's SQL computes (per user: requests at or below the quantile, and requests).
    Latencies rounded to 100 ms put many values on the quantile itself: "at or below" counts them."""
    from gbstats.models.statistics import QuantileClusteredStatistic

    rng = np.random.default_rng(seed)
    requests = np.minimum(rng.pareto(1.2, 300).astype(int) + 1, 200)
    level = rng.lognormal(math.log(800), 0.6, 300)
    latencies = np.concatenate([scale * rng.lognormal(0, 0.3, r) for scale, r in zip(level, requests, strict=True)])
    users = np.repeat(np.arange(300), requests)
    order = rng.permutation(latencies.size)  # the rows' order does not matter
    latencies, users = latencies[order], users[order]
    if rounding is not None:
        latencies = np.round(latencies, rounding)
    q, n = 0.95, latencies.size
    clustered = quantile_estimate(latencies, q, clusters=users)
    if rounding is not None:
        assert (latencies == clustered.value).sum() > 1  # the tie this case is for
    independent = quantile_estimate(latencies, q)
    ordered = np.sort(latencies)
    half = 1.959963984540054 * math.sqrt(n * q * (1 - q))
    below = np.bincount(users, weights=(latencies <= clustered.value).astype(float))
    count = np.bincount(users).astype(float)
    reference = QuantileClusteredStatistic(
        n=n, n_star=n, nu=q, quantile_hat=clustered.value, quantile_lower=ordered[math.floor(n * q - half) - 1],
        quantile_upper=ordered[math.ceil(n * q + half) - 1], main_sum=below.sum(), main_sum_squares=(below**2).sum(),
        denominator_sum=count.sum(), denominator_sum_squares=(count**2).sum(),
        main_denominator_sum_product=(below * count).sum(), n_clusters=300)
    assert clustered.value == independent.value == np.quantile(latencies, q)
    assert clustered.variance == pytest.approx(reference.variance / n, rel=1e-9)
    assert clustered.variance > 2 * independent.variance  # what taking requests as independent hid


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_compare_quantile_is_gbstats_sequential_test_of_two_quantile_statistics(shift):
    from gbstats.models.statistics import QuantileStatistic

    rng = np.random.default_rng(5)
    a, b = rng.lognormal(5, 0.5, 900), rng.lognormal(5 + shift, 0.5, 1100)
    q = 0.95

    def statistic(x: np.ndarray) -> QuantileStatistic:
        n, ordered = x.size, np.sort(x)
        half = 1.959963984540054 * math.sqrt(n * q * (1 - q))
        return QuantileStatistic(n=n, n_star=n, nu=q, quantile_hat=float(np.quantile(x, q)),
                                 quantile_lower=ordered[math.floor(n * q - half) - 1],
                                 quantile_upper=ordered[math.ceil(n * q + half) - 1])

    config = SequentialConfig(difference_type="absolute", sequential_tuning_parameter=5000)
    reference = SequentialTwoSidedTTest(statistic(a), statistic(b), config).compute_result()
    got = compare_quantile(a, b, q)
    assert got.difference == pytest.approx(reference.expected, rel=1e-12)
    assert got.sequential_ci == pytest.approx(reference.ci, rel=1e-9)
    assert got.sequential_p_value == pytest.approx(min(reference.p_value, 1.0), rel=1e-9, abs=1e-300)
    assert (got.control, got.candidate, got.users) == (np.quantile(a, q), np.quantile(b, q), (900, 1100))
    assert (got.sequential_p_value < 0.05) == (shift > 0)
    assert compare_quantile(a[:50], b, q) is None  # 50 values cannot place a p95


def test_one_request_per_user_is_clustered_about_as_independent():
    rng = np.random.default_rng(4)
    latencies = rng.lognormal(5, 0.5, 2000)
    clustered = quantile_estimate(latencies, 0.95, clusters=np.arange(2000))
    assert clustered.variance == pytest.approx(quantile_estimate(latencies, 0.95).variance, rel=0.02)
    assert quantile_estimate(latencies, 0.95, clusters=np.zeros(2000)) is None  # one user: no clusters to compare
    with pytest.raises(ValueError, match="one id per value"):
        quantile_estimate(latencies, 0.95, clusters=np.arange(10))


def test_users_are_the_unit_delta_method_matches_simulation_and_per_request_binomial_does_not():
    """Requests of one user share that user's rate, so the ratio varies more than a per-request binomial says."""
    rng = np.random.default_rng(9)
    reps, users = 1000, 200
    requests = 1 + rng.geometric(0.25, (reps, users))
    successes = rng.binomial(requests, rng.beta(1, 2, (reps, users)))
    ratios = successes.sum(axis=1) / requests.sum(axis=1)
    empirical = ratios.var(ddof=1)
    delta = np.mean([ratio_estimate(successes[i], requests[i]).variance for i in range(reps)])
    naive = np.mean(ratios * (1 - ratios) / requests.sum(axis=1))
    assert delta == pytest.approx(empirical, rel=0.2)
    assert naive < 0.6 * empirical


def test_stratified_weights_each_phase_by_its_users_and_adds_variances_so():
    rng = np.random.default_rng(11)
    parts, sizes = [], []
    for n_a, n_b, p in ((900, 100, 0.3), (500, 500, 0.6)):
        a, b = rng.binomial(1, p, n_a).astype(float), rng.binomial(1, p + 0.05, n_b).astype(float)
        parts.append(compare_ratio(a, np.ones(n_a), b, np.ones(n_b)))
        sizes.append(n_a + n_b)
    combined = stratified(parts, control=0.4, candidate=0.5, alpha=0.05, tuning=5000)
    w = np.array(sizes) / sum(sizes)
    assert combined.difference == pytest.approx(w[0] * parts[0].difference + w[1] * parts[1].difference)
    assert combined.std_error == pytest.approx(np.sqrt(w[0] ** 2 * parts[0].std_error ** 2
                                                       + w[1] ** 2 * parts[1].std_error ** 2))
    assert combined.users == (1400, 600)
    assert combined.sequential_ci == pytest.approx(sequential_interval(combined.difference, combined.std_error ** 2,
                                                                       2000, 0.05, 5000)[0])
    low, high = combined.fixed_ci
    assert (high - low) / 2 == pytest.approx(1.959964 * combined.std_error, rel=1e-5)
    assert stratified(parts[:1], control=0.0, candidate=0.0) is parts[0]
