"""Which arm a user gets. The rule is part of the contract (DESIGN.md, "Routing")."""

from __future__ import annotations

import hashlib
import math
from decimal import Decimal
from typing import Literal

Arm = Literal["control", "candidate"]
BUCKETS = 10_000


def bucket(salt: str, user_id: str) -> int:
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).hexdigest()
    return int(digest, 16) % BUCKETS


def candidate_buckets(candidate_share: float) -> int:
    """How many buckets go to the candidate: the integers b >= 0 with b < share * 10000.

    The product is taken on the share as it was written (its shortest repr), not on its binary float: 0.07 * 10000
    is 700.0000000000001 in floats, which would hand bucket 700 to the candidate at a 7% share. A share finer than
    a bucket (1/3, 0.00025) rounds up, as `<` says: rounding to nearest would give 1/3 one bucket too few.
    """
    return min(BUCKETS, max(0, math.ceil(Decimal(repr(float(candidate_share))) * BUCKETS)))


def bucketed_share(candidate_share: float) -> float:
    """The candidate's share the buckets really give: what a sample ratio check must expect (1/3 gives 0.3334)."""
    return candidate_buckets(candidate_share) / BUCKETS


def assign_arm(salt: str, user_id: str | None, candidate_share: float, has_candidate: bool) -> Arm:
    """Candidate iff bucket < share * 10000.

    A user's bucket never changes within an experiment, so raising the share only moves users
    from control to candidate and lowering it only moves them back. No user id means control:
    an anonymous request cannot be kept on one arm.
    """
    if user_id is None or not has_candidate:
        return "control"
    return "candidate" if bucket(salt, user_id) < candidate_buckets(candidate_share) else "control"
