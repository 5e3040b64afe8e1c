"""prefect.yaml points at real flows, named after their files, with parameters they accept."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
ON_DEMAND = {"promote", "rollback"}  # an operator's decision, never a schedule


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_deployment_entrypoint_is_a_flow_named_after_its_file(deployment):
    path, _, attribute = deployment["entrypoint"].partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, attribute)
    assert flow.name == deployment["name"] == Path(path).stem
    accepted = inspect.signature(flow.fn).parameters
    assert set(deployment.get("parameters", {})) <= set(accepted)
    assert deployment["work_pool"]["name"] in {"cpu", "gpu"}
    assert bool(deployment["schedules"]) == (deployment["name"] not in ON_DEMAND)
