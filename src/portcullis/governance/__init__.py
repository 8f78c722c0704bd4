"""Governance: four-eyes changes, just-in-time access and break-glass (issue 5).

`Governance` (service.py) holds the rules; `GovernanceStore` (store.py) the state in
``DATA_DIR/governance.db``. The CLI (`portcullis access`) and the admin console call
the service; the gateway's Cedar entity builder calls `Governance.active_roles`.
"""

from portcullis.governance.service import (
    Alert,
    AlertHook,
    AuditSink,
    ConflictError,
    ForbiddenError,
    Governance,
    GovernanceConfig,
    GovernanceError,
    InvalidRequestError,
    NotFoundError,
    PolicyCheck,
    cedar_syntax_problems,
    governance_db_path,
    open_governance,
)
from portcullis.governance.store import ChangeRequest, GovernanceStore, RoleAssignment

__all__ = [
    "Alert",
    "AlertHook",
    "AuditSink",
    "ChangeRequest",
    "ConflictError",
    "ForbiddenError",
    "Governance",
    "GovernanceConfig",
    "GovernanceError",
    "GovernanceStore",
    "InvalidRequestError",
    "NotFoundError",
    "PolicyCheck",
    "RoleAssignment",
    "cedar_syntax_problems",
    "governance_db_path",
    "open_governance",
]
