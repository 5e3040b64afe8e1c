"""The flows' parameters are bounded (flows/parameters.py): a run with a value out of range fails by the
parameter's name before it does anything, and the schema `prefect deploy` reads carries the bounds.
The retrain flow's own cases, and that nothing was built: test_retrain.py."""

from __future__ import annotations

import pytest
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema_from_entrypoint

from tests.flows.deployments import ROOT

REFUSED = [
    ("ingest", {"kind": "ivf"}, "kind: Input should be 'flat' or 'hnsw'"),
    ("evaluate_arms", {"score_sample": -1}, "score_sample: Input should be greater than or equal to 0"),
    ("tune_prompts", {"min_rating": 6}, "min_rating: Input should be less than or equal to 5"),
    ("tune_prompts", {"min_rating": 0}, "min_rating: Input should be greater than or equal to 1"),
    ("tune_prompts", {"similarity": 0}, "similarity: Input should be greater than 0"),
    ("tune_prompts", {"similarity": 1.01}, "similarity: Input should be less than or equal to 1"),
    ("tune_prompts", {"days": 0}, "days: Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize(("name", "parameters", "says"), REFUSED,
                         ids=[f"{n}-{k}={v}" for n, p, _ in REFUSED for k, v in p.items()])
def test_a_value_out_of_range_fails_the_run_by_name(store, name, parameters, says, tmp_path):
    import importlib

    flow = getattr(importlib.import_module(f"flows.{name}"), name)
    with pytest.raises(ParameterTypeError) as refused:
        flow(**parameters)
    assert says in str(refused.value)
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize(("entrypoint", "parameter", "bounds"), [
    ("retrain", "epochs", {"exclusiveMinimum": 0}),
    ("retrain", "candidate_share", {"minimum": 0, "maximum": 1}),
    ("retrain", "lora_dropout", {"minimum": 0, "exclusiveMaximum": 1}),
    ("ingest", "kind", {"enum": ["flat", "hnsw"]}),
    ("tune_prompts", "min_rating", {"minimum": 1, "maximum": 5}),
])
def test_the_deployment_schema_carries_the_bounds(entrypoint, parameter, bounds):
    schema = parameter_schema_from_entrypoint(str(ROOT / f"flows/{entrypoint}.py") + f":{entrypoint}")
    field = schema.model_dump()["properties"][parameter]
    shown = next((option for option in field.get("anyOf", []) if option.get("type") != "null"), field)
    assert bounds.items() <= shown.items(), field
