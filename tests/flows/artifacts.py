"""A flow run's artifacts, read back through Prefect's own client (from the server in the current settings)."""

from __future__ import annotations

from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.client.schemas.objects import Artifact


def artifacts_by_key(flow_run_id: UUID | str) -> dict[str, Artifact]:
    only_this_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run_id))]))
    with get_client(sync_client=True) as client:
        return {artifact.key: artifact for artifact in client.read_artifacts(artifact_filter=only_this_run)}
