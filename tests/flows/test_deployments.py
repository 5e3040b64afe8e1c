"""prefect.yaml points at real flows, named after their files, with parameters they accept and the
schedules the design names. That a real Prefect server takes them and runs one: test_real_server.py."""

from __future__ import annotations

import importlib
import inspect
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect import Flow
from prefect.server.schemas.schedules import CronSchedule

from tests.flows.deployments import DEPLOYMENTS, ROOT

ON_DEMAND = {"ingest", "promote", "rollback"}  # an operator's (or a new corpus's) decision, never a schedule
GPU = {"retrain"}


def _at_night(run: datetime) -> bool:
    return run.hour < 6


def _on_monday_morning(run: datetime) -> bool:
    return run.weekday() == 0 and 5 <= run.hour < 12


# name -> (time between runs, what every run time must satisfy)
CADENCE = {
    "evaluate_arms": (timedelta(hours=1), None),
    "retrain": (timedelta(weeks=1), None),
    "weekly_report": (timedelta(weeks=1), _on_monday_morning),
    "tune_prompts": (timedelta(days=1), _at_night),
}


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_deployment_entrypoint_is_a_flow_named_after_its_file(deployment):
    path, _, attribute = deployment["entrypoint"].partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, attribute)
    assert flow.name == deployment["name"] == Path(path).stem
    accepted = inspect.signature(flow.fn).parameters
    assert set(deployment.get("parameters", {})) <= set(accepted)
    # Within the flow's bounds (flows/parameters.py); an on-demand run brings its required ids itself.
    brought = {name: "id" for name, parameter in accepted.items() if parameter.default is inspect.Parameter.empty}
    flow.validate_parameters({**brought, **deployment.get("parameters", {})})


def test_every_flow_has_a_deployment():
    flows = set()
    for path in (ROOT / "flows").glob("*.py"):
        module = importlib.import_module(f"flows.{path.stem}")
        flows |= {value.name for value in vars(module).values() if isinstance(value, Flow)}
    assert flows <= {d["name"] for d in DEPLOYMENTS}


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
async def test_deployment_runs_on_its_pool_and_schedule(deployment):
    name = deployment["name"]
    assert deployment["work_pool"]["name"] == ("gpu" if name in GPU else "cpu")
    if name in ON_DEMAND:
        assert deployment["schedules"] == []
        return
    [schedule] = deployment["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    # Plain datetimes: Prefect's are pendulum's, whose differences are not timedeltas.
    runs = [datetime.fromtimestamp(run.timestamp(), UTC)
            for run in await cron.get_dates(n=5, start=datetime(2025, 1, 1, tzinfo=UTC))]
    every, when = CADENCE[name]
    assert {later - earlier for earlier, later in zip(runs, runs[1:], strict=False)} == {every}
    assert when is None or all(when(run) for run in runs)
