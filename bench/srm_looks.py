"""The sample-ratio check under repeated looks: false alarms over two weeks of hourly evaluations, and how soon
a real mismatch is caught, for the rule the analysis uses and for an anytime-valid alternative.

The rule: `experiment.stats.sample_ratio` (scipy's chi-square goodness of fit) below `decision.SRM_P` (0.001,
GrowthBook's threshold) at a look. A mismatch holds a rollout step (keep_running); it never rolls back. Each
look tests the cumulative counts again, so the chance of at least one false alarm grows with the looks.
The alternative: Lindon & Malek's (2022) Dirichlet-multinomial Bayes factor (Optimizely's `ssrm`, savvi's
`Multinomial`), prior concentration k around the expected share, alarm when it reaches 1/0.001: by Ville's
inequality, at most 0.1% of A/A experiments ever alarm, however many looks.

A 50/50 split, `--per-hour` users an hour, 336 hourly looks (14 days). Vectorised here; the chi-square is
checked against `sample_ratio` itself on a few looks first.

    .venv/bin/python bench/srm_looks.py          # about 30 s
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy.special import betaln  # noqa: E402
from scipy.stats import chi2  # noqa: E402

from experiment.decision import SRM_P  # noqa: E402
from experiment.stats import sample_ratio  # noqa: E402

LOOKS, SEED = 336, 5
KS = (100, 1000)


def _chi_square_p(a: np.ndarray, n: np.ndarray) -> np.ndarray:
    expected = n / 2
    return chi2.sf((a - expected) ** 2 / expected + (n - a - expected) ** 2 / expected, 1)


def _log_bayes_factor(a: np.ndarray, n: np.ndarray, k: float) -> np.ndarray:
    return betaln(k / 2 + a, k / 2 + n - a) - betaln(k / 2, k / 2) - n * np.log(0.5)


def _first_alarm(alarms: np.ndarray) -> tuple[float, str]:
    """Share of runs that ever alarm, and the median look of the first alarm among them."""
    hit = alarms.any(axis=1)
    if not hit.any():
        return 0.0, "-"
    return float(hit.mean()), f"{np.median(alarms[hit].argmax(axis=1)) + 1:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-hour", type=int, default=150)
    parser.add_argument("--runs", type=int, default=20_000)
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    n = args.per_hour * np.arange(1, LOOKS + 1)
    print(f"{args.per_hour} users an hour, {LOOKS} hourly looks, {args.runs:,} runs per row; "
          "alarm rate = runs that alarm at least once; first alarm = median look among them")
    print("| candidate share (true) | looks | chi-square < " + f"{SRM_P}" + " | first alarm | "
          + " | ".join(f"Bayes factor k={k} | first alarm" for k in KS) + " |")
    print("|---:|---:|---:|---:|" + "---:|---:|" * len(KS))
    for true in (0.5, 0.49, 0.48, 0.45):
        a = np.cumsum(rng.binomial(args.per_hour, true, size=(args.runs, LOOKS)), axis=1)
        p = _chi_square_p(a, n)
        if true == 0.5:  # the vectorised figure is the analysis' own function's
            for run, look in ((0, 0), (1, 100), (2, LOOKS - 1)):
                got = sample_ratio([int(n[look] - a[run, look]), int(a[run, look])], [0.5, 0.5])
                assert abs(got - p[run, look]) < 1e-9, (got, p[run, look])
        for looks in ((20, LOOKS) if true == 0.5 else (LOOKS,)):
            cells = [f"{true:.2f}", str(looks), *(f"{x:.2%}" if isinstance(x, float) else x
                                                  for x in _first_alarm(p[:, :looks] < SRM_P))]
            for k in KS:
                rate, first = _first_alarm(_log_bayes_factor(a[:, :looks], n[:looks], k) >= np.log(1 / SRM_P))
                cells += [f"{rate:.2%}", first]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
