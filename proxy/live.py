"""What every replica must see within seconds: the running experiment, the active prompt, the index.

The store (and the index directory) hold the truth; a background task re-reads them every
`experiment_refresh_s`, so an admin change on one replica reaches all of them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from experiment.assignment import Arm
from proxy.retriever import Retriever
from proxy.upstream import Target
from store import experiments, prompts
from store.config import Settings
from store.db import Database
from store.models import Experiment, PromptTemplate

log = logging.getLogger("abloop.proxy")


@dataclass(frozen=True)
class Snapshot:
    experiment: Experiment
    prompt: PromptTemplate  # the active version: control's, and the candidate's unless it has its own
    candidate_prompt: PromptTemplate | None = None

    @property
    def has_candidate(self) -> bool:
        return bool(self.experiment.candidate_base_url)

    def prompt_for(self, arm: Arm) -> PromptTemplate:
        """The template version an arm renders its prompt with."""
        if arm == "candidate" and self.candidate_prompt is not None:
            return self.candidate_prompt
        return self.prompt

    def plan(self, assigned: Arm) -> list[tuple[Arm, Target]]:
        """The assigned arm first, then the other one to fall back to (if there is one)."""
        control = Target(self.experiment.control_base_url, self.experiment.control_model)
        if not self.has_candidate:
            return [("control", control)]
        candidate = Target(self.experiment.candidate_base_url, self.experiment.candidate_model)
        if assigned == "candidate":
            return [("candidate", candidate), ("control", control)]
        return [("control", control), ("candidate", candidate)]


class Live:
    def __init__(self, settings: Settings, db: Database, retriever: Retriever) -> None:
        self._settings = settings
        self._db = db
        self._retriever = retriever
        self._task: asyncio.Task | None = None
        # One read at a time: without it a background read that began before an admin change
        # commits can finish after that change's own refresh and put the old split back.
        self._reading = asyncio.Lock()
        self.snapshot: Snapshot | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="abloop-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def refresh(self) -> Snapshot:
        def _read() -> Snapshot:
            experiment = experiments.ensure_running(self._db, self._settings)  # seeds the first one from env
            candidate_id = experiment.candidate_prompt_template_id
            return Snapshot(experiment=experiment, prompt=prompts.active(self._db),
                            candidate_prompt=prompts.get(self._db, candidate_id) if candidate_id else None)

        async with self._reading:
            self.snapshot = await asyncio.to_thread(_read)
            return self.snapshot

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.experiment_refresh_s)
            try:
                await self.refresh()
            except Exception as error:  # the store may be briefly down; keep serving the last snapshot
                log.warning("experiment refresh failed: %s", error)
            try:
                await self._retriever.maybe_reload()
            except Exception as error:
                log.warning("index reload failed: %s", error)
