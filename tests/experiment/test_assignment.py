"""The routing rule, against DESIGN.md's text ("Routing"): bucket = int(sha256(salt + ":" + user_id)) mod 10000,
candidate iff bucket < share * 10000. Checks outside the repo compute it themselves, so the known values below were
computed from that sentence with hashlib alone, not with experiment.assignment."""

from __future__ import annotations

import hashlib
from fractions import Fraction

import pytest

from experiment.assignment import BUCKETS, assign_arm, bucket, candidate_buckets

# (salt, user, bucket): int(sha256(f"{salt}:{user}").hexdigest(), 16) % 10000, computed once in a shell.
KNOWN = [("salt", "alice", 9541), ("3f2a", "user-1", 1910), ("exp-7", "bob", 3425)]
# Users whose bucket under the salt "edge" sits at a threshold the tests below need.
EDGE = {0: "u4297", 2: "u5078", 3: "u27613", 699: "u25439", 700: "u14230", 3333: "u21055", 3334: "u434",
        9999: "u10110"}


def _by_the_book(salt: str, user: str) -> int:
    return int(hashlib.sha256((salt + ":" + user).encode()).hexdigest(), 16) % 10000


@pytest.mark.parametrize(("salt", "user", "expected"), KNOWN)
def test_the_bucket_is_the_designs_hash(salt, user, expected):
    assert BUCKETS == 10_000
    assert bucket(salt, user) == _by_the_book(salt, user) == expected


def test_the_edge_users_sit_in_the_buckets_the_tests_assume():
    assert {number: bucket("edge", user) for number, user in EDGE.items()} == {number: number for number in EDGE}


def test_a_non_ascii_user_hashes_its_utf8_bytes():
    assert bucket("s", "zoë") == _by_the_book("s", "zoë") != bucket("s", "zoe")


@pytest.mark.parametrize(("share", "buckets"), [
    (0.0, 0), (1.0, 10_000), (0.5, 5_000), (0.3, 3_000),
    (0.07, 700),  # 0.07 * 10000 is 700.0000000000001 in floats: bucket 700 stays control
    (0.0051, 51), (0.0099, 99),  # two more of the 576 four-decimal shares a float product overshoots
    (1 / 3, 3_334),  # 3333.33...: every bucket below it, 0..3333
    (0.00025, 3),  # 2.5: buckets 0, 1, 2 (rounding to nearest even would give 2)
    (0.00001, 1),  # 0.1 of a bucket: bucket 0 is below it
])
def test_the_candidate_gets_every_bucket_below_share_times_10000(share, buckets):
    assert candidate_buckets(share) == buckets


def test_the_count_matches_the_exact_product_for_every_four_and_five_decimal_share():
    for tenths in range(0, 100_001):  # 0.00000 .. 1.00000 in steps of 0.00001
        share = tenths / 100_000
        exact = Fraction(tenths, 100_000) * BUCKETS  # what the operator wrote, times 10000
        assert candidate_buckets(share) == -(-exact.numerator // exact.denominator), share


@pytest.mark.parametrize(("share", "below", "at"), [(0.07, 699, 700), (1 / 3, 3333, 3334), (0.00025, 2, 3),
                                                    (0.0003, 2, 3)])
def test_a_user_is_candidate_exactly_when_the_bucket_is_below_the_threshold(share, below, at):
    assert assign_arm("edge", EDGE[below], share, has_candidate=True) == "candidate"
    assert assign_arm("edge", EDGE[at], share, has_candidate=True) == "control"


def test_the_extreme_shares_send_everyone_one_way():
    for number, user in EDGE.items():
        assert assign_arm("edge", user, 0.0, has_candidate=True) == "control", number
        assert assign_arm("edge", user, 1.0, has_candidate=True) == "candidate", number


def test_no_user_or_no_candidate_means_control():
    assert assign_arm("edge", None, 1.0, has_candidate=True) == "control"
    assert assign_arm("edge", EDGE[0], 1.0, has_candidate=False) == "control"


def test_raising_the_share_never_moves_anyone_back_to_control():
    shares = sorted({n / 1000 for n in range(1001)} | {1 / 3, 2 / 3, 0.07, 0.00025})
    counts = [candidate_buckets(share) for share in shares]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == BUCKETS
