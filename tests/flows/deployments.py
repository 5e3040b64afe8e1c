"""prefect.yaml's deployments, as the deployment tests read them."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS: list[dict] = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
