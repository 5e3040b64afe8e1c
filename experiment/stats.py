"""The statistics core of the experiment engine: pure functions on arrays, no I/O.

The unit of analysis is the user, because users (not requests) are what assignment randomises: requests of one
user are correlated, so treating them as independent understates the variance. Every per-request rate is therefore a
ratio of per-user sums, analysed with the delta method; a per-user mean is the special case with denominator 1.

The formulas follow gbstats 0.8.0 (GrowthBook's engine) so that the numbers can be checked against it:
`gbstats/models/statistics.py` (RatioStatistic, RegressionAdjustedStatistic, compute_theta, QuantileStatistic) and
`gbstats/frequentist/tests.py` (TTest.dof, TwoSidedTTest, SequentialTwoSidedTTest). All differences are absolute
(candidate - control); the relative lift is reported alongside but not tested. The one relative comparison is
`relative_change` (one week against the last, for the weekly report).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import betaln
from scipy.stats import chisquare, norm, t, ttest_ind

__all__ = [
    "Comparison",
    "Estimate",
    "beta_chance_to_win",
    "compare_ratio",
    "linearised",
    "quantile_estimate",
    "ratio_estimate",
    "relative_change",
    "sample_ratio",
    "sequential_interval",
    "stratified",
    "two_proportions",
    "welch",
]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with the variance of the estimator itself (not the per-user variance)."""

    value: float
    variance: float
    users: int

    def std_error(self) -> float:
        return math.sqrt(self.variance) if self.variance >= 0 else math.nan


def _pair(num: ArrayLike, den: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    num_arr, den_arr = np.asarray(num, dtype=float).ravel(), np.asarray(den, dtype=float).ravel()
    if num_arr.shape != den_arr.shape:
        raise ValueError(f"numerator and denominator differ in length: {num_arr.size} != {den_arr.size}")
    return num_arr, den_arr


def linearised(num: ArrayLike, den: ArrayLike) -> np.ndarray:
    """Per-user influence values of the ratio R = sum(num) / sum(den): R + (num_i - R den_i) / mean(den).

    Their mean is R and their sample variance (ddof=1) is the delta-method per-user variance of R, the same number as
    gbstats RatioStatistic.variance: var_m/mu_d^2 - 2 cov mu_m/mu_d^3 + mu_m^2 var_d/mu_d^4 equals
    var(num - R den)/mu_d^2 because R = mu_m/mu_d. Turning a ratio into a per-user mean is what lets CUPED and the
    t-tests treat ratio metrics exactly like mean metrics. All nan when sum(den) == 0 (the ratio is undefined).
    """
    num_arr, den_arr = _pair(num, den)
    if num_arr.size == 0 or den_arr.sum() == 0:
        return np.full(num_arr.shape, np.nan)
    mean_den = den_arr.mean()
    ratio = num_arr.sum() / den_arr.sum()
    return ratio + (num_arr - ratio * den_arr) / mean_den


def ratio_estimate(num: ArrayLike, den: ArrayLike) -> Estimate:
    """sum(num) / sum(den) over users, with the delta-method variance of that ratio (gbstats RatioStatistic).

    Estimate.variance is RatioStatistic.variance / n. Computed as the sample variance of the linearised values, which
    is algebraically the gbstats formula but free of the cancellation in sum-of-squares forms. Degenerate inputs give
    nan rather than gbstats' 0: an undefined ratio (sum(den) == 0) or a single user has no usable variance.
    """
    num_arr, den_arr = _pair(num, den)
    n = int(num_arr.size)
    if n == 0 or den_arr.sum() == 0:
        return Estimate(math.nan, math.nan, n)
    value = float(num_arr.sum() / den_arr.sum())
    if n < 2:
        return Estimate(value, math.nan, n)
    return Estimate(value, float(np.var(linearised(num_arr, den_arr), ddof=1)) / n, n)


@dataclass(frozen=True)
class Comparison:
    """Candidate against control on one metric, by user.

    `control` and `candidate` are the unadjusted arm values (what a reader expects to see); `difference` is
    candidate - control after CUPED when it was applied, so it can differ slightly from candidate - control.
    Fixed-horizon numbers are valid only for a single look; the sequential ones stay valid under continuous monitoring
    and are what decisions use.
    """

    control: float
    candidate: float
    difference: float
    relative: float | None
    std_error: float
    dof: float
    fixed_ci: tuple[float, float]
    fixed_p_value: float
    sequential_ci: tuple[float, float]
    sequential_p_value: float
    chance_to_win: float
    users: tuple[int, int]
    cuped: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists, nan and infinities become None (JSON has neither)."""
        return _json_ready(asdict(self))


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_ready(item) for item in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


@dataclass(frozen=True)
class _Arm:
    """One arm as gbstats sees it: the mean of per-user values and their per-user (ddof=1) variance."""

    mean: float
    variance: float
    n: int


def _welch_dof(a: _Arm, b: _Arm) -> float:
    # Welch-Satterthwaite, exactly gbstats TTest.dof (frequentist/tests.py).
    var_a, var_b = a.variance / a.n, b.variance / b.n
    denominator = var_b**2 / (b.n - 1) + var_a**2 / (a.n - 1)
    return (var_a + var_b) ** 2 / denominator if denominator > 0 else math.nan


def _fixed(difference: float, variance: float, dof: float, alpha: float) -> tuple[tuple[float, float], float]:
    # gbstats TwoSidedTTest: p = 2 (1 - F_t(|d| / se)), ci = d -+ t_{1-alpha/2, dof} se. t.sf keeps small p exact.
    se = math.sqrt(variance)
    width = float(t.ppf(1 - alpha / 2, dof)) * se
    p_value = float(2 * t.sf(abs(difference) / se, dof))
    return (difference - width, difference + width), min(p_value, 1.0)


def sequential_interval(difference: float, variance: float, n_total: int, alpha: float,
                        tuning: float) -> tuple[tuple[float, float], float]:
    """Always-valid two-sided interval and p-value for a difference (gbstats SequentialTwoSidedTTest).

    Asymptotic confidence sequence of Waudby-Smith et al. 2023 (arXiv 2103.06476v7): valid uniformly over time, so
    the experiment can be evaluated every hour without inflating false decisions. `variance` is the variance of the
    difference (sum over arms of per-user variance / n), `n_total` the users in both arms, `tuning` the sample size
    at which the interval is tightest relative to a fixed one (gbstats' sequential_tuning_parameter).
    """
    if n_total < 1 or not 0 < alpha < 1 or tuning <= 0:
        raise ValueError(f"need n_total >= 1, 0 < alpha < 1, tuning > 0; got {n_total}, {alpha}, {tuning}")
    if math.isnan(variance) or math.isnan(difference):  # not "no spread": a nan would read as certainty below
        raise ValueError(f"need a difference and a variance that are numbers; got {difference}, {variance}")
    if not variance > 0:
        p_value = 1.0 if difference == 0 else 0.0
        return (difference, difference), p_value
    n = float(n_total)
    # eq 161: rho chosen so that the boundary is tightest at n = tuning.
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / tuning
    # eq 9: half-width sqrt(s2) sqrt(2 (N rho^2 + 1) log(sqrt(N rho^2 + 1) / alpha) / (N rho)^2), s2 per-unit variance.
    s2 = variance * n
    tr2p1 = n * rho2 + 1
    width = math.sqrt(s2) * math.sqrt(2 * tr2p1 * math.log(math.sqrt(tr2p1) / alpha) / (n * n * rho2))
    # eq 155: p = min(1, 1 / e-value), e-value = exp(rho^2 S_t^2 / (2 (N rho^2 + 1))) / sqrt(N rho^2 + 1); in logs so a
    # large effect cannot overflow.
    st2 = difference**2 * n / variance
    log_evalue = rho2 * st2 / (2 * tr2p1) - 0.5 * math.log(tr2p1)
    p_value = math.exp(-log_evalue) if log_evalue > 0 else 1.0
    return (difference - width, difference + width), p_value


def _cuped(post_a: np.ndarray, post_b: np.ndarray, pre_a: np.ndarray,
           pre_b: np.ndarray) -> tuple[_Arm, _Arm, dict[str, Any]] | None:
    """Regression adjustment (CUPED, Deng et al. 2013) as gbstats RegressionAdjustedStatistic; None if not applicable.

    Missing pre values are imputed with the pooled mean of the present ones, which keeps every user in the analysis
    (dropping users without history would bias the comparison) while their pre term adds no information.
    """
    present_a, present_b = ~np.isnan(pre_a), ~np.isnan(pre_b)
    present = np.concatenate([pre_a[present_a], pre_b[present_b]])
    if present.size < 2 or np.ptp(present) == 0:  # exact test: np.var of a constant can round above 0
        return None
    pooled_mean = present.mean()
    x_a, x_b = np.where(present_a, pre_a, pooled_mean), np.where(present_b, pre_b, pooled_mean)
    # gbstats compute_theta: covariance over variance of the *joint* sample (both arms pooled, one grand mean).
    x, y = np.concatenate([x_a, x_b]), np.concatenate([post_a, post_b])
    if np.ptp(y) == 0:
        return None  # gbstats returns theta 0 and falls back to the unadjusted statistic
    theta = float(np.cov(y, x, ddof=1)[0, 1] / np.var(x, ddof=1))
    if theta == 0:
        return None

    def adjusted(post: np.ndarray, pre: np.ndarray) -> _Arm:
        # RegressionAdjustedStatistic: mean = post mean - theta pre mean; variance = var(post) + theta^2 var(pre)
        # - 2 theta cov(post, pre), i.e. the ddof=1 variance of post - theta pre within the arm.
        return _Arm(float(post.mean() - theta * pre.mean()), float(np.var(post - theta * pre, ddof=1)), post.size)

    info = {"theta": theta, "users_with_pre": [int(present_a.sum()), int(present_b.sum())]}
    return adjusted(post_a, x_a), adjusted(post_b, x_b), info


def compare_ratio(control_num: ArrayLike, control_den: ArrayLike, candidate_num: ArrayLike,
                  candidate_den: ArrayLike, *, alpha: float = 0.05, tuning: float = 5000.0,
                  control_pre: ArrayLike | None = None, candidate_pre: ArrayLike | None = None) -> Comparison | None:
    """Compare a ratio metric between arms, one array entry per user; None when an arm cannot be analysed.

    Each arm's ratio is linearised into per-user values whose mean is the ratio and whose variance is the
    delta-method variance, then the two per-user samples are compared as gbstats does for absolute differences:
    Welch t (fixed horizon), the always-valid sequential interval, and P(candidate > control) under a flat prior.
    With `control_pre` and `candidate_pre` (the same metric per user before the experiment, nan where unknown) the
    difference is CUPED-adjusted, which narrows the intervals by the share of variance the history explains.
    """
    num_a, den_a = _pair(control_num, control_den)
    num_b, den_b = _pair(candidate_num, candidate_den)
    # One user with a non-zero denominator makes every linearised value 0 (up to rounding): a variance of
    # nothing, not of zero. gbstats refuses it too (ZERO_NEGATIVE_VARIANCE); Policy.min_responders_per_arm
    # asks for more before deciding.
    if num_a.size < 2 or num_b.size < 2 or np.count_nonzero(den_a) < 2 or np.count_nonzero(den_b) < 2:
        return None
    if (control_pre is None) != (candidate_pre is None):
        raise ValueError("give pre-experiment values for both arms or for neither")
    post_a, post_b = linearised(num_a, den_a), linearised(num_b, den_b)
    floor_a, floor_b = _variance_floors(post_a, post_b, num_a, den_a, num_b, den_b)
    raw_a = _floored(_Arm(float(num_a.sum() / den_a.sum()), float(np.var(post_a, ddof=1)), num_a.size), floor_a)
    raw_b = _floored(_Arm(float(num_b.sum() / den_b.sum()), float(np.var(post_b, ddof=1)), num_b.size), floor_b)
    arm_a, arm_b, cuped = raw_a, raw_b, None
    if control_pre is not None and candidate_pre is not None:
        pre_a, pre_b = np.asarray(control_pre, dtype=float).ravel(), np.asarray(candidate_pre, dtype=float).ravel()
        if pre_a.shape != post_a.shape or pre_b.shape != post_b.shape:
            raise ValueError("pre-experiment arrays must have one entry per user of their arm")
        adjusted = _cuped(post_a, post_b, pre_a, pre_b)
        if adjusted is not None:
            arm_a, arm_b, cuped = adjusted
    # The floors again after CUPED, so that variance_reduction compares like with like.
    arm_a, arm_b = _floored(arm_a, floor_a), _floored(arm_b, floor_b)
    difference = arm_b.mean - arm_a.mean
    variance = arm_a.variance / arm_a.n + arm_b.variance / arm_b.n  # gbstats frequentist_variance, absolute
    if cuped is not None:
        unadjusted = raw_a.variance / raw_a.n + raw_b.variance / raw_b.n
        cuped["variance_reduction"] = 1 - variance / unadjusted if unadjusted > 0 else 0.0
    relative = difference / raw_a.mean if raw_a.mean != 0 else None
    users = (raw_a.n, raw_b.n)
    sequential_ci, sequential_p = sequential_interval(difference, variance, raw_a.n + raw_b.n, alpha, tuning)
    if variance > 0:
        dof = _welch_dof(arm_a, arm_b)
        fixed_ci, fixed_p = _fixed(difference, variance, dof, alpha)
        chance = float(norm.cdf(difference / math.sqrt(variance)))
    else:  # no spread in either arm: the difference is known exactly
        dof, fixed_ci = math.nan, (difference, difference)
        fixed_p = 1.0 if difference == 0 else 0.0
        chance = _exact_chance(difference)
    return Comparison(control=raw_a.mean, candidate=raw_b.mean, difference=difference, relative=relative,
                      std_error=math.sqrt(variance), dof=dof, fixed_ci=fixed_ci, fixed_p_value=fixed_p,
                      sequential_ci=sequential_ci, sequential_p_value=sequential_p, chance_to_win=chance, users=users,
                      cuped=cuped)


def _exact_chance(difference: float) -> float:
    """P(candidate > control) for a difference known without error."""
    return 0.5 if difference == 0 else float(difference > 0)


def _variance_floors(post_a: np.ndarray, post_b: np.ndarray, num_a: np.ndarray, den_a: np.ndarray,
                     num_b: np.ndarray, den_b: np.ndarray) -> tuple[float, float]:
    """Per arm, the least per-user variance to use: the two arms' pooled one for an arm without spread (every user
    the same ratio: no feedback at all, every thumb down) beside one with it; 0 otherwise.

    A hundred users none of whom gave feedback, beside thousands of whom 3% did, have a delta-method variance of
    0, and the interval would be as narrow as if their rate were known; under the null of no difference the arm's
    spread is the pooled one (gbstats reports nothing for an arm with zero variance). Both arms without spread
    keep their exact difference.
    """
    flat_a, flat_b = _no_spread(post_a), _no_spread(post_b)
    if flat_a == flat_b:
        return 0.0, 0.0
    pooled = float(np.var(linearised(np.concatenate([num_a, num_b]), np.concatenate([den_a, den_b])), ddof=1))
    return (pooled, 0.0) if flat_a else (0.0, pooled)


def _floored(arm: _Arm, floor: float) -> _Arm:
    return arm if arm.variance >= floor else _Arm(arm.mean, floor, arm.n)


def _no_spread(values: np.ndarray) -> bool:
    return float(np.ptp(values)) <= 1e-9 * max(1.0, float(np.abs(values).max()))


def relative_change(before: Estimate, after: Estimate, alpha: float = 0.05) -> dict[str, Any] | None:
    """after / before - 1 of two independent estimates (two weeks, say), with its interval; None if undefined.

    The first-order delta method on the ratio of two independent estimators, as gbstats computes relative lifts
    (frequentist_variance with relative=True): var = var_after / before^2 + after^2 var_before / before^4, each var the
    variance of the estimator (Estimate.variance, e.g. from ratio_estimate). Interval and p-value as gbstats
    TwoSidedTTest: Student t on the Welch-Satterthwaite degrees of freedom of the two per-user samples. Undefined when
    `before` is 0, a value or variance is nan, an estimate rests on fewer than two users, or the variance degenerates
    to 0 while a sample had spread (`after` is 0 with no spread: the formula would claim the change exactly).
    """
    values = (before.value, after.value, before.variance, after.variance)
    if before.users < 2 or after.users < 2 or any(math.isnan(v) for v in values) or before.value == 0:
        return None
    relative = after.value / before.value - 1
    variance = after.variance / before.value**2 + after.value**2 * before.variance / before.value**4
    if variance > 0:
        dof = _welch_dof(_Arm(before.value, before.variance * before.users, before.users),
                         _Arm(after.value, after.variance * after.users, after.users))
        ci, p_value = _fixed(relative, variance, dof, alpha)
    elif before.variance == 0 and after.variance == 0:  # no spread in either sample: the change is known exactly
        dof, ci, p_value = math.nan, (relative, relative), 1.0 if relative == 0 else 0.0
    else:
        return None
    return _json_ready({"before": before.value, "after": after.value, "relative": relative,
                        "std_error": math.sqrt(variance), "ci": ci, "p_value": p_value, "dof": dof,
                        "users": (before.users, after.users)})


def stratified(strata: Sequence[Comparison], *, control: float, candidate: float, alpha: float = 0.05,
               tuning: float = 5000.0, sizes: Sequence[float] | None = None) -> Comparison:
    """One comparison from per-stratum comparisons (post-stratification), weighted by users in each stratum.

    `sizes`: each stratum's weight when it is not its users in the comparison (experiment.analysis passes the
    users first seen in the phase, those left out by bucket included: the compared ones stand for all of them).

    A ramp changes the share between phases, so the arms draw their users from the phases in different
    proportions; pooling them turns any change over time (a weekday, a novelty effect, a drift in taste) into a
    false treatment effect. Comparing within each phase of first assignment, where the split was random at one
    share, and averaging with fixed weights w_k = n_k / n removes that bias: difference = sum w_k d_k,
    variance = sum w_k^2 var_k. The fixed-horizon interval uses the normal quantile (the strata's Welch degrees
    of freedom do not combine into one); the sequential interval is the same always-valid formula on the combined
    estimate. `control` and `candidate` are the pooled arm values, for display.
    """
    if not strata:
        raise ValueError("stratified needs at least one stratum")
    if len(strata) == 1:
        return strata[0]
    if sizes is not None and len(sizes) != len(strata):
        raise ValueError("give one size per stratum")
    counts = np.array([sum(c.users) for c in strata] if sizes is None else sizes, dtype=float)
    weights = counts / counts.sum()
    difference = float(sum(w * c.difference for w, c in zip(weights, strata, strict=True)))
    variance = float(sum(w**2 * c.std_error**2 for w, c in zip(weights, strata, strict=True)))
    users = (sum(c.users[0] for c in strata), sum(c.users[1] for c in strata))
    sequential_ci, sequential_p = sequential_interval(difference, variance, sum(users), alpha, tuning)
    if variance > 0:
        se = math.sqrt(variance)
        z = float(norm.ppf(1 - alpha / 2))
        fixed_ci = (difference - z * se, difference + z * se)
        fixed_p = float(2 * norm.sf(abs(difference) / se))
        chance = float(norm.cdf(difference / se))
    else:
        fixed_ci, fixed_p = (difference, difference), 1.0 if difference == 0 else 0.0
        chance = _exact_chance(difference)
    cuped = None
    reductions = [c.cuped for c in strata if c.cuped]
    if reductions:
        cuped = {"strata_adjusted": len(reductions), "variance_reduction": float(np.mean(
            [r["variance_reduction"] for r in reductions]))}
    return Comparison(control=control, candidate=candidate, difference=difference,
                      relative=difference / control if control else None, std_error=math.sqrt(variance), dof=math.nan,
                      fixed_ci=fixed_ci, fixed_p_value=fixed_p, sequential_ci=sequential_ci,
                      sequential_p_value=sequential_p, chance_to_win=chance, users=users, cuped=cuped)


def sample_ratio(observed: Sequence[int], shares: Sequence[float]) -> float | None:
    """Chi-square goodness-of-fit p-value of users per arm against the configured shares (sample ratio mismatch).

    A tiny p-value means assignment or logging is broken and no comparison can be trusted. Shares are normalised to
    sum to 1 (so [60, 40] means [0.6, 0.4]). None when there is nothing to test: no users, or an arm whose share is
    0 or all of it (an arm expected to be empty).
    """
    if len(observed) != len(shares):
        raise ValueError(f"{len(observed)} counts for {len(shares)} shares")
    total = sum(observed)
    if total == 0 or any(share < 0 for share in shares) or sum(shares) <= 0:
        return None
    weights = np.asarray(shares, dtype=float) / sum(shares)
    if any(weight <= 0 or weight >= 1 for weight in weights):
        return None
    return float(chisquare(np.asarray(observed, dtype=float), total * weights).pvalue)


def quantile_estimate(values: ArrayLike, q: float, alpha: float = 0.05,
                      clusters: ArrayLike | None = None) -> Estimate | None:
    """Sample quantile (np.quantile's default 'linear' definition) with a distribution-free variance.

    The interval [X_(l), X_(u)] between order statistics at ranks n q -+ z sqrt(n q (1 - q)) (the normal approximation
    to the Binomial(n, q) count below the quantile) covers the true quantile with about 1 - alpha probability whatever
    the distribution. As in gbstats QuantileStatistic.variance_init with n_star = n, the per-unit variance is
    (n - 1) ((upper - lower) / (2 z))^2, and Estimate.variance is that / n, the variance of the quantile itself.
    None when the ranks would fall outside the sample (gbstats _has_zero_variance: n <= z^2 q / (1 - q) or
    n <= z^2 (1 - q) / q) or when the interval has zero width on fewer than 1000 values. nan values are ignored.

    `clusters` (one id per value: the user who made the request) makes it gbstats' QuantileClusteredStatistic:
    requests are not independent when users are what was randomised, and one user's are alike, so the variance
    is scaled by the design effect of the share of values at or below the quantile (the delta-method variance of
    that share over clusters, over its independent-values variance q (1 - q) / n). None with fewer than 2 clusters.
    """
    if not 0 < q < 1 or not 0 < alpha < 1:
        raise ValueError(f"need 0 < q < 1 and 0 < alpha < 1; got {q}, {alpha}")
    raw = np.asarray(values, dtype=float).ravel()
    known = ~np.isnan(raw)
    data = np.sort(raw[known])
    n = int(data.size)
    z = float(norm.ppf(1 - alpha / 2))
    if n < 2 or n <= z * z * q / (1 - q) or n <= z * z * (1 - q) / q:
        return None
    half = z * math.sqrt(n * q * (1 - q))
    lower_rank = max(1, math.floor(n * q - half))  # 1-based ranks, rounded outwards (conservative)
    upper_rank = min(n, math.ceil(n * q + half))
    width = float(data[upper_rank - 1] - data[lower_rank - 1])
    if width <= 0 and n < 1000:
        return None
    value = float(np.quantile(data, q))
    variance = (n - 1) * (width / (2 * z)) ** 2 / n
    if clusters is not None:
        ids = np.asarray(clusters).ravel()
        if ids.shape != raw.shape:
            raise ValueError("clusters must give one id per value")
        effect = _design_effect(raw[known] <= value, ids[known], q)
        if effect is None:
            return None
        variance *= effect
    return Estimate(value, variance, n)


def compare_quantile(control: ArrayLike, candidate: ArrayLike, q: float, *, alpha: float = 0.05,
                     tuning: float = 5000.0, control_clusters: ArrayLike | None = None,
                     candidate_clusters: ArrayLike | None = None) -> Comparison | None:
    """The difference (candidate - control) of a quantile of per-request values, e.g. latency; None when either
    arm's quantile has no variance (`quantile_estimate`). Units are values (requests), not users: `users` counts
    values, and the always-valid interval is sized by them."""
    a = quantile_estimate(control, q, alpha, clusters=control_clusters)
    b = quantile_estimate(candidate, q, alpha, clusters=candidate_clusters)
    if a is None or b is None:
        return None
    difference, variance = b.value - a.value, a.variance + b.variance
    sequential_ci, sequential_p = sequential_interval(difference, variance, a.users + b.users, alpha, tuning)
    se = math.sqrt(variance)
    z = float(norm.ppf(1 - alpha / 2))
    fixed_p = float(2 * norm.sf(abs(difference) / se)) if se > 0 else float(difference == 0)
    return Comparison(control=a.value, candidate=b.value, difference=difference,
                      relative=difference / a.value if a.value else None, std_error=se, dof=math.nan,
                      fixed_ci=(difference - z * se, difference + z * se), fixed_p_value=fixed_p,
                      sequential_ci=sequential_ci, sequential_p_value=sequential_p,
                      chance_to_win=float(norm.cdf(difference / se)) if se > 0 else _exact_chance(difference),
                      users=(a.users, b.users), cuped=None)


def _design_effect(at_or_below: np.ndarray, clusters: np.ndarray, q: float) -> float | None:
    """gbstats QuantileClusteredStatistic: v_nu_cluster / v_nu_iid for the share of values at or below the quantile."""
    _ids, index = np.unique(clusters, return_inverse=True)
    k = int(index.max()) + 1 if index.size else 0
    if k < 2:
        return None
    below = np.bincount(index, weights=at_or_below.astype(float), minlength=k)
    count = np.bincount(index, minlength=k).astype(float)
    mean_below, mean_count = float(below.mean()), float(count.mean())
    covariance = np.cov(below, count, ddof=1)
    cluster_variance = (covariance[0, 0] - 2 * mean_below * covariance[0, 1] / mean_count
                        + mean_below**2 * covariance[1, 1] / mean_count**2) / (k * mean_count**2)
    return float(cluster_variance / (q * (1 - q) / at_or_below.size))


# Fixed-horizon, per-request reference blocks, kept in the report next to the by-user analysis. Moved unchanged from
# store/arms.py (same keys, same numbers).


def two_proportions(x_a: int, n_a: int, x_b: int, n_b: int, alpha: float) -> dict[str, Any] | None:
    """Lift (b - a) of a rate with a Wald interval, a pooled z-test, and P(b > a) under Beta(1, 1) priors."""
    if n_a == 0 or n_b == 0:
        return None
    p_a, p_b = x_a / n_a, x_b / n_b
    lift = p_b - p_a
    se = np.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    pooled = (x_a + x_b) / (n_a + n_b)
    se_pooled = np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    p_value = float(2 * norm.sf(abs(lift) / se_pooled)) if se_pooled > 0 else 1.0
    z = norm.ppf(1 - alpha / 2)
    chance = beta_chance_to_win(1 + x_a, 1 + n_a - x_a, 1 + x_b, 1 + n_b - x_b)
    return {"control": p_a, "candidate": p_b, "lift": lift, "ci": [lift - z * se, lift + z * se],
            "p_value": p_value, "chance_to_win": chance}


def beta_chance_to_win(alpha_a: int, beta_a: int, alpha_b: int, beta_b: int) -> float:
    """P(p_b > p_a) for independent p_a ~ Beta(alpha_a, beta_a), p_b ~ Beta(alpha_b, beta_b), integer parameters.

    Exact, not sampled: the closed form of Cook (2005) / Miller (2015), a sum of alpha_b terms evaluated in logs.
    By the symmetries P(b > a) = 1 - P(a > b) and p -> 1 - p (which swaps each Beta's parameters), the sum can run
    over any of the four parameters, so it runs over the smallest: min(successes, failures) + 1 terms, vectorised.
    """
    smallest = min(alpha_a, beta_a, alpha_b, beta_b)
    if smallest < 1:
        raise ValueError("Beta parameters must be integers >= 1")
    if smallest == alpha_b:
        chance = _beta_sum(alpha_a, beta_a, alpha_b, beta_b)
    elif smallest == beta_a:  # P(p_b > p_a) = P(1 - p_a > 1 - p_b)
        chance = _beta_sum(beta_b, alpha_b, beta_a, alpha_a)
    elif smallest == alpha_a:
        chance = 1.0 - _beta_sum(alpha_b, beta_b, alpha_a, beta_a)
    else:
        chance = 1.0 - _beta_sum(beta_a, alpha_a, beta_b, alpha_b)
    return min(1.0, max(0.0, chance))


def _beta_sum(alpha_a: int, beta_a: int, alpha_b: int, beta_b: int) -> float:
    """sum_{i<alpha_b} B(alpha_a + i, beta_a + beta_b) / ((beta_b + i) B(1 + i, beta_b) B(alpha_a, beta_a))."""
    i = np.arange(alpha_b, dtype=float)
    log_terms = (betaln(alpha_a + i, beta_a + beta_b) - np.log(beta_b + i) - betaln(1 + i, beta_b)
                 - betaln(alpha_a, beta_a))
    return math.fsum(np.exp(log_terms))


def welch(a: Sequence[float], b: Sequence[float], alpha: float) -> dict[str, Any] | None:
    """Difference of means (b - a) with Welch's t-test and interval."""
    if len(a) < 2 or len(b) < 2:
        return None
    mean_a, mean_b = float(np.mean(a)), float(np.mean(b))
    var_a, var_b = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = float(np.sqrt(var_a + var_b))
    if se == 0:
        return {"control": mean_a, "candidate": mean_b, "lift": mean_b - mean_a, "ci": [mean_b - mean_a] * 2,
                "p_value": 1.0 if mean_a == mean_b else 0.0}
    dof = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    margin = float(t.ppf(1 - alpha / 2, dof)) * se
    p_value = float(ttest_ind(b, a, equal_var=False).pvalue)
    return {"control": mean_a, "candidate": mean_b, "lift": mean_b - mean_a,
            "ci": [mean_b - mean_a - margin, mean_b - mean_a + margin], "p_value": p_value}
