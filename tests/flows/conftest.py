import pytest


@pytest.fixture(autouse=True)
def _flows_on_the_test_server(prefect_server) -> None:
    """Every flow test runs against the process's temporary Prefect server (tests/conftest.py)."""
