"""Bounds on the flows' parameters.

Prefect validates a run's parameters with pydantic when the run starts, so a value out of range fails
it by name (`- epochs: Input should be greater than 0`) before a dataset is built or an index embedded,
and a deployment's parameter schema (the UI's form, `prefect deployment run -p`) carries the bounds.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

Share = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]
Dropout = Annotated[float, Field(ge=0, lt=1)]
Cosine = Annotated[float, Field(gt=0, le=1)]
Tolerance = Annotated[float, Field(ge=0, le=1)]  # on a 0..1 score: how much worse still passes
AtLeastOne = Annotated[int, Field(ge=1)]
AtLeastZero = Annotated[int, Field(ge=0)]
Rating = Annotated[int, Field(ge=1, le=5)]
