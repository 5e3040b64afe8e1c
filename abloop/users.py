"""SIMULATED users for `abloop demo`: they search through the real proxy over HTTP and rate what they read.

Not real people. Every simulated user id starts with "sim-" (`training.dataset.SIMULATED_USER_PREFIX`),
every search carries the session id "simulated", and every feedback carries the comment
"simulated feedback (abloop demo)", so the store, the dataset card and the reports can tell them apart.
Nothing here writes to the database: searches and feedback go through the proxy's HTTP API, exactly as
a client's would, so the demo exercises routing, logging, the write queue and the analysis for real.

The rule the users follow is stated up front (`HouseStyleRule.describe()`, which the demo prints) and
judges the TEXT of the answer they got, never the arm label, the model name or the served arm:

    Users like answers in the house style: the answer starts with "Answer:" and has a line that starts
    with "Source:" (case-sensitive; surrounding whitespace is ignored). A house-style answer gets a
    thumbs-up with probability 0.85; an answer with neither marker gets a thumbs-down with probability
    0.75 (else up); an answer with only one of the two gets a thumbs-up with probability 0.55. Each user
    gives feedback on a search with their own propensity (some rarely give any) and is a little more or
    less lenient than the rule (a shift of at most 0.1). Feedback always carries thumbs and half the time
    also a rating: 4-5 if they liked the answer, 1-3 if not. Half of the users who dislike an answer that
    is not in house style also send a correction: "Answer: <first sentence of the first returned
    passage>" / "Source: <its title>", which is how the trainer learns the style.

This is the house style `abloop.simulate` writes into the store directly; `abloop.simulate.house_answer`
is the single definition of the wanted answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import httpx

# The question phrasings and the title-to-subject helper are private in abloop.simulate; they are
# reused rather than copied so that both simulators ask questions the same way.
from abloop.simulate import QUESTION_TEMPLATES, SIMULATED_SESSION, SimChunk, house_answer, pydoc_chunks, subject
from training.dataset import SIMULATED_USER_PREFIX

logger = logging.getLogger("abloop.demo")

FEEDBACK_COMMENT = "simulated feedback (abloop demo)"

_ANSWER_START = re.compile(r"\s*Answer:")
_SOURCE_LINE = re.compile(r"^[ \t]*Source:", re.MULTILINE)
_RETRY_STATUSES = (429,)
_MAX_ATTEMPTS = 3
_MAX_RETRY_WAIT_S = 10.0
_LOGGED_PER_KIND = 5  # the first errors of each kind are warnings; the rest would only flood the log


def style_score(answer: str) -> float:
    """1.0 in house style, 0.5 with only one of the two markers, 0.0 with neither."""
    starts = _ANSWER_START.match(answer) is not None
    sourced = _SOURCE_LINE.search(answer) is not None
    return (starts + sourced) / 2


def in_house_style(answer: str) -> bool:
    """Starts with "Answer:" and has a line starting with "Source:" (case-sensitive, whitespace tolerant)."""
    return style_score(answer) == 1.0


def correction_for(item: Mapping[str, Any]) -> str | None:
    """The house-style answer built from one returned item (its title and text); None if it has no text."""
    text = str(item.get("text") or "")
    if not text.strip():
        return None
    title = str(item.get("title") or "")
    chunk = SimChunk(id=str(item.get("id") or ""), title=title, source=str(item.get("source") or ""), text=text)
    return house_answer(chunk)


@dataclass(frozen=True)
class HouseStyleRule:
    """How a simulated user turns the answer they read into feedback. Probabilities are parameters.

    `leniency` shifts the like-probability; a user applies their own with `with_leniency`.
    """

    like_in_style: float = 0.85
    dislike_off_style: float = 0.75
    correction_rate: float = 0.5
    rating_rate: float = 0.5
    leniency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("like_in_style", "dislike_off_style", "correction_rate", "rating_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    def with_leniency(self, shift: float) -> HouseStyleRule:
        return dataclasses.replace(self, leniency=self.leniency + shift)

    def like_probability(self, answer: str) -> float:
        """Interpolates between off-style and in-style by the style score, so half the style earns half the credit."""
        off = 1.0 - self.dislike_off_style
        p = off + style_score(answer) * (self.like_in_style - off) + self.leniency
        return min(max(p, 0.0), 1.0)

    def describe(self) -> str:
        """The rule as one plain-English paragraph, with this rule's numbers (the demo prints it)."""
        off = 1.0 - self.dislike_off_style
        partial = (off + self.like_in_style) / 2
        return (
            'Simulated users like answers in the house style: the answer starts with "Answer:" and has a line '
            'that starts with "Source:" (case-sensitive; surrounding whitespace is ignored). They judge only the '
            "text of the answer they got, never which arm or model served it. "
            f"A house-style answer gets a thumbs-up with probability {self.like_in_style:.2f}; an answer with "
            f"neither marker gets a thumbs-down with probability {self.dislike_off_style:.2f} (else up); one "
            f"with only one of the two gets a thumbs-up with probability {partial:.2f}. Each user gives feedback "
            "on a search with their own propensity (drawn per user, so some rarely give any) and is a little more "
            "or less lenient than this (a small shift of the thumbs-up probability). Feedback always carries "
            f"thumbs and, with probability {self.rating_rate:.2f}, a rating: 4-5 if they liked the answer, 1-3 "
            f"if not. With probability {self.correction_rate:.2f} a user who dislikes an answer that is not in "
            'house style also sends a correction built from the first returned passage: "Answer: <its first '
            'sentence>" and "Source: <its title>" on the next line.'
        )

    def judge(self, answer: str, items: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
        """The feedback body fields (without request_id) for `answer`. Whether to give any is the user's call.

        Takes only what the user read: the answer text and the returned items (for a correction).
        """
        liked = rng.random() < self.like_probability(answer)
        body: dict[str, Any] = {"thumbs": "up" if liked else "down", "comment": FEEDBACK_COMMENT}
        if rng.random() < self.rating_rate:
            # The rating follows the verdict: a thumbs-down with five stars would be contradictory
            # training data (the dataset keeps highly rated answers).
            body["rating"] = rng.choice((4, 5)) if liked else rng.choice((1, 2, 3))
        if not liked and not in_house_style(answer) and items and rng.random() < self.correction_rate:
            corrected = correction_for(items[0])
            if corrected is not None:
                body["corrected_answer"] = corrected
        return body


@dataclass
class SimulatedUser:
    user_id: str
    feedback_propensity: float
    leniency: float = 0.0

    def __post_init__(self) -> None:
        if not self.user_id.startswith(SIMULATED_USER_PREFIX):
            raise ValueError(f"simulated user ids start with {SIMULATED_USER_PREFIX!r}, got {self.user_id!r}")
        if not 0.0 <= self.feedback_propensity <= 1.0:
            raise ValueError(f"feedback_propensity must be in [0, 1], got {self.feedback_propensity}")

    def react(
        self, answer: str, items: list[dict[str, Any]], rule: HouseStyleRule, rng: random.Random
    ) -> dict[str, Any] | None:
        """The feedback this user gives on what they read, or None when they give none this time."""
        if rng.random() >= self.feedback_propensity:
            return None
        return rule.with_leniency(self.leniency).judge(answer, items, rng)


def make_users(
    n: int,
    seed: int,
    prefix: str = "sim-user-",
    *,
    propensity_beta: tuple[float, float] = (1.5, 1.0),
    leniency_sd: float = 0.05,
    max_leniency: float = 0.1,
) -> list[SimulatedUser]:
    """`n` users with their own feedback propensity (Beta; the default has mean 0.6 and about one user in
    eleven below 0.2) and leniency (normal, clipped to +-max_leniency)."""
    if not prefix.startswith(SIMULATED_USER_PREFIX):
        raise ValueError(f"the prefix must start with {SIMULATED_USER_PREFIX!r}, got {prefix!r}")
    rng = random.Random(f"abloop-users:{seed}")
    width = max(4, len(str(n - 1)))
    users = []
    for i in range(n):
        propensity = rng.betavariate(*propensity_beta)
        leniency = min(max(rng.gauss(0.0, leniency_sd), -max_leniency), max_leniency)
        users.append(SimulatedUser(f"{prefix}{i:0{width}d}", round(propensity, 4), round(leniency, 4)))
    return users


def queries(n: int, seed: int) -> list[str]:
    """`n` questions about Python: each (documentation topic, phrasing) pair once before any repeats."""
    pairs = [(title, phrasing) for title in _pydoc_titles() for phrasing in QUESTION_TEMPLATES]
    random.Random(f"abloop-queries:{seed}").shuffle(pairs)
    return [pairs[i % len(pairs)][1].format(s=subject(pairs[i % len(pairs)][0])) for i in range(n)]


@lru_cache(maxsize=1)
def _pydoc_titles() -> tuple[str, ...]:
    return tuple(dict.fromkeys(chunk.title for chunk in pydoc_chunks()))


@dataclass(frozen=True)
class SimResult:
    user_id: str
    query: str
    arm: str
    served_arm: str | None
    model: str | None
    answer: str
    in_house_style: bool
    feedback: dict[str, Any] | None  # as stored by the proxy; None if none was given or it was refused
    request_id: str
    latency_ms: float


@dataclass(frozen=True)
class SimReport:
    """What the simulation did. Per-arm counts are by ASSIGNED arm, as the analysis counts them."""

    requests: int  # searches attempted
    answered: int  # searches that got an answer
    arms: dict[str, int]
    models: dict[str, int]  # by served model
    fallbacks: int  # answered by control although assigned to the candidate
    house_style: dict[str, int]  # answers in house style, per arm
    feedback_given: int
    thumbs_up: dict[str, int]
    thumbs_down: dict[str, int]
    corrections: int
    errors: int
    error_kinds: dict[str, int]
    examples: dict[str, SimResult]  # the first answer per arm, in user order
    wall_s: float
    results: list[SimResult] = field(default_factory=list, repr=False)  # in user order, not completion order

    def thumbs_up_rate(self, arm: str) -> float | None:
        up, down = self.thumbs_up.get(arm, 0), self.thumbs_down.get(arm, 0)
        return up / (up + down) if up + down else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-request results)."""
        summary = dataclasses.asdict(self)
        summary.pop("results")
        summary["thumbs_up_rate"] = {arm: self.thumbs_up_rate(arm) for arm in sorted(self.arms)}
        return summary


@dataclass(frozen=True)
class _Failure:
    kind: str


async def simulate(
    base_url: str,
    users: Sequence[SimulatedUser],
    *,
    queries: Sequence[str],
    requests_per_user: int = 1,
    rule: HouseStyleRule,
    concurrency: int = 8,
    seed: int = 0,
    top_k: int = 3,
    on_result: Callable[[SimResult], None] | None = None,
    timeout_s: float = 300,
) -> SimReport:
    """Every user sends `requests_per_user` searches to the proxy at `base_url` and reacts to each answer.

    At most `concurrency` searches (each with its feedback) are in flight. Each request draws from its own
    rng, seeded from (seed, user index, request index), so the queries and the feedback depend only on the
    seed and the answers, not on completion order. `on_result` is called as results arrive (completion
    order). `timeout_s` bounds each HTTP call (a CPU model can be slow). HTTP errors are counted and
    logged to "abloop.demo"; only if every search fails does this raise `SimulationFailed`.
    """
    if not users:
        raise ValueError("simulate needs at least one user")
    if not queries:
        raise ValueError("simulate needs at least one query")
    if requests_per_user < 1 or concurrency < 1:
        raise ValueError("requests_per_user and concurrency must be at least 1")
    plan = [(i, j) for i in range(len(users)) for j in range(requests_per_user)]
    semaphore = asyncio.Semaphore(concurrency)
    errors: Counter[str] = Counter()  # by kind, filled as they happen
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s, limits=limits) as client:

        async def _run(i: int, j: int) -> SimResult | _Failure:
            rng = random.Random(f"abloop-sim:{seed}:{i}:{j}")
            query = rng.choice(queries)
            async with semaphore:
                outcome = await _interact(client, users[i], query, rule, rng, top_k, errors)
            if on_result is not None and isinstance(outcome, SimResult):
                on_result(outcome)
            return outcome

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(_run(i, j)) for i, j in plan]
        except ExceptionGroup as failed:  # a bug or a failing on_result: raise it as itself
            raise failed.exceptions[0] from None
    outcomes = [task.result() for task in tasks]
    report = _report(outcomes, errors, time.perf_counter() - started)
    if report.answered == 0:
        raise SimulationFailed(f"every one of {report.requests} searches failed: {report.error_kinds}")
    return report


def run_simulation(base_url: str, users: Sequence[SimulatedUser], **options: Any) -> SimReport:
    """`simulate` from synchronous code (not from inside a running event loop: await `simulate` there).

    Takes `simulate`'s keyword options.
    """
    return asyncio.run(simulate(base_url, users, **options))


class SimulationFailed(RuntimeError):
    """Every search failed: the proxy (or both arms) is down, so the demo cannot go on."""


async def _interact(
    client: httpx.AsyncClient,
    user: SimulatedUser,
    query: str,
    rule: HouseStyleRule,
    rng: random.Random,
    top_k: int,
    errors: Counter[str],
) -> SimResult | _Failure:
    """One search, the user reading the answer, and their feedback if they give any."""
    started = time.perf_counter()
    search = {"user_id": user.user_id, "session_id": SIMULATED_SESSION, "query": query, "top_k": top_k}
    try:
        response = await _post(client, "/api/v1/search", search)
        latency_ms = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            return _fail(f"search HTTP {response.status_code}", user, response.text[:200], errors)
        body = response.json()
        answer = str(body.get("answer") or "")
        items = list(body.get("items") or [])
        request_id = str(body["request_id"])
        arm = str(body["arm"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as error:  # incl. a bad body
        return _fail(f"search {type(error).__name__}", user, str(error), errors)

    feedback = user.react(answer, items, rule, rng)
    if feedback is not None:
        try:
            # X-User-Id: feedback is rate limited per user, else per address (every simulated user's is the same).
            given = await _post(client, "/api/v1/feedback", {"request_id": request_id, **feedback},
                                headers={"X-User-Id": user.user_id})
            if given.status_code != 201:
                _fail(f"feedback HTTP {given.status_code}", user, given.text[:200], errors)
                feedback = None
        except httpx.HTTPError as error:
            _fail(f"feedback {type(error).__name__}", user, str(error), errors)
            feedback = None
    return SimResult(
        user_id=user.user_id,
        query=query,
        arm=arm,
        served_arm=body.get("served_arm"),
        model=body.get("model"),
        answer=answer,
        in_house_style=in_house_style(answer),
        feedback=feedback,
        request_id=request_id,
        latency_ms=round(latency_ms, 3),
    )


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any],
                headers: dict[str, str] | None = None) -> httpx.Response:
    """POST, waiting out a rate limit (429 with Retry-After) a couple of times as a patient user would."""
    response = await client.post(path, json=body, headers=headers)
    for _ in range(_MAX_ATTEMPTS - 1):
        if response.status_code not in _RETRY_STATUSES:
            break
        await asyncio.sleep(_retry_after(response))
        response = await client.post(path, json=body, headers=headers)
    return response


def _retry_after(response: httpx.Response) -> float:
    try:
        wait = float(response.headers.get("retry-after", "1"))
    except ValueError:
        wait = 1.0
    return min(max(wait, 0.0), _MAX_RETRY_WAIT_S)


def _fail(kind: str, user: SimulatedUser, detail: str, errors: Counter[str]) -> _Failure:
    errors[kind] += 1
    if errors[kind] <= _LOGGED_PER_KIND:
        logger.warning("simulated user %s: %s: %s", user.user_id, kind, detail)
    else:
        logger.debug("simulated user %s: %s: %s", user.user_id, kind, detail)
    return _Failure(kind)


def _report(outcomes: list[SimResult | _Failure], error_kinds: Counter[str], wall_s: float) -> SimReport:
    """`error_kinds` counts failed searches and refused feedback on answered ones alike."""
    results = [outcome for outcome in outcomes if isinstance(outcome, SimResult)]
    arms: Counter[str] = Counter()
    models: Counter[str] = Counter()
    house: Counter[str] = Counter()
    up: Counter[str] = Counter()
    down: Counter[str] = Counter()
    examples: dict[str, SimResult] = {}
    for result in results:
        arms[result.arm] += 1
        models[result.model or "unknown"] += 1
        house[result.arm] += result.in_house_style
        examples.setdefault(result.arm, result)
        thumbs = (result.feedback or {}).get("thumbs")
        if thumbs == "up":
            up[result.arm] += 1
        elif thumbs == "down":
            down[result.arm] += 1
    return SimReport(
        requests=len(outcomes),
        answered=len(results),
        arms=dict(arms),
        models=dict(models),
        fallbacks=sum(1 for r in results if r.served_arm is not None and r.served_arm != r.arm),
        house_style=dict(house),
        feedback_given=sum(1 for r in results if r.feedback is not None),
        thumbs_up=dict(up),
        thumbs_down=dict(down),
        corrections=sum(1 for r in results if r.feedback and r.feedback.get("corrected_answer")),
        errors=sum(error_kinds.values()),
        error_kinds=dict(error_kinds),
        examples=examples,
        wall_s=round(wall_s, 3),
        results=results,
    )
