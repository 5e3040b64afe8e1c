"""Writes to the `adapters` table: one row per trained adapter, its name never reused."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from store.db import Database
from store.models import Adapter

# The model server's rule for an adapter's name (serving.schemas.ADAPTER_NAME_CHARS / _MAX_LENGTH: peft refuses
# "."), restated: training does not import serving (DESIGN's import direction). tests/training/test_train.py
# checks the two agree and that the server takes these names.
_SERVABLE_CHARS = "A-Za-z0-9_-"
_SERVABLE_MAX_LENGTH = 128


class AdapterNameTaken(RuntimeError):
    """The versioned name is already used by a directory or an `adapters` row."""


def adapter_name(base_name: str, dataset_hash: str, now: datetime | None = None) -> str:
    """`<base>-<UTC timestamp>-<data hash[:8]>`: serving stacks cache weights by name, so each is new.

    The model server loads an adapter only under a name of letters, digits, "_" and "-" (peft refuses "."):
    the base's other characters become "_" ("Qwen2.5-0.5B" -> "Qwen2_5-0_5B"), and a long base is cut to fit.
    """
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    suffix = f"-{stamp}-{dataset_hash[:8]}"
    base = re.sub(f"[^{_SERVABLE_CHARS}]", "_", base_name)[: _SERVABLE_MAX_LENGTH - len(suffix)]
    return base + suffix


def name_taken(db: Database, name: str) -> bool:
    with db.session() as session:
        return session.scalar(select(Adapter.id).where(Adapter.name == name)) is not None


def get_adapter(db: Database, name: str) -> Adapter | None:
    with db.session() as session:
        return session.scalars(select(Adapter).where(Adapter.name == name)).first()


def register_adapter(
    db: Database,
    *,
    name: str,
    base_model: str,
    path: Path,
    dataset_hash: str | None,
    train_metrics: dict[str, Any] | None,
) -> str:
    """Insert the adapter row and return its id; refuses a name that exists."""
    with db.session() as session:
        if session.scalar(select(Adapter.id).where(Adapter.name == name)) is not None:
            raise AdapterNameTaken(f"adapter name {name!r} is already registered")
        row = _new_row(name, base_model, path, dataset_hash, train_metrics)
        session.add(row)
        session.flush()
        return row.id


def record_eval(
    db: Database,
    name: str,
    eval_metrics: dict[str, Any],
    *,
    base_model: str,
    path: Path,
    dataset_hash: str | None = None,
    train_metrics: dict[str, Any] | None = None,
) -> str:
    """Store the offline verdict on the adapter's row, registering the adapter first if needed."""
    with db.session() as session:
        row = session.scalars(select(Adapter).where(Adapter.name == name)).first()
        if row is None:
            row = _new_row(name, base_model, path, dataset_hash, train_metrics)
            session.add(row)
        row.eval_metrics = eval_metrics
        session.flush()
        return row.id


def _new_row(
    name: str, base_model: str, path: Path, dataset_hash: str | None, train_metrics: dict[str, Any] | None
) -> Adapter:
    return Adapter(
        name=name,
        base_model=base_model,
        path=str(Path(path).resolve()),
        dataset_hash=dataset_hash,
        train_metrics=train_metrics,
    )
