"""Which arm a user gets. The rule is part of the contract (DESIGN.md, "Routing")."""

from __future__ import annotations

import hashlib
from typing import Literal

Arm = Literal["control", "candidate"]
BUCKETS = 10_000


def bucket(salt: str, user_id: str) -> int:
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).hexdigest()
    return int(digest, 16) % BUCKETS


def assign_arm(salt: str, user_id: str | None, candidate_share: float, has_candidate: bool) -> Arm:
    """Candidate iff bucket < share * 10000.

    A user's bucket never changes within an experiment, so raising the share only moves users
    from control to candidate and lowering it only moves them back. No user id means control:
    an anonymous request cannot be kept on one arm.
    """
    if user_id is None or not has_candidate:
        return "control"
    return "candidate" if bucket(salt, user_id) < round(candidate_share * BUCKETS) else "control"
