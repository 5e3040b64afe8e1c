"""SIMULATED search traffic and feedback, for the demo and the acceptance run. Not real users.

Every row written here is labelled as simulated: `search_events.user_id` starts with "sim-",
`session_id` is "simulated", `model` is "simulated" and `retrieved.index_version` says so when the
passages did not come from a real index. `training.dataset` counts such rows in the card.

The events look like what the proxy logs: `messages` are the exact chat messages (system prompt
from the active template, numbered context passages, question) and `retrieved` lists the passage
ids. The simulated users have one clear **house style** and their feedback rewards it:

    Answer: <one sentence taken from the best passage>
    Source: <title of that passage>

Served answers already in house style get thumbs-up or 4-5 stars; other answers get a correction
to the house-style answer, a thumbs-down or a low rating. A model fine-tuned on the resulting
dataset should learn the house style, which the offline evaluation can measure.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from store.db import Database
from store.models import Feedback, SearchEvent, new_id
from training.dataset import SIMULATED_USER_PREFIX
from training.synthetic import ChunkLike, active_layout, load_chunks

SIMULATED_SESSION = "simulated"
SIMULATED_MODEL = "simulated"

QUESTION_TEMPLATES = (
    "What is {s} in Python?",
    "How does {s} work?",
    "Explain {s}.",
    "Can you tell me about {s}?",
    "What should I know about {s}?",
    "Briefly describe {s}.",
)
# How a model without the house style tends to answer.
_OFF_STYLE = (
    "{sentence}",
    "Sure! {sentence} Hope this helps!",
    "Great question. From what I can find, {lower}",
    "{sentence} See the Python documentation for details.",
)
_SENTENCE = re.compile(r"(.+?[.:;!?])(?:\s|$)")
_HEADING_RULE = re.compile(r"^[*=~^-]{3,}$")


@dataclass(frozen=True)
class SimChunk:
    id: str
    title: str
    source: str
    text: str


def house_answer(chunk: ChunkLike) -> str:
    """The answer the simulated users want for a question about `chunk`."""
    return f"Answer: {first_sentence(chunk.text)}\nSource: {chunk.title}"


def first_sentence(text: str) -> str:
    match = _SENTENCE.match(" ".join(text.split()))
    sentence = match.group(1) if match else " ".join(text.split())
    return sentence[:-1] + "." if sentence and sentence[-1] in ":;" else sentence


def pydoc_chunks(max_chars: int = 350) -> list[SimChunk]:
    """One short passage per topic of Python's bundled documentation (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    chunks = []
    for key in sorted(topics):
        title, paragraph = _title_and_first_paragraph(topics[key])
        if title and len(paragraph) >= 40:
            chunks.append(
                SimChunk(id=f"pydoc:{key}", title=title, source=f"pydoc:{key}", text=_cut(paragraph, max_chars))
            )
    return chunks


def simulate_traffic(
    db: Database,
    *,
    n_queries: int,
    seed: int = 0,
    chunks: Sequence[ChunkLike] | None = None,
    index_dir: Path | None = None,
    feedback_rate: float = 0.9,
    house_style_rate: float = 0.3,
    correction_rate: float = 0.5,
    pii_rate: float = 0.03,
    top_k: int = 2,
    days: float = 7.0,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Write `n_queries` SIMULATED search events and their feedback; return what was written.

    Passages come from `chunks`, else the index in `index_dir`, else Python's bundled docs.
    `house_style_rate` of served answers are already in house style; of the rest, with feedback,
    `correction_rate` get a correction and the others a thumbs-down or a low rating. `pii_rate`
    of questions carry a made-up e-mail address, which dataset redaction must remove.
    """
    rng = random.Random(seed)
    pool = list(chunks) if chunks is not None else (load_chunks(index_dir) if index_dir else pydoc_chunks())
    pool = [c for c in pool if c.text.strip()]
    if len(pool) < 2:
        raise ValueError("simulated traffic needs at least two passages")
    index_version = f"{SIMULATED_SESSION}-pydoc" if chunks is None and index_dir is None else None
    layout = active_layout(db)
    now = now or datetime.now(UTC)
    users = [f"{SIMULATED_USER_PREFIX}{i:04d}" for i in range(max(5, n_queries // 4))]
    # Walk every (passage, phrasing) pair once before repeating any, as real users rarely repeat.
    pairs = [(c, t) for c in pool for t in QUESTION_TEMPLATES]
    rng.shuffle(pairs)

    counts: Counter[str] = Counter()
    events: list[SearchEvent] = []
    feedback: list[Feedback] = []
    for n in range(n_queries):
        chunk, phrasing = pairs[n % len(pairs)]
        question = phrasing.format(s=subject(chunk.title))
        if rng.random() < pii_rate:
            question += f" Reply to sim.user{n}@example.com"
            counts["questions_with_pii"] += 1
        hits = [chunk, *rng.sample([c for c in pool if c.id != chunk.id], k=min(top_k - 1, len(pool) - 1))]
        in_style = rng.random() < house_style_rate
        answer = house_answer(chunk) if in_style else _off_style_answer(chunk, rng)
        ts = now - timedelta(days=rng.uniform(0, days))
        messages = layout.messages(hits, question)
        event = SearchEvent(
            id=new_id(),  # feedback below needs it before the flush would assign one
            ts=ts,
            user_id=rng.choice(users),
            session_id=SIMULATED_SESSION,
            experiment_id=None,
            arm="control",
            served_arm="control",
            model=SIMULATED_MODEL,
            query=question,
            messages=messages,
            retrieved={
                "ids": [h.id for h in hits],
                "scores": [round(0.9 - 0.1 * i, 3) for i in range(len(hits))],
                "index_version": index_version or "simulated-over-index",
            },
            prompt_template_id=layout.template_id,
            prompt_template_version=layout.version,
            answer=answer,
            status="ok",
            timings={"retrieval": 5.0, "llm": 100.0, "total": 110.0},
            tokens_in=sum(len(m["content"].split()) for m in messages),
            tokens_out=len(answer.split()),
        )
        events.append(event)
        counts["events"] += 1
        counts["house_style_served"] += in_style
        if rng.random() >= feedback_rate:
            counts["no_feedback"] += 1
            continue
        feedback.append(_feedback(event, chunk, in_style, correction_rate, rng, counts))

    with db.session() as session:
        session.add_all(events)
        session.flush()  # events before the feedback that references them
        session.add_all(feedback)
    counts["feedback"] = len(feedback)
    return {"simulated": True, "user_prefix": SIMULATED_USER_PREFIX, "session_id": SIMULATED_SESSION, **dict(counts)}


def _feedback(
    event: SearchEvent,
    chunk: ChunkLike,
    in_style: bool,
    correction_rate: float,
    rng: random.Random,
    counts: Counter[str],
) -> Feedback:
    ts = event.ts + timedelta(minutes=rng.uniform(0.5, 30))
    if in_style:
        roll = rng.random()
        if roll < 0.5:
            counts["thumbs_up"] += 1
            return Feedback(event_id=event.id, ts=ts, thumbs="up")
        counts["ratings"] += 1
        return Feedback(event_id=event.id, ts=ts, rating=5 if roll < 0.8 else 4)
    if rng.random() < correction_rate:
        counts["corrections"] += 1
        return Feedback(
            event_id=event.id,
            ts=ts,
            corrected_answer=house_answer(chunk),
            rating=2,
            comment="simulated: rewritten in house style",
        )
    if rng.random() < 0.6:
        counts["thumbs_down"] += 1
        return Feedback(event_id=event.id, ts=ts, thumbs="down")
    counts["ratings"] += 1
    return Feedback(event_id=event.id, ts=ts, rating=rng.choice((1, 2, 3)))


def _off_style_answer(chunk: ChunkLike, rng: random.Random) -> str:
    sentence = first_sentence(chunk.text)
    return rng.choice(_OFF_STYLE).format(sentence=sentence, lower=sentence[0].lower() + sentence[1:])


def _title_and_first_paragraph(doc: str) -> tuple[str, str]:
    lines = doc.strip().splitlines()
    title = lines[0].strip() if lines else ""
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines[1:]))
    for paragraph in paragraphs:
        body = [line for line in paragraph.splitlines() if not _HEADING_RULE.match(line.strip())]
        # Indented blocks are grammar or code, not prose.
        if body and not body[0].startswith(" "):
            return title, " ".join(" ".join(body).split())
    return title, ""


def subject(title: str) -> str:
    """A title as it reads mid-sentence: "The "for" statement" -> "the "for" statement"."""
    first = title.split(" ", 1)[0]
    plain_word = first[:1].isupper() and (len(first) == 1 or first[1:].islower())  # not "NaN", not "CPU"
    return title[0].lower() + title[1:] if plain_word else title


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    end = max(cut.rfind(". "), cut.rfind(": "))
    return cut[: end + 1] if end > 40 else cut.rsplit(" ", 1)[0]
