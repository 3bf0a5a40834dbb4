"""What the client returns: the API's own pydantic schemas, the ones its OpenAPI
document declares (`app.api.schemas_out` for assets, plans and tasks).

Request bodies are validated on the client with the server's input schemas (re-exported
here), so a malformed registration fails before it is sent. The response models accept
fields they do not know, so a newer server does not break an older client.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.api.routes.assets import DataManagerIn, DataSampleIn, FunctionIn
from app.api.routes.datasets import DatasetFileIn, DatasetIn, DatasetOutputIn
from app.api.routes.ledger import EventPage, LedgerEvent
from app.api.schemas import IssuedToken, Me, Organization, OrganizationCreated, TokenInfo
from app.api.schemas_assets import (
    ComputePlanIn,
    InputSpecIn,
    OutputSpecIn,
    PermissionIn,
    PermissionsIn,
    TaskIn,
    TaskInputIn,
    TaskOutputIn,
)
from app.api.schemas_out import (
    ComputePlan,
    DataManager,
    DataSample,
    Dataset,
    FailureReport,
    FileRef,
    Function,
    GraphEdge,
    GraphNode,
    Lease,
    LeaseRenewed,
    Model,
    Performance,
    PlanGraph,
    PlanRegistered,
    Row,
    Task,
    TaskKeys,
    VerifyResult,
)

__all__ = [
    "ComputePlan", "ComputePlanIn", "DataManager", "DataManagerIn", "DataSample",
    "DataSampleIn", "Dataset", "DatasetFileIn", "DatasetIn", "DatasetOutputIn", "EventPage",
    "FailureReport", "FileRef", "Function", "FunctionIn", "GraphEdge", "GraphNode",
    "InputSpecIn", "IssuedToken", "Lease", "LeaseRenewed", "LedgerEvent", "LogBytes", "Me",
    "Model",
    "Organization", "OrganizationCreated", "OutputSpecIn", "Page", "PermissionIn",
    "PermissionsIn", "Performance", "PlanGraph", "PlanRegistered", "Row", "Task", "TaskIn",
    "TaskInputIn", "TaskKeys", "TaskOutputIn", "TokenInfo", "VerifyResult",
    "FINAL_TASK_STATUSES", "FINAL_PLAN_STATUSES",
]

FINAL_TASK_STATUSES = frozenset({"DONE", "FAILED", "CANCELED"})
# A FAILED plan can no longer finish (children of a failed task never run).
FINAL_PLAN_STATUSES = frozenset({"DONE", "FAILED", "CANCELED"})


class LogBytes(BaseModel):
    """Bytes of a task's log from `offset` on, as the task wrote them (they may start or
    end inside a multibyte UTF-8 character), and the log's whole size when read."""

    offset: int
    data: bytes
    size: int

    @property
    def next_offset(self) -> int:
        """Where the next read starts to get what comes after these bytes."""
        return self.offset + len(self.data)


class Page(Row):
    """One page of a cursor-paginated listing (items still raw JSON)."""

    items: list[dict[str, Any]]
    next_cursor: str | None = None
