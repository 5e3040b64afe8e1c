"""Build a fine-tuning dataset from logged searches and their feedback.

Pipeline (each stage's row count goes into the dataset card):

1. **Preference rules**, per event in the window: a user's corrected answer wins; otherwise the
   served answer if it was rated at or above `min_rating` or thumbed up. An event with a thumbs-down
   or a low rating and no correction is excluded. Corrections also yield a DPO preference pair
   (chosen = correction, rejected = served answer).
2. **Redaction** of e-mails, payment card numbers, IBANs, phone numbers and secrets (training.redact).
3. **Exact dedupe** on the normalised prompt, then **semantic dedupe** of questions by embedding
   similarity; in both the best row survives (correction > rated, then rating, then newest).
4. **Density-based selection** over answer embeddings (training.select).
5. Optional **synthetic QA** for rarely retrieved chunks (training.synthetic).
6. A deterministic **holdout** split by hash of the user's question (case and whitespace normalised),
   not of the whole prompt: every row of one question, whatever context was retrieved with it, lands
   on one side, and a correction's preference pair on the side of that question's SFT row.

Output in `out_dir`: `train.jsonl` and `holdout.jsonl` (trl conversational prompt/completion rows),
`preferences.jsonl` (trl prompt/chosen/rejected rows) and `card.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from store.db import Database
from store.models import Feedback, SearchEvent
from training import Encoder, default_encoder
from training.redact import redact_messages, redact_text
from training.select import SelectionConfig, greedy_dedupe, select_by_density
from training.synthetic import SyntheticConfig

TRAIN_FILE = "train.jsonl"
HOLDOUT_FILE = "holdout.jsonl"
PREFERENCES_FILE = "preferences.jsonl"
CARD_FILE = "card.json"
CARD_VERSION = 1

SIMULATED_USER_PREFIX = "sim-"
_SOURCE_RANK = {"correction": 2, "rated": 1, "synthetic": 0}
_THUMBS_UP_QUALITY = 4.0
_CORRECTION_QUALITY = 5.0


@dataclass
class Example:
    """One candidate training row: the exact prompt messages and the preferred answer."""

    prompt: list[dict[str, Any]]
    completion: str
    source: str  # correction | rated | synthetic
    quality: float  # 1..5; a correction counts as 5
    question: str
    event_id: str | None = None
    ts: datetime | None = None
    simulated: bool = False
    rejected: str | None = None  # the served answer a correction replaced

    @property
    def prompt_key(self) -> str:
        """Hash of the prompt with case and whitespace normalised: what "same prompt" means."""
        normal = [[m.get("role", ""), " ".join(str(m.get("content", "")).lower().split())] for m in self.prompt]
        return hashlib.sha256(json.dumps(normal, ensure_ascii=False).encode()).hexdigest()

    @property
    def split_key(self) -> str:
        """Hash of the question alone (case and whitespace normalised): what decides train or holdout.

        Not the prompt: the same question asked with other retrieved context is another prompt, and
        if the split followed the prompt it could land in both splits and the holdout would score
        questions the adapter was trained on. A row without a question falls back to its prompt."""
        normal = " ".join(self.question.lower().split())
        if not normal:
            return self.prompt_key
        return hashlib.sha256(json.dumps(["question", normal], ensure_ascii=False).encode()).hexdigest()

    def rank(self) -> tuple[int, float, float]:
        """Higher is better: corrections, then rating, then recency."""
        return (_SOURCE_RANK[self.source], self.quality, self.ts.timestamp() if self.ts else 0.0)

    def to_row(self) -> dict[str, Any]:
        key = self.prompt_key
        return {
            "id": hashlib.sha256(f"{key}\x00{self.completion}".encode()).hexdigest()[:16],
            "prompt": self.prompt,
            "completion": [{"role": "assistant", "content": self.completion}],
            "source": self.source,
            "quality": self.quality,
            "event_id": self.event_id,
            "simulated": self.simulated,
        }


@dataclass
class DatasetCard:
    out_dir: Path
    content_hash: str
    counts: dict[str, Any]
    stages: dict[str, int]
    selection: dict[str, Any]
    synthetic: dict[str, Any] | None
    redactions: dict[str, int]
    params: dict[str, Any]
    window: dict[str, str | None]
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    version: int = CARD_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data

    @classmethod
    def load(cls, data_dir: Path) -> DatasetCard:
        data = json.loads((Path(data_dir) / CARD_FILE).read_text(encoding="utf-8"))
        data["out_dir"] = Path(data_dir)
        return cls(**data)


def build_dataset(
    db: Database,
    out_dir: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    min_rating: int = 4,
    semantic_threshold: float = 0.95,
    holdout_fraction: float = 0.1,
    redact: bool = True,
    select: SelectionConfig | None = None,
    synthetic: SyntheticConfig | None = None,
    embedder: Encoder | None = None,
) -> DatasetCard:
    """Write train/holdout/preferences JSONL and a card to `out_dir`; return the card.

    `select=None` runs selection with the defaults (pass `SelectionConfig(enabled=False)` to skip
    it); `synthetic=None` adds no synthetic rows. Events are taken by their own timestamp,
    `since <= ts < until`; naive datetimes are read as UTC.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError("holdout_fraction must be in [0, 1)")
    since, until = _utc(since), _utc(until)
    select = select or SelectionConfig()
    encoder = _LazyEncoder(embedder)
    stages: dict[str, int] = {}
    redactions: Counter[str] = Counter()

    examples, rule_counts = _apply_preference_rules(_events_with_feedback(db, since, until), min_rating)
    stages.update(rule_counts)
    if redact:
        examples = [_redacted(e, redactions) for e in examples]
    stages["candidates"] = len(examples)
    # Pairs come from every corrected event, before dedupe: two corrections of one prompt are two
    # lessons for DPO even though SFT keeps only the better one.
    preferences = _preference_rows([e for e in examples if e.rejected is not None], holdout_fraction)

    examples = _exact_dedupe(examples)
    stages["after_exact_dedupe"] = len(examples)
    examples = _semantic_dedupe(examples, semantic_threshold, encoder)
    stages["after_semantic_dedupe"] = len(examples)
    examples, selection_report = _select(examples, select, encoder)
    stages["after_selection"] = len(examples)

    synthetic_report = None
    if synthetic is not None:
        added, synthetic_report = _synthetic_examples(db, synthetic, encoder, examples, since, until)
        if redact:
            added = [_redacted(e, redactions) for e in added]
        examples += added
    stages["synthetic_added"] = len(examples) - stages["after_selection"]

    train, holdout = _split(examples, holdout_fraction)
    stages["train"], stages["holdout"] = len(train), len(holdout)

    content_hash = _write_outputs(Path(out_dir), train, holdout, preferences)
    card = DatasetCard(
        out_dir=Path(out_dir),
        content_hash=content_hash,
        counts={
            "train": len(train),
            "holdout": len(holdout),
            "preferences": len(preferences),
            "by_source": {
                "train": dict(Counter(r["source"] for r in train)),
                "holdout": dict(Counter(r["source"] for r in holdout)),
            },
            "simulated": sum(r["simulated"] for r in train + holdout),
        },
        stages=stages,
        selection=selection_report,
        synthetic=synthetic_report,
        redactions=dict(redactions),
        params={
            "min_rating": min_rating,
            "semantic_threshold": semantic_threshold,
            "holdout_fraction": holdout_fraction,
            "redact": redact,
        },
        window={"since": since.isoformat() if since else None, "until": until.isoformat() if until else None},
    )
    _atomic_write(Path(out_dir) / CARD_FILE, json.dumps(card.to_dict(), indent=2, sort_keys=True).encode())
    return card


def in_holdout(split_key: str, fraction: float) -> bool:
    """Deterministic: the same question (`Example.split_key`) lands on the same side in every build."""
    return int(split_key[:16], 16) / 16**16 < fraction


def read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --- stage 1: events and the preference rules -------------------------------------------------


def _events_with_feedback(
    db: Database, since: datetime | None, until: datetime | None
) -> Iterator[tuple[SearchEvent, list[Feedback]]]:
    from sqlalchemy import select

    stmt = _within(select(SearchEvent, Feedback).join(Feedback, Feedback.event_id == SearchEvent.id), since, until)
    stmt = stmt.order_by(SearchEvent.ts, SearchEvent.id, Feedback.ts, Feedback.id)
    with db.session() as session:
        current: SearchEvent | None = None
        group: list[Feedback] = []
        for event, feedback in session.execute(stmt).yield_per(1000):
            if current is not None and event.id != current.id:
                yield current, group
                group = []
            current = event
            group.append(feedback)
        if current is not None:
            yield current, group


def _within(stmt: Any, since: datetime | None, until: datetime | None) -> Any:
    """Events in [since, until): consecutive windows see every event once."""
    if since is not None:
        stmt = stmt.where(SearchEvent.ts >= since)
    if until is not None:
        stmt = stmt.where(SearchEvent.ts < until)
    return stmt


def _apply_preference_rules(
    events: Iterable[tuple[SearchEvent, list[Feedback]]], min_rating: int
) -> tuple[list[Example], dict[str, int]]:
    """(one example per event that yields one, counts per outcome)."""
    examples: list[Example] = []
    counts: Counter[str] = Counter(events_with_feedback=0)
    for event, feedback in events:
        counts["events_with_feedback"] += 1
        outcome = _preferred(event, feedback, min_rating)
        if isinstance(outcome, str):
            counts[f"excluded_{outcome}"] += 1
        else:
            examples.append(outcome)
    return examples, dict(counts)


def _preferred(event: SearchEvent, feedback: list[Feedback], min_rating: int) -> Example | str:
    """The example an event yields, or the reason it yields none."""
    messages = event.messages or []
    if not messages:
        return "no_messages"
    base = Example(
        prompt=[dict(m) for m in messages],
        completion="",
        source="rated",
        quality=0.0,
        question=event.query or _last_user_content(messages),
        event_id=event.id,
        ts=_utc(event.ts),
        simulated=(event.user_id or "").startswith(SIMULATED_USER_PREFIX),
    )
    corrections = [f for f in feedback if f.corrected_answer and f.corrected_answer.strip()]
    if corrections:
        latest = max(corrections, key=lambda f: _utc(f.ts) or datetime.min.replace(tzinfo=UTC))
        served = (event.answer or "").strip()
        chosen = latest.corrected_answer.strip()
        return replace(
            base,
            completion=chosen,
            source="correction",
            quality=_CORRECTION_QUALITY,
            rejected=served if served and served != chosen else None,
        )
    ratings = [f.rating for f in feedback if f.rating is not None]
    negative = any(f.thumbs == "down" for f in feedback) or any(r < min_rating for r in ratings)
    positive = any(f.thumbs == "up" for f in feedback) or any(r >= min_rating for r in ratings)
    if negative:
        return "negative"
    if not positive:
        return "no_signal"
    if not (event.answer or "").strip():
        return "no_answer"
    quality = float(max(ratings)) if ratings else _THUMBS_UP_QUALITY
    return replace(base, completion=event.answer.strip(), quality=quality)


def _last_user_content(messages: list[dict[str, Any]]) -> str:
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return str(users[-1]) if users else ""


# --- stages 2-5 ------------------------------------------------------------------------------


def _redacted(example: Example, counts: Counter[str]) -> Example:
    return replace(
        example,
        prompt=redact_messages(example.prompt, counts),
        completion=redact_text(example.completion, counts),
        question=redact_text(example.question),  # the same text as in the prompt: count it once
        rejected=redact_text(example.rejected, counts) if example.rejected else example.rejected,
    )


def _exact_dedupe(examples: list[Example]) -> list[Example]:
    """The best example per normalised prompt, best first overall (the order semantic dedupe needs)."""
    best: dict[str, Example] = {}
    for example in examples:
        key = example.prompt_key
        if key not in best or example.rank() > best[key].rank():
            best[key] = example
    return sorted(best.values(), key=lambda e: (e.rank(), e.prompt_key), reverse=True)


def _semantic_dedupe(examples: list[Example], threshold: float, encoder: Encoder) -> list[Example]:
    """Drop rows whose question is near another's; `examples` come best first, so the best survives."""
    if not examples or threshold >= 1.0:
        return examples
    keep = greedy_dedupe(encoder.encode([e.question for e in examples]), threshold)
    return [examples[i] for i in keep]


def _select(examples: list[Example], config: SelectionConfig, encoder: Encoder) -> tuple[list[Example], dict[str, Any]]:
    report: dict[str, Any] = {"config": config.to_dict()}
    if not config.enabled or not examples:
        return examples, report
    selection = select_by_density(
        encoder.encode([e.completion for e in examples]), [e.quality for e in examples], config
    )
    return [examples[i] for i in selection.kept], {**report, **selection.counts()}


def _synthetic_examples(
    db: Database,
    config: SyntheticConfig,
    encoder: Encoder,
    real: list[Example],
    since: datetime | None,
    until: datetime | None,
) -> tuple[list[Example], dict[str, Any]]:
    from sqlalchemy import select

    from store.config import Settings
    from training.synthetic import active_layout, count_retrievals, generate_synthetic, load_chunks, rarely_retrieved

    stmt = _within(select(SearchEvent.retrieved), since, until)
    with db.session() as session:
        retrievals = count_retrievals(session.scalars(stmt))
    chunks = rarely_retrieved(load_chunks(config.index_dir or Settings().index_dir), retrievals, config)
    best_answers = [e.completion for e in sorted(real, key=Example.rank, reverse=True)[:3]]
    result = generate_synthetic(
        chunks,
        config=config,
        encoder=encoder,
        real_questions=[e.question for e in real],
        layout=active_layout(db),
        style_examples=best_answers,
    )
    added = [
        Example(prompt=s.prompt, completion=s.answer, source="synthetic", quality=0.0, question=s.question)
        for s in result.examples
    ]
    return added, {"config": config.to_dict(), "counts": dict(result.counts)}


# --- stage 6 and output ----------------------------------------------------------------------


def _split(examples: list[Example], fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    train: list[dict[str, Any]] = []
    holdout: list[dict[str, Any]] = []
    for example in examples:
        (holdout if in_holdout(example.split_key, fraction) else train).append(example.to_row())
    return sorted(train, key=lambda r: r["id"]), sorted(holdout, key=lambda r: r["id"])


def _preference_rows(corrected: list[Example], holdout_fraction: float) -> list[dict[str, Any]]:
    """trl DPO rows (conversational prompt/chosen/rejected), one per prompt and correction."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for example in sorted(corrected, key=Example.rank):
        key = example.prompt_key
        rows[(key, example.completion)] = {
            "prompt": example.prompt,
            "chosen": [{"role": "assistant", "content": example.completion}],
            "rejected": [{"role": "assistant", "content": example.rejected}],
            "event_id": example.event_id,
            "simulated": example.simulated,
            # The question's side, as for its SFT rows: a question held out for SFT is held out for DPO.
            "split": "holdout" if in_holdout(example.split_key, holdout_fraction) else "train",
        }
    return [rows[k] for k in sorted(rows)]


def _write_outputs(
    out_dir: Path, train: list[dict[str, Any]], holdout: list[dict[str, Any]], preferences: list[dict[str, Any]]
) -> str:
    """Write the three JSONL files; return the hash of their content (stable across identical builds)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for name, rows in ((TRAIN_FILE, train), (HOLDOUT_FILE, holdout), (PREFERENCES_FILE, preferences)):
        data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
        digest.update(name.encode() + b"\x00" + data)
        _atomic_write(out_dir / name, data)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class _LazyEncoder:
    """Loads the default sentence embedder only if a stage actually needs embeddings."""

    def __init__(self, encoder: Encoder | None):
        self._encoder = encoder

    def encode(self, texts: list[str]) -> np.ndarray:
        if self._encoder is None:
            self._encoder = default_encoder()
        return self._encoder.encode(texts)
