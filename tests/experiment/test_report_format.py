"""What the report prints for a figure, exactly: units, signs, rounding, intervals, tones and labels.

The HTML page and the markdown share these (experiment/report/format.py and content.py); an operator
reads them to decide, so each case pins the text itself.
"""

from __future__ import annotations

import math

import pytest

from experiment.metrics import METRICS
from experiment.report import content
from experiment.report.format import (
    _change,
    _change_interval,
    _delta,
    _e,
    _fixed,
    _interval,
    _label,
    _p,
    _pct,
    _signed,
    _value,
    _when,
)

NONE = "–"


@pytest.mark.parametrize(
    ("metric", "value", "shown"),
    [("int", 1234.4, "1,234"), ("thumbs_up_rate", 0.1234, "12.3%"), ("error_rate", 0.5, "50.0%"),
     ("latency_p95_ms", 1234.6, "1,235 ms"), ("mean_rating", 3.14159, "3.14"),
     ("tokens_out_per_request", 12.34, "12.3"),
     ("satisfaction", 0.12345, "0.123"), ("satisfaction", None, NONE), ("satisfaction", math.nan, NONE),
     ("satisfaction", math.inf, NONE), ("int", "12", NONE)],
)  # fmt: skip
def test_a_value_in_its_unit(metric, value, shown):
    assert _value(metric, value) == shown


@pytest.mark.parametrize(
    ("metric", "value", "sign", "shown"),
    [("thumbs_up_rate", 0.0123, True, "+1.2 pp"), ("thumbs_up_rate", 0.5, True, "+50.0 pp"),
     ("thumbs_up_rate", 0.0123, False, "1.2 pp"),
     ("thumbs_up_rate", -0.0001, True, "+0.0 pp"), ("latency_p95_ms", -1234.6, True, "-1,235 ms"),
     ("latency_p95_ms", 12.0, False, "12 ms"), ("mean_rating", 0.123, True, "+0.12"),
     ("tokens_out_per_request", -1.234, True, "-1.23"), ("satisfaction", 0.0456, True, "+0.046"),
     ("satisfaction", -0.0004, True, "+0.000"), ("satisfaction", -0.0004, False, "0.000"),
     ("satisfaction", None, True, NONE)],
)  # fmt: skip
def test_a_difference_in_its_unit_and_never_minus_zero(metric, value, sign, shown):
    assert _delta(metric, value, sign) == shown


def test_signed_keeps_real_signs_and_drops_the_sign_of_nothing():
    assert (_signed(1234.0, "+,.0f"), _signed(-0.4, "+,.0f"), _signed(-0.04, ".1f")) == ("+1,234", "+0", "0.0")
    assert _signed(-0.06, ".1f") == "-0.1"


def test_relative_changes_and_their_intervals():
    assert (_change(0.1), _change(-0.25), _change(-0.0004), _change(None)) == ("+10.0%", "-25.0%", "+0.0%", NONE)
    assert _change_interval([0.1, -0.2]) == "[+10.0%, -20.0%]"
    for missing in (None, [], [None, 0.1], [0.1, None], [0.1, math.nan]):
        assert _change_interval(missing) == NONE


def test_intervals_of_differences_and_of_values():
    assert _interval("thumbs_up_rate", [0.01, 0.025]) == "[+1.0 pp, +2.5 pp]"
    assert _interval("thumbs_up_rate", [0.01, 0.025], delta=False) == "[1.0%, 2.5%]"
    for missing in (None, [], [None, 0.1], [0.1, None]):
        assert _interval("satisfaction", missing) == NONE


def test_p_values_percentages_times_labels_and_fixed_figures():
    assert (_p(0.0004), _p(0.001), _p(0.04567), _p(None)) == ("< 0.001", "0.001", "0.046", NONE)
    assert (_pct(0.123), _pct(0.1234, 1), _pct(None)) == ("12%", "12.3%", NONE)
    assert _when("2026-11-02T09:05:07+00:00") == "2026-11-02 09:05:07 UTC"
    assert _when("2026-11-02T09:05:07+00:00", seconds=False) == "2026-11-02 09:05 UTC"
    assert (_when(None), _when(""), _when("not a time")) == (NONE, NONE, "not a time")
    assert _label("satisfaction") == METRICS["satisfaction"].label != "satisfaction"
    assert _label("answer_length_chars") == "answer length chars"
    assert (_fixed(0.123456), _fixed(None), _fixed(math.inf)) == ("0.1235", None, None)


def test_every_piece_of_text_is_escaped():
    assert _e('<a href="x">&\'') == "&lt;a href=&quot;x&quot;&gt;&amp;&#x27;"
    assert (_e(None), _e(3)) == ("", "3")


@pytest.mark.parametrize(
    ("change", "tone"),
    [({"ci": [0.01, 0.2], "higher_is_better": True}, "good"),
     ({"ci": [0.01, 0.2], "higher_is_better": False}, "bad"),
     ({"ci": [-0.2, -0.01], "higher_is_better": True}, "bad"),
     ({"ci": [-0.2, -0.01], "higher_is_better": False}, "good"),
     ({"ci": [0.0, 0.2], "higher_is_better": True}, "muted"),
     ({"ci": [-0.2, 0.0], "higher_is_better": True}, "muted"),
     ({"ci": [-0.1, 0.2], "higher_is_better": True}, "muted"),
     ({"ci": [0.01, 0.2], "higher_is_better": None}, "muted"),
     ({"ci": [None, 0.2], "higher_is_better": True}, "muted"),
     ({"ci": [0.01, None], "higher_is_better": True}, "muted"),
     ({"ci": None, "higher_is_better": True}, "muted"), (None, "muted")],
)  # fmt: skip
def test_a_change_is_coloured_only_where_its_interval_clears_zero(change, tone):
    assert content._change_tone(change) == tone


def test_simulated_traffic_is_labelled_with_its_counts():
    part = {"any": True, "all": False, "events": 1200, "simulated_events": 1000, "simulated_users": 300,
            "feedback": 2500, "simulated_feedback": 2000}  # fmt: skip
    assert content._simulated_text(part) == (
        "Part of the traffic and feedback in this experiment was SIMULATED (sim- users): 1,000 of 1,200 requests "
        "from 300 simulated users; 2,000 of 2,500 feedback rows on them. Read the comparison with that in mind.")
    whole = {**part, "all": True, "events": 1000, "feedback": 2000}
    assert content._simulated_text(whole, "in these two weeks") == (
        "Traffic and feedback in these two weeks were SIMULATED (sim- users); no person rated anything. 1,000 of "
        "1,000 requests from 300 simulated users; 2,000 of 2,000 feedback rows on them.")
    assert content._simulated_text({**part, "any": False}) is None and content._simulated_text(None) is None
    assert content._miss_who({"simulated_events": 3, "events": 3}) == "SIMULATED user"
    assert content._miss_who({"simulated_events": 1200, "events": 1500}) == "1,200 of 1,500 SIMULATED"
    assert content._miss_who({"simulated_events": 0, "events": 3}) is None and content._miss_who({}) is None


def test_feedback_lines_and_the_worst_feedback_of_a_miss():
    rows = [{"thumbs": "down", "rating": 0, "corrected_answer": "use sorted()", "comment": "wrong"},
            {"thumbs": None, "rating": None, "corrected_answer": None, "comment": None}, {"rating": 5}]  # fmt: skip
    assert content._feedback_text(rows) == [
        "thumbs down; rating 0/5; correction: use sorted(); comment: wrong", "rating 5/5"]
    long = "x" * (content.ANSWER_CHARS + 10)
    worst = content._worst_feedback({"thumbs": "down", "rating": 1, "comment": "bad", "corrected_answer": long})
    assert worst == {"thumbs": "down", "rating": 1, "comment": "bad", "corrected_answer": content._truncate(long)}
    assert content._worst_feedback({})["corrected_answer"] is None


def test_long_text_is_cut_at_the_limit():
    limit = content.ANSWER_CHARS
    assert content._truncate("a" * limit) == "a" * limit
    assert content._truncate("a" * (limit - 1) + "  b") == "a" * (limit - 1) + "…"  # cut, trailing space dropped
    assert content._truncate("abcdef", limit=3) == "abc…"


def test_share_moves_verdicts_and_arm_names():
    assert content._share_move({"from_share": 0.1, "to_share": 0.5}) == "10% → 50%"
    assert content._share_move({"from_share": None, "to_share": 0.2}) == "20%"
    assert content._share_move({}) == NONE
    decision = {"analysis": {"decision": {"action": "promote", "reason": "candidate is better"}}}
    assert content._verdict(decision) == ("promote", "Promote the candidate", "good", "candidate is better")
    assert content._verdict({}) == ("not_enough_data", "Not enough data", "muted", "")
    unknown = {"analysis": {"decision": {"action": "hold_still"}}}
    assert content._verdict(unknown) == ("hold_still", "Hold still", "muted", "")
    assert content._arm_name({}, "control") == NONE
    assert content._arm_name({"experiment": {"control": {"model": "base"}}}, "candidate") == "no candidate"
    assert content._arm_name({"experiment": {"control": {"model": "base"}}}, "control") == "base"


def test_weekly_cells_show_the_count_beside_a_rate():
    figures = {"requests": 1234, "thumbs_up_per_request": {"value": 0.25, "ci": [0.2, 0.3]}, "thumbs_up": 308,
               "mean_rating": {"value": None}, "ratings": 0}  # fmt: skip
    assert content._weekly_cell(figures, "thumbs_up_per_request", "thumbs_up_per_request", "thumbs_up") == (
        "25.0% (308)")
    assert content._weekly_cell(figures, "requests", "int", None) == "1,234"
    assert content._weekly_cell(figures, "mean_rating", "mean_rating", "ratings") == NONE  # no value, no count
    assert content._weekly_cell(figures, "thumbs_up_per_request", "thumbs_up_per_request", "missing") == "25.0%"
    assert content._weekly_cell(None, "requests", "int", None) == NONE
    assert content._weekly_title({"week": {"ending": "2026-11-29"}}) == "Weekly report · week ending 2026-11-29"
    assert content._weekly_title({}) == "Weekly report · week ending –"
